"""Stage 2 end to end on the tiny preset: curate -> generate, exactly the expected triplets, lineage, caching."""

from __future__ import annotations

import json

import pytest
import torch

from instaflow_core.config import load
from instaflow_core.errors import DataError
from instaflow_core.generation.triplets import PairsJob, expand_jobs, rows_to_latents
from instaflow_core.rectified_flow import noise_from_seeds
from instaflow_core.store import Store, get_metadata, open_ref, open_table
from instaflow_core.store.dataset import TripletDataset, validate_triplets

GEN = [
    "generation.max_prompts=10",
    "generation.shard_size=4",
    "generation.images_per_prompt=2",
    "generation.num_inference_steps=2",
    "generation.batch_size=4",
]


def _cfg(storage_cfg, *extra):
    cfg = load("tiny", [*GEN, *extra])
    return cfg.model_copy(update={"storage": storage_cfg})


def expected_ids(cfg, prompts, teacher_source):
    """The triplet ids the config asks for, computed independently of the flow from the prompts table."""
    store = Store(cfg.storage)
    ptable = open_ref(store, prompts).to_lance().to_table(columns=["prompt_id", "text", "split"])
    rows = sorted(
        (p, t)
        for p, t, s in zip(
            *(ptable.column(c).to_pylist() for c in ("prompt_id", "text", "split")), strict=True
        )
        if s == "train"
    )[: cfg.generation.max_prompts]
    job = PairsJob.from_generation(cfg.generation)
    jobs = expand_jobs(
        rows,
        images_per_prompt=job.pairs.images_per_prompt,
        base_seed=job.pairs.seed,
        teacher=teacher_source,
        solver=job.solver,
    )
    return {j.triplet_id for j in jobs}


def _run(cfg, flow, *args):
    from tasks.caching import prefect_settings

    with prefect_settings(cfg.storage, cfg.orchestration):
        return flow(cfg, *args)


def _artifact(key, naming):
    """The artifact under `key` that names `naming` (other tests share the session's Prefect API and key)."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return next((a for a in found if naming in (a.data or "")), None)


def test_generate_tiny_local(prefect_api, local_storage_cfg):
    from flows.curate import curate_flow
    from flows.generate import generate_flow
    from tasks.teacher import teacher_model

    cfg = _cfg(local_storage_cfg)
    prompts = _run(cfg, curate_flow)
    from tasks.caching import prefect_settings

    with prefect_settings(cfg.storage, cfg.orchestration):
        teacher = teacher_model(cfg.models, cfg.storage)
    assert Store(cfg.storage).resolve(teacher.uri).startswith(Store(cfg.storage).uri("models", "teacher-"))
    assert teacher.source.startswith("tiny-")

    ref = _run(cfg, generate_flow, prompts, teacher)
    assert ref.table == "triplets" and ref.rows == 20
    table = open_ref(Store(cfg.storage), ref)
    got = table.to_arrow()
    ids = got.column("triplet_id").to_pylist()
    assert len(ids) == len(set(ids)) == 20
    assert set(ids) == expected_ids(cfg, prompts, teacher.source)
    assert got.column("shard").to_pylist() and set(got.column("shard").to_pylist()) == {0, 1, 2}
    assert json.loads(got.column("solver")[0].as_py())["steps"] == 2
    assert got.column("latent_shape")[0].as_py() == [4, 8, 8]

    meta = get_metadata(table)
    assert meta["teacher"] == teacher.source
    assert meta["prompts_version"] == str(prompts.version) and meta["prompts_table"] == "prompts"
    assert meta["config_hash"] == ref.config_hash
    art = _artifact("instaflow-generate", ref.key())
    assert art is not None and ref.key() in art.data and "a sample per shard" in art.data
    indexed = {c for i in table.list_indices() for c in i.columns}
    assert "prompt_id" in indexed and "triplet_id" not in indexed  # no index on the merge key
    assert json.loads(meta["verified"]) == {
        "expected": 20, "rows": 20, "duplicates": 0, "removed": 0, "missing_count": 0,
    }  # fmt: skip

    # x1 is the teacher's ODE solution from the stored seed's noise (the dataset regenerates the same X0)
    from instaflow_core.generation.solvers import teacher_latents
    from instaflow_core.models.loading import load_model

    model = load_model(teacher, cfg.storage, cfg.models)
    sample = got.slice(0, 3)
    x1 = teacher_latents(
        model, sample.column("prompt").to_pylist(), sample.column("seed").to_pylist(), steps=2, guidance=5.0
    )
    torch.testing.assert_close(
        torch.from_numpy(rows_to_latents(sample.column("x1"), (4, 8, 8)).astype("float32")),
        x1,
        atol=2e-2,
        rtol=2e-3,
    )
    batch = next(iter(TripletDataset(ref, cfg.storage, 4, shuffle=False, columns=["seed"])))
    assert torch.equal(batch["x0"], noise_from_seeds(batch["seed"], (4, 8, 8)))
    assert validate_triplets(ref, cfg.storage, (4, 8, 8)) == 20

    # unchanged rerun: the same reference (all tasks are cache hits)
    assert _run(cfg, generate_flow, prompts, teacher) == ref

    # another solver setting: new ids next to the old rows; the new ref (and the dataset) name only the new ones
    cfg3 = _cfg(local_storage_cfg, "generation.num_inference_steps=3")
    ref3 = _run(cfg3, generate_flow, prompts, teacher)
    assert ref3.rows == 20 and ref3.version > ref.version
    assert open_table(Store(cfg.storage), "triplets").count_rows() == 40
    got3 = {t for b in TripletDataset(ref3, cfg.storage, 8) for t in b["triplet_id"]}
    assert got3 == expected_ids(cfg3, prompts, teacher.source) and not got3 & set(ids)

    # x0 cannot be added to a table made without it: one clear error
    cfg_noise = _cfg(local_storage_cfg, "generation.store_noise=true")
    with pytest.raises(DataError, match="without an x0 column"):
        _run(cfg_noise, generate_flow, prompts, teacher)


@pytest.mark.s3
def test_generate_tiny_s3_with_stored_noise(prefect_api, s3_storage_cfg):
    """A normal run on SeaweedFS S3 (teacher built by the flow), X0 stored and equal to the seed's noise."""
    from flows.curate import curate_flow
    from flows.generate import generate_flow

    cfg = _cfg(s3_storage_cfg, "generation.store_noise=true", "generation.max_prompts=6")
    prompts = _run(cfg, curate_flow)
    ref = _run(cfg, generate_flow, prompts)
    assert Store(cfg.storage).resolve(ref.db_uri).startswith("s3://") and ref.rows == 12
    got = open_ref(Store(cfg.storage), ref).to_arrow()
    assert len(set(got.column("triplet_id").to_pylist())) == 12
    x0 = rows_to_latents(got.column("x0"), (4, 8, 8)).astype("float32")
    want = noise_from_seeds(got.column("seed").to_pylist(), (4, 8, 8)).numpy()
    assert abs(x0 - want).max() < 2e-2
    stored = next(iter(TripletDataset(ref, cfg.storage, 12, shuffle=False, regenerate_noise=False)))
    regen = next(iter(TripletDataset(ref, cfg.storage, 12, shuffle=False)))
    torch.testing.assert_close(stored["x0"], regen["x0"], atol=2e-2, rtol=2e-3)


@pytest.mark.slow
def test_generate_process_pool(prefect_api, local_storage_cfg):
    """orchestration.task_runner=process: shards run in spawned worker processes (slow: each imports torch)."""
    from flows.curate import curate_flow
    from flows.generate import generate_flow

    cfg = _cfg(local_storage_cfg, "orchestration.task_runner=process", "generation.max_prompts=6")
    prompts = _run(cfg, curate_flow)
    ref = _run(cfg, generate_flow, prompts)
    ids = open_ref(Store(cfg.storage), ref).to_arrow().column("triplet_id").to_pylist()
    assert len(ids) == len(set(ids)) == 12


def test_shard_slices_share_the_work_then_a_full_run_finishes(prefect_api, local_storage_cfg):
    """Two sliced runs (as two GPU nodes would) plus a final run: every shard made once, the ref complete."""
    from flows.curate import curate_flow
    from flows.generate import generate_flow

    cfg = _cfg(local_storage_cfg, "generation.max_prompts=6", "generation.shard_size=2")
    prompts = _run(cfg, curate_flow)
    part = _run(cfg, generate_flow, prompts, None, "1/2")  # shard 1 of 0..2
    assert part.rows == 4
    shards = set(open_table(Store(cfg.storage), "triplets").to_arrow().column("shard").to_pylist())
    assert shards == {1}
    _run(cfg, generate_flow, prompts, None, "0/2")  # shards 0 and 2
    full = _run(cfg, generate_flow, prompts)
    table = open_ref(Store(cfg.storage), full).to_arrow()
    assert full.rows == 12 and len(set(table.column("triplet_id").to_pylist())) == 12
    assert len(set(table.column("run_id").to_pylist())) == 2  # the final run wrote nothing


def test_runner_and_slice_options():
    from instaflow_core.config import OrchestrationConfig
    from instaflow_core.errors import ConfigError
    from instaflow_core.generation.shards import parse_shard_slice
    from tasks.runners import make_task_runner

    assert parse_shard_slice(None) is None and parse_shard_slice("2/8") == (2, 8)
    for bad in ("8/8", "x/2", "1"):
        with pytest.raises(ConfigError, match="shard-slice"):
            parse_shard_slice(bad)
    assert (
        type(make_task_runner(OrchestrationConfig(task_runner="process"))).__name__ == "ProcessPoolTaskRunner"
    )
    assert type(make_task_runner(OrchestrationConfig(task_runner="ray"))).__name__ == "ShardRayTaskRunner"
    with pytest.raises(ValueError, match="task_runner"):
        OrchestrationConfig(task_runner="dask")  # the untested Dask path is gone


def test_teacher_refs_point_at_external_models_without_copying(tmp_path, local_storage_cfg):
    from instaflow_core.config import ModelsConfig
    from instaflow_core.models.loading import load_model, model_geometry
    from instaflow_core.models.sd import build_tiny
    from tasks.teacher import teacher_model

    folder = build_tiny().save(tmp_path / "my-teacher")
    ref = teacher_model.fn(ModelsConfig(teacher=str(folder)), local_storage_cfg)
    assert ref.uri == f"file://{folder}" and ref.source == str(folder) and ref.kind == "teacher"
    assert not Store(local_storage_cfg).exists(Store(local_storage_cfg).uri("models"))  # nothing copied
    assert model_geometry(ref.uri, local_storage_cfg, kind=str(ref.kind)).latent_shape(None) == (4, 8, 8)
    loaded = load_model(ref, local_storage_cfg)
    assert loaded.family.name == "sd" and loaded.denoiser.config.sample_size == 8
    assert loaded.latent_shape() == (4, 8, 8)
    half = teacher_model.fn(ModelsConfig(teacher=str(folder), dtype="float16"), local_storage_cfg)
    assert half.source != ref.source  # the dtype changes outputs, so it is part of the teacher's identity
    hub = teacher_model.fn(
        ModelsConfig(teacher="someone/some-model.v1", teacher_revision="abc"), local_storage_cfg
    )
    assert hub.uri == "someone/some-model.v1" and hub.source == "someone/some-model.v1@abc"
    with pytest.raises(DataError, match="does not exist"):
        teacher_model.fn(ModelsConfig(teacher=str(tmp_path / "missing")), local_storage_cfg)
