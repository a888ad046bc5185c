"""Prefect tasks of the pair-making stages (teacher triplets, and the 2-RF's distillation pairs).

plan_pairs -> prepare_pairs_table -> pairs_shard (mapped over the task runner) -> finish_pairs. Every task
returns small references; the shard worker itself is `instaflow_core.generation.shards.run_shard`. All four are cached on
their reference and config parameters, so an unchanged rerun is all cache hits, while a killed run resumes: the
shards that finished are cache hits, the others skip the triplet ids already committed and write the rest.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any

from prefect import task

from instaflow_core.config import ModelsConfig, StorageConfig
from instaflow_core.errors import ConfigError, DataError
from instaflow_core.generation.shards import ShardSpec, plan_shards, run_shard, select_prompt_ids
from instaflow_core.generation.solvers import make_solver, resolve_device
from instaflow_core.generation.triplets import (
    PairsJob,
    check_table_schema,
    expand_jobs,
    run_filter,
    triplet_schema,
)
from instaflow_core.models.loading import load_model_cached, model_latent_shape
from instaflow_core.refs import ModelRef, TableRef
from instaflow_core.store import Store, create_table, merge_rows, open_ref, open_table
from tasks.artifacts import Progress, lineage_markdown, publish_markdown, run_logger
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
    store = Store(storage_cfg)
    table = open_ref(store, prompts)
    with store.guard(f"read prompt ids of {prompts.key()}"):
        ids = table.to_lance().to_table(columns=["prompt_id"], filter=job.split_filter()).column("prompt_id")
    ids = select_prompt_ids(ids, job.pairs.max_prompts)
    if len(ids) == 0:
        raise DataError(
            f"prompts table {prompts.key()} has no prompts in split {job.split!r}: run curation first"
        )
    shards = plan_shards(ids, job.pairs.shard_size)
    logger.info("%d prompts x %d images -> %d shards", len(ids), job.pairs.images_per_prompt, len(shards))
    return shards


@task(cache_key_fn=stage_cache_key, persist_result=True, name="generate-prepare-table", **STORE_RETRIES)
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


@task(cache_key_fn=stage_cache_key, persist_result=True, name="generate-shard", **STORE_RETRIES)
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

    from instaflow_core.models.loading import latent_shape
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
            batch_size=job.pairs.batch_size,
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
@task(cache_key_fn=stage_cache_key, persist_result=True, name="generate-finish", **STORE_RETRIES)
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
        db_uri=store.ref("lance"),
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


def parse_shard_slice(shard_slice: str | None) -> tuple[int, int] | None:
    """'i/N' -> (i, N): this run makes only the shards whose index % N == i (None: all shards)."""
    if not shard_slice:
        return None
    try:
        i, n = (int(x) for x in shard_slice.split("/"))
    except ValueError as err:
        raise ConfigError(f"--shard-slice {shard_slice!r}: use i/N, e.g. 0/8") from err
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard-slice {shard_slice!r}: need 0 <= i < N")
    return i, n


@task(name="generate-preview")
def generate_preview(
    ref: TableRef, model: ModelRef, storage_cfg: StorageConfig, models_cfg: ModelsConfig | None, n_shards: int
) -> str:
    """A decoded sample from up to 16 shards as an inline PNG grid (markdown), saved to the store too."""
    try:
        import numpy as np
        import torch

        from instaflow_core.generation.triplets import rows_to_latents
        from instaflow_core.inference.images import decode_latents, image_grid, png_bytes

        store = Store(storage_cfg)
        table = open_ref(store, ref)
        shards = list(range(min(n_shards, 16)))
        rows = (
            table.search()
            .where(f"shard IN ({','.join(map(str, shards))})")
            .select(["shard", "prompt", "x1", "latent_shape"])
            .limit(None)
            .to_arrow()
        )
        if rows.num_rows == 0:
            return ""
        first: dict[int, int] = {}
        for i, s in enumerate(rows.column("shard").to_pylist()):
            first.setdefault(s, i)
        rows = rows.take(sorted(first.values()))
        shape = rows.column("latent_shape")[0].as_py()
        x1 = torch.from_numpy(rows_to_latents(rows.column("x1"), shape).astype(np.float32))
        images = decode_latents(load_model_cached(model, storage_cfg, models_cfg).vae, x1)  # (n, H, W, 3)
        png = png_bytes(image_grid(images, min(len(images), 8), min_side=64))
        uri = store.uri("previews", f"{ref.table}-v{ref.version}.png")
        store.write_bytes(uri, png)
        captions = "; ".join(f"{i}: {p}" for i, p in enumerate(rows.column("prompt").to_pylist()))
        data = base64.b64encode(png).decode()
        return f"**a sample per shard** (`{uri}`)\n\n![samples](data:image/png;base64,{data})\n\n{captions}"
    except Exception as err:  # noqa: BLE001 - a preview must never fail the stage
        run_logger().warning("no preview grid: %s", err)
        return ""


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


def report_pairs(
    job: PairsJob,
    ref: TableRef,
    prompts: TableRef,
    model: ModelRef,
    results: list[dict[str, Any]],
    *,
    expected: int,
    shape: list[int],
    seconds: float,
    preview: str,
    artifact_key: str,
    stage: str,
) -> None:
    """Log what this run made (cache hits apart) and publish the stage's lineage artifact with the preview."""
    now = current_run_id()
    ran = [r for r in results if r.get("run_id") == now]  # the others are cache hits from earlier runs
    written = sum(r["written"] for r in ran)
    solve_s = sum(r["seconds"] for r in ran)
    rate = written / seconds if seconds > 0 else 0.0
    run_logger().info(
        "%s: %d rows; this run made %d shards (%d cached), wrote %d triplets (%d were there): "
        "%.2f triplets/s wall, %.2f per worker-second",
        ref.key(), ref.rows, len(ran), len(results) - len(ran), written, sum(r["skipped"] for r in ran),
        rate, written / solve_s if solve_s > 0 else 0.0,
    )  # fmt: skip
    extra = (
        f"{len(results)} shards, {expected} expected triplets, {written} written by this run in {seconds:.1f}s "
        f"({rate:.2f} triplets/s); solver `{job.solver.column()}`, latents {tuple(shape)}"
    )
    if preview:
        extra += "\n\n" + preview
    elif not ran:
        extra += "\n\nevery shard was a cache hit: the previous run's artifact shows the samples"
    publish_markdown(
        artifact_key,
        lineage_markdown(
            stage, {"prompts": prompts, "model": model, "job": ref.config_hash}, {job.table: ref}, extra
        ),
        description=f"{job.table}: lineage, rate and a sample per shard",
    )


def wrote_now(results: list[dict[str, Any]]) -> bool:
    """Did any shard run in this flow run (not a cache hit)? The preview is only worth decoding then."""
    now = current_run_id()
    return any(r.get("run_id") == now for r in results)
