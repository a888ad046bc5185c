"""TripletDataset: shuffled per epoch, disjoint and covering across ranks and workers, X0 from seeds, fork-safe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instaflow_core.errors import DataError
from instaflow_core.generation.triplets import SolverSpec, build_rows, expand_jobs, run_filter, triplet_schema
from instaflow_core.rectified_flow import noise_from_seeds
from instaflow_core.store import Store, create_table, merge_rows, table_ref
from instaflow_core.store.dataset import TripletDataset, make_loader, validate_triplets

SHAPE = (4, 4, 4)
SOLVER = SolverSpec(steps=2, guidance=5.0)


def make_table(
    storage_cfg,
    n_prompts=50,
    images=2,
    solver=SOLVER,
    name="triplets",
    store_noise=True,
    commit_order=None,
    teacher="t",
):
    """A triplets table whose x1 is a known function of X0 (x1 = 2 * x0 + 1), metadata as the flow writes it.
    Shards of 32 rows, committed in `commit_order` (shard indices; default: in order)."""
    store = Store(storage_cfg)
    schema = triplet_schema(SHAPE, store_noise=store_noise)
    table = create_table(
        store, name, schema, metadata={"filter": run_filter(teacher, solver), "teacher": teacher}
    )
    jobs = expand_jobs(
        [(f"p{i:03d}", f"prompt {i}") for i in range(n_prompts)],
        images_per_prompt=images,
        base_seed=0,
        teacher=teacher,
        solver=solver,
    )
    shards = [jobs[start : start + 32] for start in range(0, len(jobs), 32)]  # several fragments
    for shard in commit_order or range(len(shards)):
        batch = shards[shard]
        x0 = noise_from_seeds([j.seed for j in batch], SHAPE).numpy()
        rows = build_rows(
            batch, 2 * x0 + 1, schema=schema, teacher=teacher, solver=solver, shard=shard, run_id="r", x0=x0
        )
        merge_rows(table, rows, "triplet_id")
    return table_ref(store, name), {j.triplet_id for j in jobs}


def _ids(ds):
    return [tid for b in ds for tid in b["triplet_id"]]


def test_batches_cover_every_row_once_and_x0_regenerates(storage_cfg):
    ref, ids = make_table(storage_cfg)
    ds = TripletDataset(ref, storage_cfg, batch_size=16, seed=3)
    batches = list(ds)
    got = [t for b in batches for t in b["triplet_id"]]
    assert sorted(got) == sorted(ids) and len(got) == 100
    b = batches[0]
    assert b["x0"].shape == (16, *SHAPE) and b["x0"].dtype == torch.float32 and b["x1"].dtype == torch.float32
    assert len(b["prompt"]) == 16 and all(p.startswith("prompt ") for p in b["prompt"])
    # regenerated noise matches the noise that made x1 (fp16 storage tolerance)
    torch.testing.assert_close(b["x1"], 2 * b["x0"] + 1, atol=5e-3, rtol=2e-3)
    assert [len(b["triplet_id"]) for b in batches] == [16] * 6 + [4]
    assert len(ds) == 7


def test_stored_x0_equals_regenerated(local_storage_cfg):
    ref, _ = make_table(local_storage_cfg)
    stored = next(iter(TripletDataset(ref, local_storage_cfg, 8, shuffle=False, regenerate_noise=False)))
    regen = next(iter(TripletDataset(ref, local_storage_cfg, 8, shuffle=False)))
    assert stored["triplet_id"] == regen["triplet_id"]
    torch.testing.assert_close(stored["x0"], regen["x0"], atol=2e-3, rtol=1e-3)


def test_shuffle_per_epoch_and_sharding(local_storage_cfg):
    ref, ids = make_table(local_storage_cfg, n_prompts=100)
    kw = dict(batch_size=10, seed=1, block_rows=8, window_blocks=4)
    e0 = _ids(TripletDataset(ref, local_storage_cfg, epoch=0, **kw))
    assert e0 == _ids(TripletDataset(ref, local_storage_cfg, epoch=0, **kw))  # deterministic
    ds = TripletDataset(ref, local_storage_cfg, **kw)
    ds.set_epoch(1)
    e1 = _ids(ds)
    assert e0 != e1 and sorted(e0) == sorted(e1) == sorted(ids)
    rows = Store(local_storage_cfg).db().open_table("triplets").to_arrow()
    canonical = rows.sort_by([("shard", "ascending"), ("seed", "ascending")]).column("triplet_id")
    assert _ids(TripletDataset(ref, local_storage_cfg, shuffle=False, **kw)) == canonical.to_pylist()
    # 2 ranks x 3 workers: disjoint shares covering every position
    shares = []
    for rank in range(2):
        d = TripletDataset(ref, local_storage_cfg, rank=rank, world_size=2, **kw)
        shares += [set(d.reader_positions(w, 3).tolist()) for w in range(3)]
    assert sum(len(s) for s in shares) == 200 == len(set().union(*shares))
    # and by rank through iteration
    r0 = _ids(TripletDataset(ref, local_storage_cfg, rank=0, world_size=2, **kw))
    r1 = _ids(TripletDataset(ref, local_storage_cfg, rank=1, world_size=2, **kw))
    assert not set(r0) & set(r1) and sorted(r0 + r1) == sorted(ids)


def test_the_same_rows_committed_in_another_order_give_the_same_batches(tmp_path):
    """Concurrent shard writers commit in any order; the batches of a seed depend on the rows alone."""
    from instaflow_core.config import StorageConfig

    a_cfg, b_cfg = StorageConfig(root=str(tmp_path / "a")), StorageConfig(root=str(tmp_path / "b"))
    a, ids = make_table(a_cfg, n_prompts=60)  # 120 rows, shards 0..3
    b, _ = make_table(b_cfg, n_prompts=60, commit_order=[3, 1, 0, 2])
    order = lambda cfg: Store(cfg).db().open_table("triplets").to_arrow().column("triplet_id").to_pylist()  # noqa: E731
    assert order(a_cfg) != order(b_cfg)  # the tables differ in row order ...
    kw = dict(batch_size=10, seed=5, block_rows=8, window_blocks=2)
    for epoch in (0, 1):
        got_a = list(TripletDataset(a, a_cfg, epoch=epoch, **kw))
        got_b = list(TripletDataset(b, b_cfg, epoch=epoch, **kw))
        assert [x["triplet_id"] for x in got_a] == [x["triplet_id"] for x in got_b]  # ... not the batches
        torch.testing.assert_close(torch.cat([x["x1"] for x in got_a]), torch.cat([x["x1"] for x in got_b]))
    assert sorted(t for x in got_a for t in x["triplet_id"]) == sorted(ids)


def test_the_same_rows_under_another_teacher_name_give_the_same_batches(tmp_path):
    """A trained teacher's name is its model key, which holds the store's location (the 1-RF of a rebuild in
    another folder or bucket is `1rf-<another hash>`), and triplet ids hash the teacher's name: the same prompts,
    seeds and latents then have other ids. The batches depend on (shard, seed), not on those ids, and mix a shard's
    prompts (a batch is not one prompt's rows)."""
    from instaflow_core.config import StorageConfig

    a_cfg, b_cfg = StorageConfig(root=str(tmp_path / "a")), StorageConfig(root=str(tmp_path / "b"))
    a, ids_a = make_table(a_cfg, n_prompts=60, teacher="1rf-366bbd01781f7f86")
    b, ids_b = make_table(b_cfg, n_prompts=60, teacher="1rf-30e8f58d1ffcafcc")
    assert not ids_a & ids_b  # other ids for the same rows
    kw = dict(batch_size=10, seed=5, block_rows=8, window_blocks=2)
    for epoch in (0, 1):
        got_a = list(TripletDataset(a, a_cfg, epoch=epoch, **kw))
        got_b = list(TripletDataset(b, b_cfg, epoch=epoch, **kw))
        assert [x["prompt"] for x in got_a] == [x["prompt"] for x in got_b]
        assert [x["seed"] for x in got_a] == [x["seed"] for x in got_b]
        assert all(len(set(x["prompt"])) > 1 for x in got_a)
        torch.testing.assert_close(torch.cat([x["x0"] for x in got_a]), torch.cat([x["x0"] for x in got_b]))
        torch.testing.assert_close(torch.cat([x["x1"] for x in got_a]), torch.cat([x["x1"] for x in got_b]))


def test_spawned_workers_with_lance_opened_in_parent(local_storage_cfg):
    """num_workers=2: each worker opens its own Lance handle; rows disjoint and covering."""
    ref, ids = make_table(local_storage_cfg, n_prompts=40)
    ds = TripletDataset(ref, local_storage_cfg, batch_size=8, block_rows=8)
    assert ds.num_rows == 80  # the parent opened Lance already
    got = _ids(make_loader(ds, num_workers=2))
    assert sorted(got) == sorted(ids)


def test_default_filter_reads_only_this_runs_rows(local_storage_cfg):
    other = SolverSpec(steps=9, guidance=5.0)
    make_table(local_storage_cfg, n_prompts=10, solver=other)  # an earlier config's rows
    ref, ids = make_table(local_storage_cfg, n_prompts=5)  # metadata now names SOLVER
    assert ref.rows == 30
    assert sorted(_ids(TripletDataset(ref, local_storage_cfg, 4))) == sorted(ids)
    assert len(_ids(TripletDataset(ref, local_storage_cfg, 4, where=None))) == 30
    assert validate_triplets(ref, local_storage_cfg, SHAPE) == 10


def test_validate_triplets_errors(local_storage_cfg):
    store = Store(local_storage_cfg)
    create_table(store, "empty", triplet_schema(SHAPE))
    with pytest.raises(DataError, match="no rows"):
        validate_triplets(table_ref(store, "empty"), local_storage_cfg, SHAPE)
    ref, _ = make_table(local_storage_cfg, n_prompts=3)
    with pytest.raises(DataError, match=r"shape \(4, 4, 4\) but the model expects \(4, 8, 8\)"):
        validate_triplets(ref, local_storage_cfg, (4, 8, 8))
    with pytest.raises(DataError, match="cannot open"):
        validate_triplets(ref.model_copy(update={"table": "nope"}), local_storage_cfg, SHAPE)
    assert np.isclose(validate_triplets(ref, local_storage_cfg, SHAPE), 6)
