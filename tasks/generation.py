"""Prefect tasks of the pair-making stages (teacher triplets, and the 2-RF's distillation pairs).

plan_pairs -> prepare_pairs_table -> pairs_shard (mapped over the task runner) -> finish_pairs. Every task
returns small references; the shard worker itself is `instaflow_core.generation.shards.run_shard`. All four are cached on
their reference and config parameters, so an unchanged rerun is all cache hits, while a killed run resumes: the
shards that finished are cache hits, the others skip the triplet ids already committed and write the rest.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from prefect import task

from instaflow_core.config import ModelsConfig, StorageConfig
from instaflow_core.errors import DataError
from instaflow_core.generation import exactly_once as eo
from instaflow_core.generation.shards import (
    ShardSpec,
    parse_shard_slice,  # noqa: F401 - flows use it from here
    plan_shards,
    run_shard,
    select_prompt_ids,
)
from instaflow_core.generation.solvers import make_solver, resolve_device
from instaflow_core.generation.triplets import (
    PairsJob,
    check_table_schema,
    expand_jobs,
    run_filter,
    triplet_schema,
)
from instaflow_core.models.loading import load_model_cached, times_loaded
from instaflow_core.models.sources import model_geometry
from instaflow_core.refs import ModelRef, TableRef
from instaflow_core.store import Store, create_table, merge_rows, open_ref, open_table
from tasks.artifacts import Progress, run_logger
from tasks.caching import stage_cache_key
from tasks.retries import STORE_RETRIES

logger = logging.getLogger("instaflow.tasks.generation")


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
@task(cache_key_fn=stage_cache_key, persist_result=True, name="generate-plan", **STORE_RETRIES)
def plan_pairs(job: PairsJob, prompts: TableRef, storage_cfg: StorageConfig) -> list[ShardSpec]:
    """The prompts table version -> sorted ids of the job's split (first max_prompts) -> shards of shard_size."""
    ids = _planned_prompt_ids(job, prompts, Store(storage_cfg))
    if len(ids) == 0:
        raise DataError(
            f"prompts table {prompts.key()} has no prompts in split {job.split!r}: run curation first"
        )
    shards = plan_shards(ids, job.pairs.shard_size)
    logger.info("%d prompts x %d images -> %d shards", len(ids), job.pairs.images_per_prompt, len(shards))
    return shards


def _planned_prompt_ids(job: PairsJob, prompts: TableRef, store: Store) -> Any:
    """The sorted prompt ids of the job's split, first max_prompts: what the plan shards (and finish expects)."""
    table = open_ref(store, prompts)
    with store.guard(f"read prompt ids of {prompts.key()}"):
        ids = table.to_lance().to_table(columns=["prompt_id"], filter=job.split_filter()).column("prompt_id")
    return select_prompt_ids(ids, job.pairs.max_prompts)


@task(cache_key_fn=stage_cache_key, persist_result=True, name="generate-prepare-table", **STORE_RETRIES)
def prepare_pairs_table(
    job: PairsJob,
    model: ModelRef,
    prompts: TableRef,
    storage_cfg: StorageConfig,
    models_cfg: ModelsConfig | None = None,
) -> list[int]:
    """Create the output table (or check the existing one fits) and record the lineage; returns the latent shape."""
    geometry = model_geometry(model.uri, storage_cfg, models_cfg, kind=str(model.kind))
    shape = list(geometry.latent_shape(job.pairs.resolution, f"{job.table} resolution"))
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
    at = {
        "resolution": str(geometry.resolution_of(shape)),
        "latent_shape": json.dumps(shape),
    }  # what it holds
    table = create_table(store, job.table, schema, metadata={**lineage_metadata(job, model, prompts), **at})
    with store.guard(f"upgrade {job.table!r}"):  # a table made before the key declaration (exactly-once.md)
        eo.upgrade_table(table)
    return shape


# --------------------------------------------------------------------------------------------- solving


@task(cache_key_fn=stage_cache_key, persist_result=True, name="generate-shard", **STORE_RETRIES)
def pairs_shard(
    job: PairsJob,
    shard: ShardSpec,
    prompts: TableRef,
    model: ModelRef,
    storage_cfg: StorageConfig,
    models_cfg: ModelsConfig | None = None,
    lease_ttl_s: float = 60.0,
    rows_per_commit: int | None = None,
) -> dict[str, Any]:
    """One shard, under its lease: its prompts -> triplets not yet in the table -> solved in batches, merged on
    the declared key triplet_id (exactly-once with any number of writers: docs/exactly-once.md)."""
    from tqdm.auto import tqdm

    from instaflow_core.models.loading import latent_shape
    from instaflow_core.models.switches import switch_on
    from instaflow_core.rectified_flow import noise_from_seeds

    store = Store(storage_cfg)
    ptable = open_ref(store, prompts)
    where = _and(shard.prompt_filter(), job.split_filter())
    with store.guard(f"read prompts of shard {shard.index}"):
        rows = ptable.to_lance().to_table(columns=["prompt_id", "text"], filter=where)
    pairs = list(zip(rows.column("prompt_id").to_pylist(), rows.column("text").to_pylist(), strict=True))
    jobs = expand_jobs(
        pairs,
        images_per_prompt=job.pairs.images_per_prompt,
        base_seed=job.pairs.seed,
        teacher=model.source,
        solver=job.solver,
    )
    table = open_table(store, job.table)
    device = resolve_device(job.device)
    components = load_model_cached(model, storage_cfg, models_cfg)
    worker = {"pid": os.getpid(), "model_loads": times_loaded(model, storage_cfg, models_cfg)}
    shape = latent_shape(components, job.pairs.resolution)
    solve = make_solver(job, components, device)

    label = f"{job.table} shard {shard.index + 1}/{shard.count}"
    bar = tqdm(  # disable=None: no bar without a terminal (a Ray worker's output is a log the driver echoes)
        total=len(jobs), desc=label, unit="triplet", position=shard.index % 8, leave=False, disable=None,
    )  # fmt: skip
    progress = Progress(label)
    last = [0]

    def on_batch(done: int, total: int) -> None:
        bar.update(done - last[0])
        last[0] = done
        progress.update(done / max(total, 1))

    t0 = time.perf_counter()
    run_id = current_run_id()
    claims = eo.job_claims(store, job, model.source, prompts.key(), lease_ttl_s)
    try:
        res = run_shard(
            jobs=jobs,
            table=table,
            solve=solve,
            batch_size=job.pairs.batch_size,
            teacher=model.source,
            solver=job.solver,
            shard=shard.index,
            run_id=run_id,
            done_filter=_and(shard.prompt_filter(), run_filter(model.source, job.solver)) or "true",
            write=lambda t, r: merge_rows(t, r, "triplet_id"),
            noise=lambda seeds: noise_from_seeds(seeds, shape),
            on_batch=on_batch,
            async_write=switch_on(job.async_write, device),
            claim=eo.shard_claim(claims, shard, _task_run()),
            rows_per_commit=rows_per_commit,
        )
    finally:
        bar.close()
    logger.info(
        "%s: %s, %d written, %d already there, %.2f triplets/s (%.1fs)",
        label, res.status, res.written, res.skipped, res.rate, time.perf_counter() - t0,
    )  # fmt: skip
    return {
        "shard": res.shard,
        "expected": res.expected,
        "skipped": res.skipped,
        "written": res.written,
        "seconds": round(res.seconds, 3),
        "rate": round(res.rate, 3),
        "status": res.status,
        **worker,  # which process ran it, and how often that process has loaded the model
        "run_id": run_id,  # a cached result from an earlier run carries that run's id
    }


# --------------------------------------------------------------------------------------------- finishing
@task(cache_key_fn=stage_cache_key, persist_result=True, name="generate-finish", **STORE_RETRIES)
def finish_pairs(
    job: PairsJob,
    model: ModelRef,
    prompts: TableRef,
    storage_cfg: StorageConfig,
    expected: int,
) -> TableRef:
    """The final check (every expected triplet id exactly once, under the table's finish lease; surplus copies
    from rule-breaking writers removed), compaction, indexes, lineage metadata, and the reference."""
    from instaflow_core.store import set_metadata
    from instaflow_core.store.commits import retry_commit
    from instaflow_core.store.query import ensure_indexes

    store = Store(storage_cfg)
    table = open_table(store, job.table)
    ids = eo.expected_triplet_ids(_planned_prompt_ids(job, prompts, store).to_pylist(), job, model.source)
    if len(ids) != expected:
        raise DataError(f"{job.table!r}: the plan expects {expected} triplets, its prompts give {len(ids)}")
    claims = eo.job_claims(store, job, model.source, prompts.key(), ttl=120.0)
    with store.guard(f"verify {job.table!r}"):
        check = eo.verify_pairs(table, claims, ids, model.source, job)
    have = check["rows"]
    # One small fragment per committed batch: compact them so training reads large sequential ranges. No
    # cleanup of old versions: references to earlier versions (lineage of trained models) stay readable.
    with store.guard(f"compact {job.table!r}"):
        retry_commit(lambda: table.to_lance().optimize.compact_files(), f"compact {job.table!r}",
                     on_retry=table.checkout_latest)  # fmt: skip
        table.checkout_latest()
        # the query module owns the index list (none on the merge key)
        retry_commit(lambda: ensure_indexes(table), f"index {job.table!r}", on_retry=table.checkout_latest)
    verified = {k: check[k] for k in ("expected", "rows", "duplicates", "removed", "missing_count")}
    set_metadata(table, {**lineage_metadata(job, model, prompts), "rows": str(have), "verified": verified})
    table = open_table(store, job.table)
    return TableRef(
        db_uri=store.ref("lance"),
        table=job.table,
        version=int(table.version),
        rows=have,
        config_hash=job_hash(job),
    )


def _task_run() -> str | None:
    """The Prefect task run id (a Ray retry of a task whose worker died keeps it), None outside a task."""
    try:
        from prefect.runtime import task_run

        return str(task_run.get_id() or "") or None
    except Exception:  # noqa: BLE001 - runtime lookups must never fail a shard
        return None


def slice_ref(
    job: PairsJob,
    model: ModelRef,
    storage_cfg: StorageConfig,
    shards: list[Any],
    results: list[dict[str, Any]],
    shard_slice: str,
) -> TableRef:
    """The table after one slice's shards (rows = this job's rows so far); no indexes, no completeness check."""
    store = Store(storage_cfg)
    table = open_table(store, job.table)
    rows = int(table.count_rows(run_filter(model.source, job.solver)))
    run_logger().info(
        "slice %s: %d shards, %d rows written now; %d rows of this job in the table",
        shard_slice,
        len(shards),
        sum(r["written"] for r in results if r.get("run_id") == current_run_id()),
        rows,
    )
    return TableRef(
        db_uri=store.ref("lance"),
        table=job.table,
        version=int(table.version),
        rows=rows,
        config_hash=job_hash(job),
    )
