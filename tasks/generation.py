"""Prefect tasks of the pair-making stages (teacher triplets, and the 2-RF's distillation pairs).

plan -> prepare table -> shard (mapped over the task runner) -> finish: each task is one call into the stage
object, `instaflow_core.generation.pairs.PairGeneration`, plus its cache key, retries and progress. Every task
returns small references; all four are cached on their reference and config parameters, so an unchanged rerun
is all cache hits, while a killed run resumes: the shards that finished are cache hits, the others skip the
triplet ids already committed and write the rest.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any

from prefect import task

from instaflow_core.config import ModelsConfig, StorageConfig
from instaflow_core.generation.pairs import PairGeneration, local_run_id
from instaflow_core.generation.shards import ShardSpec
from instaflow_core.generation.triplets import PairsJob
from instaflow_core.refs import ModelRef, Stage, TableRef
from tasks.artifacts import Progress, lineage_markdown, publish_markdown, run_logger
from tasks.caching import stage_cache_key
from tasks.retries import STORE_RETRIES

logger = logging.getLogger("instaflow.tasks.generation")


def current_run_id() -> str:
    """The Prefect flow run id (the `run_id` column), or a fresh id outside Prefect."""
    try:
        from prefect.runtime import flow_run

        rid = flow_run.get_id()
        if rid:
            return str(rid)
    except Exception:  # noqa: BLE001 - runtime lookups must never fail a shard
        pass
    return local_run_id()


def _task_run() -> str | None:
    """The Prefect task run id (a Ray retry of a task whose worker died keeps it), None outside a task."""
    try:
        from prefect.runtime import task_run

        return str(task_run.get_id() or "") or None
    except Exception:  # noqa: BLE001 - runtime lookups must never fail a shard
        return None


@task(cache_key_fn=stage_cache_key, persist_result=True, name="generate-plan", **STORE_RETRIES)
def plan_pairs(
    job: PairsJob, prompts: TableRef, model: ModelRef, storage_cfg: StorageConfig
) -> list[ShardSpec]:
    """The prompts table version -> sorted ids of the job's split (first max_prompts) -> shards of shard_size."""
    return PairGeneration(job, model, prompts, storage_cfg).plan()


@task(cache_key_fn=stage_cache_key, persist_result=True, name="generate-prepare-table", **STORE_RETRIES)
def prepare_pairs_table(
    job: PairsJob,
    model: ModelRef,
    prompts: TableRef,
    storage_cfg: StorageConfig,
    models_cfg: ModelsConfig | None = None,
) -> list[int]:
    """Create the output table (or check the existing one fits) and record the lineage; returns the latent shape."""
    return PairGeneration(job, model, prompts, storage_cfg, models_cfg).prepare_table()


@task(cache_key_fn=stage_cache_key, persist_result=True, name="generate-conditions", **STORE_RETRIES)
def encode_conditions(
    job: PairsJob,
    model: ModelRef,
    prompts: TableRef,
    storage_cfg: StorageConfig,
    models_cfg: ModelsConfig | None = None,
) -> TableRef:
    """Every planned prompt's text condition, computed once into the store (what training reads instead of
    running the text encoders)."""
    progress = Progress(f"{job.table}: text conditions")
    ref = PairGeneration(job, model, prompts, storage_cfg, models_cfg).encode_conditions(
        on_batch=lambda done, total: progress.update(done / max(total, 1))
    )
    logger.info("conditions %s (%d rows)", ref.key(), ref.rows)
    return ref


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

    label = f"{job.table} shard {shard.index + 1}/{shard.count}"
    # disable=None: no bar without a terminal (a Ray worker's output is a log the driver echoes)
    bar = tqdm(desc=label, unit="triplet", position=shard.index % 8, leave=False, disable=None)
    progress = Progress(label)

    def on_batch(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
        progress.update(done / max(total, 1))

    t0 = time.perf_counter()
    try:
        res = PairGeneration(job, model, prompts, storage_cfg, models_cfg).shard(
            shard, run_id=current_run_id(), task_run=_task_run(), lease_ttl_s=lease_ttl_s,
            rows_per_commit=rows_per_commit, on_batch=on_batch,
        )  # fmt: skip
    finally:
        bar.close()
    logger.info(
        "%s: %s, %d written, %d already there, %.2f triplets/s (%.1fs)",
        label, res["status"], res["written"], res["skipped"], res["rate"], time.perf_counter() - t0,
    )  # fmt: skip
    return res


@task(cache_key_fn=stage_cache_key, persist_result=True, name="generate-finish", **STORE_RETRIES)
def finish_pairs(
    job: PairsJob,
    model: ModelRef,
    prompts: TableRef,
    storage_cfg: StorageConfig,
    expected: int,
    conditions: TableRef | None = None,
) -> TableRef:
    """The final check (every expected triplet id exactly once), compaction, indexes, lineage metadata (the
    conditions table among it)."""
    return PairGeneration(job, model, prompts, storage_cfg).finish(expected, conditions)


def slice_ref(
    job: PairsJob,
    model: ModelRef,
    prompts: TableRef,
    storage_cfg: StorageConfig,
    results: list[dict[str, Any]],
    shard_slice: str,
) -> TableRef:
    """The table after one slice's shards (rows = this job's rows so far); no indexes, no completeness check."""
    ref = PairGeneration(job, model, prompts, storage_cfg).slice_ref()
    now = current_run_id()
    run_logger().info(
        "slice %s: %d shards, %d rows written now; %d rows of this job in the table",
        shard_slice, len(results), sum(r["written"] for r in results if r.get("run_id") == now), ref.rows,
    )  # fmt: skip
    return ref


@task(name="generate-preview")
def generate_preview(
    job: PairsJob,
    ref: TableRef,
    model: ModelRef,
    prompts: TableRef,
    storage_cfg: StorageConfig,
    models_cfg: ModelsConfig | None,
    n_shards: int,
) -> str:
    """A decoded sample from up to 16 shards as an inline PNG grid (markdown), saved to the store too."""
    try:
        got = PairGeneration(job, model, prompts, storage_cfg, models_cfg).preview(ref, n_shards)
    except Exception as err:  # noqa: BLE001 - a preview must never fail the stage
        run_logger().warning("no preview grid: %s", err)
        return ""
    if got is None:
        return ""
    uri, png, captions = got
    data = base64.b64encode(png).decode()
    listed = "; ".join(f"{i}: {p}" for i, p in enumerate(captions))
    return f"**a sample per shard** (`{uri}`)\n\n![samples](data:image/png;base64,{data})\n\n{listed}"


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
    stage: Stage,
) -> None:
    """Log what this run made (cache hits apart) and publish the stage's lineage artifact with the preview."""
    now = current_run_id()
    ran = [r for r in results if r.get("run_id") == now]  # the others are cache hits from earlier runs
    written = sum(r["written"] for r in ran)
    solve_s = sum(r["seconds"] for r in ran)
    rate = written / seconds if seconds > 0 else 0.0
    per_proc = {r.get("pid"): r.get("model_loads", 0) for r in sorted(ran, key=lambda r: r.get("model_loads", 0))}  # fmt: skip
    procs, loads = len(per_proc), sum(per_proc.values())  # worker processes, and the model loads they made
    run_logger().info(
        "%s: %d rows; this run made %d shards (%d cached), wrote %d triplets (%d were there): "
        "%.2f triplets/s wall, %.2f per worker-second; %d worker processes, %d model loads",
        ref.key(), ref.rows, len(ran), len(results) - len(ran), written, sum(r["skipped"] for r in ran),
        rate, written / solve_s if solve_s > 0 else 0.0, procs, loads,
    )  # fmt: skip
    extra = (
        f"{len(results)} shards, {expected} expected triplets, {written} written by this run in {seconds:.1f}s "
        f"({rate:.2f} triplets/s); solver `{job.solver.column()}`, latents {tuple(shape)}; "
        f"{procs} worker processes, {loads} model loads"
    )
    if preview:
        extra += "\n\n" + preview
    elif not ran:
        extra += "\n\nevery shard was a cache hit: the previous run's artifact shows the samples"
    # the teacher's triplets are the generate stage's artifact; distillation's pairs its own beside it
    key = f"instaflow-{stage}" if stage == Stage.GENERATE else f"instaflow-{stage}-pairs"
    label = str(stage) if stage == Stage.GENERATE else f"{stage} pairs"
    publish_markdown(
        key,
        lineage_markdown(
            label, {"prompts": prompts, "model": model, "job": ref.config_hash}, {job.table: ref}, extra
        ),
        description=f"{job.table}: lineage, rate and a sample per shard",
    )


def wrote_now(results: list[dict[str, Any]]) -> bool:
    """Did any shard run in this flow run (not a cache hit)? The preview is only worth decoding then."""
    now = current_run_id()
    return any(r.get("run_id") == now for r in results)
