"""Prefect tasks of the pair-making stages (teacher triplets, and the 2-RF's distillation pairs).

plan_pairs -> prepare_pairs_table -> pairs_shard (mapped over the task runner) -> finish_pairs. Every task
returns small references; the shard worker itself is `instaflow_core.triplets.run_shard`. All four are cached on
their reference and config parameters, so an unchanged rerun is all cache hits, while a killed run resumes: the
shards that finished are cache hits, the others skip the triplet ids already committed and write the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from prefect import task

from instaflow_core.config import ModelsConfig, StorageConfig
from instaflow_core.errors import DataError
from instaflow_core.refs import ModelRef, TableRef
from instaflow_core.store import Store, create_table, merge_rows, open_ref, open_table
from instaflow_core.triplets import (
    PairsJob,
    ShardSpec,
    check_table_schema,
    expand_jobs,
    plan_shards,
    run_filter,
    run_shard,
    select_prompt_ids,
    triplet_schema,
)
from tasks.common import Progress, stage_cache_key
from tasks.models import load_model_cached, model_latent_shape

logger = logging.getLogger("instaflow.tasks.triplets")


def _and(*parts: str | None) -> str | None:
    kept = [f"({p})" for p in parts if p]
    return " AND ".join(kept) if kept else None


def current_run_id() -> str:
    """The Prefect flow run id (the `run_id` column), or a fresh id outside Prefect."""
    try:
        from prefect.runtime import flow_run

        rid = flow_run.get_id()
        if rid:
            return str(rid)
    except Exception:  # noqa: BLE001 - runtime lookups must never fail a shard
        pass
    import uuid

    return f"local-{uuid.uuid4().hex[:12]}"


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def lineage_metadata(job: PairsJob, model: ModelRef, prompts: TableRef) -> dict[str, str]:
    """What the table's metadata records about the run that wrote it (Lance keeps it per version)."""
    return {
        "teacher": model.source,
        "teacher_uri": model.uri,
        "solver": job.solver.column(),
        "config_hash": job_hash(job),
        "prompts_table": prompts.table,
        "prompts_version": str(prompts.version),
        "prompts_ref": prompts.key(),
        "filter": run_filter(model.source, job.solver),
    }


def job_hash(job: PairsJob) -> str:
    from instaflow_core.config import stable_hash

    return stable_hash(job.model_dump(mode="json"))


# --------------------------------------------------------------------------------------------- planning
@task(cache_key_fn=stage_cache_key, persist_result=True, name="plan-pairs")
def plan_pairs(job: PairsJob, prompts: TableRef, storage_cfg: StorageConfig) -> list[ShardSpec]:
    """The prompts table version -> sorted ids of the job's split (first max_prompts) -> shards of shard_size."""
    store = Store(storage_cfg)
    table = open_ref(store, prompts)
    with store.guard(f"read prompt ids of {prompts.key()}"):
        ids = table.to_lance().to_table(columns=["prompt_id"], filter=job.split_filter()).column("prompt_id")
    ids = select_prompt_ids(ids, job.max_prompts)
    if len(ids) == 0:
        raise DataError(
            f"prompts table {prompts.key()} has no prompts in split {job.split!r}: run curation first"
        )
    shards = plan_shards(ids, job.shard_size)
    logger.info("%d prompts x %d images -> %d shards", len(ids), job.images_per_prompt, len(shards))
    return shards


@task(cache_key_fn=stage_cache_key, persist_result=True, name="prepare-pairs-table")
def prepare_pairs_table(
    job: PairsJob,
    model: ModelRef,
    prompts: TableRef,
    storage_cfg: StorageConfig,
    models_cfg: ModelsConfig | None = None,
) -> list[int]:
    """Create the output table (or check the existing one fits) and record the lineage; returns the latent shape."""
    shape = list(model_latent_shape(model, storage_cfg, models_cfg))
    store = Store(storage_cfg)
    schema = triplet_schema(shape, store_noise=job.store_noise)
    try:
        existing = open_table(store, job.table)
    except DataError:
        existing = None
    if existing is not None:
        check_table_schema(existing.schema, shape, job.store_noise, job.table)
        if "x0" in existing.schema.names and not job.store_noise:
            schema = triplet_schema(shape, store_noise=True)  # keep the table's x0 column; rows get nulls
    create_table(store, job.table, schema, metadata=lineage_metadata(job, model, prompts))
    return shape


# --------------------------------------------------------------------------------------------- solving
def make_solver(job: PairsJob, components: Any, device: str) -> Callable[[list[str], list[int]], Any]:
    """solve(prompts, seeds) -> X1 for the job's SolverSpec: the teacher's ODE or a rectified flow's Euler."""
    from instaflow_core.models import latent_shape
    from instaflow_core.teacher import noise_from_seeds, solve_rf, solve_teacher

    spec = job.solver
    if spec.kind == "teacher":

        def solve(prompts: list[str], seeds: list[int]) -> Any:
            return solve_teacher(
                components,
                prompts,
                seeds,
                steps=spec.steps,
                guidance=spec.guidance,
                scheduler=spec.scheduler,
                negative_prompt=spec.negative_prompt,
                device=device,
                mixed_precision=spec.mixed_precision,
                compile=job.compile,
            )

        return solve

    import torch

    from instaflow_core.models import UNetVelocity
    from instaflow_core.teacher import autocast

    components.to(device)
    velocity = UNetVelocity.from_components(components).eval()
    shape = latent_shape(components)

    def solve_pairs(prompts: list[str], seeds: list[int]) -> Any:
        x0 = noise_from_seeds(seeds, shape).to(device)  # (B, 4, h, w), CPU generators: device-independent
        cond = velocity.encode(prompts)
        uncond = velocity.encode([spec.negative_prompt] * len(prompts)) if spec.guidance > 1.0 else None
        with torch.no_grad(), autocast(device, spec.mixed_precision):
            x1 = solve_rf(velocity, x0, cond, uncond, steps=spec.steps, guidance=spec.guidance)
        return x1.float().cpu()

    return solve_pairs


@task(cache_key_fn=stage_cache_key, persist_result=True, name="pairs-shard")
def pairs_shard(
    job: PairsJob,
    shard: ShardSpec,
    prompts: TableRef,
    model: ModelRef,
    storage_cfg: StorageConfig,
    models_cfg: ModelsConfig | None = None,
) -> dict[str, Any]:
    """One shard: its prompts -> triplets not yet in the table -> solved in batches, merged on triplet_id."""
    from tqdm.auto import tqdm

    from instaflow_core.models import latent_shape
    from instaflow_core.teacher import noise_from_seeds

    store = Store(storage_cfg)
    ptable = open_ref(store, prompts)
    where = _and(shard.prompt_filter(), job.split_filter())
    with store.guard(f"read prompts of shard {shard.index}"):
        rows = ptable.to_lance().to_table(columns=["prompt_id", "text"], filter=where)
    pairs = list(zip(rows.column("prompt_id").to_pylist(), rows.column("text").to_pylist(), strict=True))
    jobs = expand_jobs(
        pairs,
        images_per_prompt=job.images_per_prompt,
        base_seed=job.seed,
        teacher=model.source,
        solver=job.solver,
    )
    table = open_table(store, job.table)
    device = resolve_device(job.device)
    components = load_model_cached(model, storage_cfg, models_cfg)
    shape = latent_shape(components)
    solve = make_solver(job, components, device)

    label = f"{job.table} shard {shard.index + 1}/{shard.count}"
    bar = tqdm(
        total=len(jobs), desc=label, unit="triplet", position=shard.index % 8, leave=False, mininterval=0.5
    )
    progress = Progress(label)
    last = [0]

    def on_batch(done: int, total: int) -> None:
        bar.update(done - last[0])
        last[0] = done
        progress.update(done / max(total, 1))

    t0 = time.perf_counter()
    run_id = current_run_id()
    try:
        res = run_shard(
            jobs=jobs,
            table=table,
            solve=solve,
            batch_size=job.batch_size,
            teacher=model.source,
            solver=job.solver,
            shard=shard.index,
            run_id=run_id,
            done_filter=_and(shard.prompt_filter(), run_filter(model.source, job.solver)) or "true",
            write=lambda t, r: merge_rows(t, r, "triplet_id"),
            noise=lambda seeds: noise_from_seeds(seeds, shape),
            on_batch=on_batch,
        )
    finally:
        bar.close()
    logger.info(
        "%s: %d written, %d already there, %.2f triplets/s (%.1fs)",
        label,
        res.written,
        res.skipped,
        res.rate,
        time.perf_counter() - t0,
    )
    return {
        "shard": res.shard,
        "expected": res.expected,
        "skipped": res.skipped,
        "written": res.written,
        "seconds": round(res.seconds, 3),
        "rate": round(res.rate, 3),
        "run_id": run_id,  # a cached result from an earlier run carries that run's id
    }


# --------------------------------------------------------------------------------------------- finishing
@task(cache_key_fn=stage_cache_key, persist_result=True, name="finish-pairs")
def finish_pairs(
    job: PairsJob,
    model: ModelRef,
    prompts: TableRef,
    storage_cfg: StorageConfig,
    expected: int,
) -> TableRef:
    """Indexes, lineage metadata, and the reference to the table version that holds every expected row."""
    from instaflow_core.store import set_metadata

    store = Store(storage_cfg)
    table = open_table(store, job.table)
    flt = run_filter(model.source, job.solver)
    with store.guard(f"count rows of {job.table!r}"):
        have = int(table.count_rows(flt))
    if have < expected:
        raise DataError(
            f"table {job.table!r} holds {have} of {expected} expected rows after all shards: rerun to finish"
        )
    # One small fragment per committed batch: compact them so training reads large sequential ranges. No
    # cleanup of old versions: references to earlier versions (lineage of trained models) stay readable.
    with store.guard(f"compact {job.table!r}"):
        table.to_lance().optimize.compact_files()
        table.checkout_latest()
    _ensure_indexes(table)
    set_metadata(table, {**lineage_metadata(job, model, prompts), "rows": str(have)})
    table = open_table(store, job.table)
    return TableRef(
        db_uri=store.uri("lance"),
        table=job.table,
        version=int(table.version),
        rows=have,
        config_hash=job_hash(job),
    )


def _ensure_indexes(table: Any) -> None:
    """Scalar indexes for the queries users run (the query module owns the list)."""
    try:
        from instaflow_core.store.query import ensure_indexes
    except ImportError:  # the query module is optional for writing; fall back to the id index we rely on
        from lancedb.index import BTree

        for col in ("triplet_id", "prompt_id"):
            table.create_index(col, config=BTree(), replace=True)
        return
    ensure_indexes(table)
