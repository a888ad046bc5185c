"""Pure triplet functions: ids, seeds, schema, rows, shard plans, and the shard worker on a local Lance table."""

from __future__ import annotations

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from instaflow_core.errors import DataError
from instaflow_core.generation.shards import ShardWorker, plan_shards, select_prompt_ids
from instaflow_core.generation.triplets import (
    SEED_MASK,
    SolverSpec,
    build_rows,
    check_table_schema,
    expand_jobs,
    rows_to_latents,
    run_filter,
    triplet_id,
    triplet_schema,
    triplet_seed,
)

SOLVER = SolverSpec(scheduler="dpmsolver++", steps=4, guidance=5.0)


def test_seed_is_deterministic_63_bit_and_distinct():
    a = triplet_seed(0, "p1", 0)
    assert a == triplet_seed(0, "p1", 0)
    seeds = {triplet_seed(b, p, k) for b in (0, 1) for p in ("p1", "p2") for k in range(3)}
    assert len(seeds) == 12
    assert all(0 <= s <= SEED_MASK for s in seeds)


def test_triplet_id_depends_on_every_input():
    base = triplet_id("p", 7, "tiny-abc", SOLVER)
    assert base == triplet_id("p", 7, "tiny-abc", SolverSpec(scheduler="dpmsolver++", steps=4, guidance=5.0))
    assert len(base) == 32
    others = {
        triplet_id("q", 7, "tiny-abc", SOLVER),
        triplet_id("p", 8, "tiny-abc", SOLVER),
        triplet_id("p", 7, "tiny-xyz", SOLVER),
        triplet_id("p", 7, "tiny-abc", SOLVER.model_copy(update={"steps": 5})),
        triplet_id("p", 7, "tiny-abc", SOLVER.model_copy(update={"guidance": 1.5})),
        triplet_id("p", 7, "tiny-abc", SOLVER.model_copy(update={"kind": "rf"})),
        triplet_id("p", 7, "tiny-abc", SOLVER.model_copy(update={"negative_prompt": "blurry"})),
    }
    assert base not in others and len(others) == 7


def test_expand_jobs_images_per_prompt_sorted():
    jobs = expand_jobs([("b", "B"), ("a", "A")], images_per_prompt=3, base_seed=5, teacher="t", solver=SOLVER)
    assert [j.prompt_id for j in jobs] == ["a"] * 3 + ["b"] * 3
    assert jobs[0].seed == triplet_seed(5, "a", 0) and jobs[2].seed == triplet_seed(5, "a", 2)
    assert len({j.triplet_id for j in jobs}) == 6


def test_plan_shards_is_deterministic_and_covers():
    ids = [f"{i:04x}" for i in range(0, 100)]
    shuffled = list(reversed(ids)) + ids[:10]  # order and duplicates do not matter
    plan = plan_shards(shuffled, 32)
    assert plan == plan_shards(ids, 32)
    assert [s.n_prompts for s in plan] == [32, 32, 32, 4]
    assert plan[0].first_id == "0000" and plan[-1].last_id == ids[-1]
    assert all(s.count == 4 for s in plan)
    # consecutive ranges, no overlap
    for a, b in zip(plan, plan[1:], strict=False):
        assert a.last_id < b.first_id
    assert plan_shards([], 8) == []
    assert select_prompt_ids(pa.array(shuffled), 5).to_pylist() == ids[:5]


def test_schema_and_rows_roundtrip():
    shape = (4, 2, 3)
    schema = triplet_schema(shape, store_noise=True)
    jobs = expand_jobs([("a", "A"), ("b", "B")], images_per_prompt=1, base_seed=0, teacher="t", solver=SOLVER)
    x1 = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
    rows = build_rows(jobs, x1, schema=schema, teacher="t", solver=SOLVER, shard=3, run_id="r", x0=x1 * 2)
    assert rows.schema == schema
    back = rows_to_latents(rows.column("x1"), shape)
    np.testing.assert_allclose(back.astype(np.float32), x1, rtol=1e-3, atol=1e-3)
    assert rows.column("latent_shape").to_pylist() == [[4, 2, 3]] * 2
    assert rows.column("shard").to_pylist() == [3, 3]
    assert rows.column("seed").type == pa.int64()
    # without x0 the column does not exist at all
    assert "x0" not in triplet_schema(shape).names
    with pytest.raises(DataError, match="latents of"):
        check_table_schema(schema, (4, 8, 8), False, "triplets")
    with pytest.raises(DataError, match="x0"):
        check_table_schema(triplet_schema(shape), shape, True, "triplets")


def _fake_solver(calls):
    def solve(prompts, seeds):
        calls.append(len(prompts))
        return np.stack([np.full((4, 2, 2), s % 97, np.float32) for s in seeds])

    return solve


def _merge(table, rows):
    table.merge_insert("triplet_id").when_matched_update_all().when_not_matched_insert_all().execute(rows)


def test_shard_worker_skips_done_rows_and_merges(tmp_path):
    db = lancedb.connect(str(tmp_path))
    table = db.create_table("triplets", schema=triplet_schema((4, 2, 2)))
    jobs = expand_jobs(
        [(f"p{i}", f"prompt {i}") for i in range(5)],
        images_per_prompt=2,
        base_seed=0,
        teacher="t",
        solver=SOLVER,
    )
    calls: list[int] = []
    progress: list[tuple[int, int]] = []
    kwargs = dict(table=table, batch_size=4, teacher="t", solver=SOLVER, run_id="r1", write=_merge)
    done = "prompt_id >= 'p0' AND prompt_id <= 'p9'"
    # a "killed" first run that got through the first 3 jobs only
    first = ShardWorker(solve=_fake_solver(calls), **kwargs).run(jobs[:3], 0, done)
    assert first.written == 3 and table.count_rows() == 3
    res = ShardWorker(solve=_fake_solver(calls), on_batch=lambda d, t: progress.append((d, t)), **kwargs).run(
        jobs, 0, done
    )
    assert (res.expected, res.skipped, res.written) == (10, 3, 7)
    assert calls == [3, 4, 3]
    assert progress[0] == (3, 10) and progress[-1] == (10, 10)
    got = table.to_arrow()
    assert sorted(got.column("triplet_id").to_pylist()) == sorted(j.triplet_id for j in jobs)
    # a third run is a no-op
    again = ShardWorker(solve=_fake_solver(calls), **kwargs).run(jobs, 0, done)
    assert again.written == 0 and table.count_rows() == 10
    assert table.count_rows(run_filter("t", SOLVER)) == 10
    assert table.count_rows(run_filter("t", SOLVER.model_copy(update={"steps": 9}))) == 0


def test_shard_worker_rejects_non_finite(tmp_path):
    table = lancedb.connect(str(tmp_path)).create_table("t", schema=triplet_schema((4, 2, 2)))
    jobs = expand_jobs([("a", "A")], images_per_prompt=1, base_seed=0, teacher="t", solver=SOLVER)
    with pytest.raises(DataError, match="float16"):
        ShardWorker(
            table=table,
            solve=lambda p, s: np.full((1, 4, 2, 2), 1e6, np.float32),
            teacher="t",
            solver=SOLVER,
            batch_size=2,
            run_id="r",
            write=_merge,
        ).run(jobs, 0, "true")
    assert table.count_rows() == 0
