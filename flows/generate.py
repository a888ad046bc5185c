"""Stage 2: the teacher turns (prompt, seed) into triplets (prompt, X0 seed, X1), sharded and exactly-once.

    prompts table version -> plan (sorted prompt ids, shards of N prompts) -> prepare the table (schema, lineage)
    -> one `pairs-shard` task run per shard, mapped over the task runner -> indexes, metadata -> TableRef

`run_pairs` is the stage's body without the config plumbing: the distillation stage calls it with a
`PairsJob.from_distill_pairs(...)` (Euler steps of the 2-RF, table `distill_pairs`) and gets the same sharding,
resumption and artifacts. Run on a GPU cluster: see infra/GPU_CLUSTER.md.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import as_completed

from instaflow_core.config import InstaflowConfig, ModelsConfig, OrchestrationConfig, StorageConfig
from instaflow_core.errors import ConfigError
from instaflow_core.refs import ModelRef, TableRef
from instaflow_core.triplets import PairsJob
from tasks.common import Progress, lineage_markdown, publish_markdown
from tasks.models import teacher_model
from tasks.triplets import current_run_id, finish_pairs, pairs_shard, plan_pairs, prepare_pairs_table

logger = logging.getLogger("instaflow.flows.generate")


def make_task_runner(orchestration: OrchestrationConfig) -> Any:
    """orchestration.task_runner -> a Prefect task runner: threads (one process, one shared model; torch releases
    the GIL), a process pool (spawned workers, one model copy each) or a Dask cluster (prefect-dask)."""
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    if orchestration.task_runner == "process":
        return ProcessPoolTaskRunner(max_workers=orchestration.max_workers)
    if orchestration.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise ConfigError(
                "orchestration.task_runner=dask needs the prefect-dask package: pip install prefect-dask "
                "(and dask-cuda for GPU workers); see infra/GPU_CLUSTER.md"
            ) from None
        if orchestration.dask_address:
            return DaskTaskRunner(address=orchestration.dask_address)
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": orchestration.max_workers, "threads_per_worker": 1}
        )
    return ThreadPoolTaskRunner(max_workers=orchestration.max_workers)


def parse_shard_slice(shard_slice: str | None) -> tuple[int, int] | None:
    """'i/N' -> (i, N): this run makes only the shards whose index % N == i (None: all shards)."""
    if not shard_slice:
        return None
    try:
        i, n = (int(x) for x in shard_slice.split("/"))
    except ValueError:
        raise ConfigError(f"--shard-slice {shard_slice!r}: use i/N, e.g. 0/8") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard-slice {shard_slice!r}: need 0 <= i < N")
    return i, n


def _log() -> Any:
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run
        return logger


def run_pairs(
    job: PairsJob,
    prompts: TableRef,
    model: ModelRef,
    storage_cfg: StorageConfig,
    orchestration_cfg: OrchestrationConfig,
    models_cfg: ModelsConfig | None = None,
    *,
    artifact_key: str = "instaflow-triplets",
    stage: str = "generate",
    shard_slice: str | None = None,
) -> TableRef:
    """Plan, prepare, map the shards over the configured task runner, finish. Call inside a flow.

    `shard_slice="i/N"` makes only every N-th shard starting at i (N independent runs, e.g. one per GPU node,
    share the work) and returns the table as it is, without the completeness check; a final run without a
    slice finds every shard done, then indexes the table and returns the complete reference.
    """
    log = _log()
    t0 = time.perf_counter()
    sliced = parse_shard_slice(shard_slice)
    all_shards = plan_pairs(job, prompts, storage_cfg)
    shape = prepare_pairs_table(job, model, prompts, storage_cfg, models_cfg)
    expected = sum(s.n_prompts for s in all_shards) * job.images_per_prompt
    shards = [s for s in all_shards if sliced is None or s.index % sliced[1] == sliced[0]]
    log.info(
        "%s: %d shards, %d triplets expected, latents %s, solver %s, runner %s x%d",
        job.table,
        len(shards),
        expected,
        tuple(shape),
        job.solver.column(),
        orchestration_cfg.task_runner,
        orchestration_cfg.max_workers,
    )

    from tqdm.auto import tqdm

    overall = Progress(f"{job.table}: shards done")
    bar = tqdm(total=len(shards), desc=f"{job.table} shards", unit="shard", position=0)
    results: list[dict[str, Any]] = []
    with make_task_runner(orchestration_cfg) as runner:
        futures = [
            runner.submit(
                pairs_shard,
                parameters={
                    "job": job,
                    "shard": shard,
                    "prompts": prompts,
                    "model": model,
                    "storage_cfg": storage_cfg,
                    "models_cfg": models_cfg,
                },
            )
            for shard in shards
        ]
        for fut in as_completed(futures):
            results.append(fut.result())  # re-raises a failed shard's error (the others' commits stay)
            bar.update(1)
            overall.update(len(results) / max(len(shards), 1))
    bar.close()

    if sliced is not None:
        return _slice_ref(job, model, storage_cfg, shards, results, shard_slice or "")
    ref = finish_pairs(job, model, prompts, storage_cfg, expected)
    seconds = time.perf_counter() - t0
    now = current_run_id()
    ran = [r for r in results if r.get("run_id") == now]  # the others are cache hits from earlier runs
    written = sum(r["written"] for r in ran)
    solve_s = sum(r["seconds"] for r in ran)
    rate = written / seconds if seconds > 0 else 0.0
    log.info(
        "%s: %d rows; this run made %d shards (%d cached), wrote %d triplets (%d were there): "
        "%.2f triplets/s wall, %.2f per worker-second",
        ref.key(),
        ref.rows,
        len(ran),
        len(results) - len(ran),
        written,
        sum(r["skipped"] for r in ran),
        rate,
        written / solve_s if solve_s > 0 else 0.0,
    )
    extra = (
        f"{len(shards)} shards, {expected} expected triplets, {written} written by this run in {seconds:.1f}s "
        f"({rate:.2f} triplets/s); solver `{job.solver.column()}`, latents {tuple(shape)}"
    )
    # the preview decodes latents with the model: only worth it when this run wrote something
    preview = _preview(ref, model, storage_cfg, models_cfg, len(shards)) if ran else ""
    if preview:
        extra += "\n\n" + preview
    elif not ran:
        extra += "\n\nevery shard was a cache hit: the previous run's artifact shows the samples"
    publish_markdown(
        artifact_key,
        lineage_markdown(
            stage,
            {"prompts": prompts, "model": model, "job": ref.config_hash},
            {job.table: ref},
            extra,
        ),
        description=f"{job.table}: lineage, rate and a sample per shard",
    )
    return ref


def _slice_ref(
    job: PairsJob,
    model: ModelRef,
    storage_cfg: StorageConfig,
    shards: list[Any],
    results: list[dict[str, Any]],
    shard_slice: str,
) -> TableRef:
    """The table after one slice's shards (rows = this job's rows so far); no indexes, no completeness check."""
    from instaflow_core.store import Store, open_table
    from instaflow_core.triplets import run_filter
    from tasks.triplets import job_hash

    store = Store(storage_cfg)
    table = open_table(store, job.table)
    rows = int(table.count_rows(run_filter(model.source, job.solver)))
    _log().info(
        "slice %s: %d shards, %d rows written now; %d rows of this job in the table",
        shard_slice,
        len(shards),
        sum(r["written"] for r in results if r.get("run_id") == current_run_id()),
        rows,
    )
    return TableRef(
        db_uri=store.uri("lance"),
        table=job.table,
        version=int(table.version),
        rows=rows,
        config_hash=job_hash(job),
    )


def _preview(
    ref: TableRef, model: ModelRef, storage_cfg: StorageConfig, models_cfg: ModelsConfig | None, n_shards: int
) -> str:
    """A decoded sample from up to 16 shards as an inline PNG grid (markdown), saved to the store too."""
    try:
        import numpy as np
        from PIL import Image

        from instaflow_core.store import Store, open_ref
        from instaflow_core.teacher import decode_latents
        from instaflow_core.triplets import rows_to_latents
        from tasks.models import load_model_cached

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
        first = {}
        for i, s in enumerate(rows.column("shard").to_pylist()):
            first.setdefault(s, i)
        rows = rows.take(sorted(first.values()))
        shape = rows.column("latent_shape")[0].as_py()
        import torch

        x1 = torch.from_numpy(rows_to_latents(rows.column("x1"), shape).astype(np.float32))
        vae = load_model_cached(model, storage_cfg, models_cfg).vae
        images = decode_latents(vae, x1)  # (n, H, W, 3) uint8
        n, h, w, _ = images.shape
        cols = min(n, 8)
        grid = np.zeros(((n + cols - 1) // cols * h, cols * w, 3), np.uint8)
        for i, img in enumerate(images):
            r, c = divmod(i, cols)
            grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
        scale = max(1, 64 // h)
        pil = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        uri = store.uri("previews", f"{ref.table}-v{ref.version}.png")
        store.write_bytes(uri, buf.getvalue())
        captions = "; ".join(f"{i}: {p}" for i, p in enumerate(rows.column("prompt").to_pylist()))
        data = base64.b64encode(buf.getvalue()).decode()
        return f"**a sample per shard** (`{uri}`)\n\n![samples](data:image/png;base64,{data})\n\n{captions}"
    except Exception as err:  # noqa: BLE001 - a preview must never fail the stage
        _log().warning("no preview grid: %s", err)
        return ""


@flow(name="instaflow-generate")
def generate_flow(
    cfg: InstaflowConfig, prompts: TableRef, teacher: ModelRef | None = None, shard_slice: str | None = None
) -> TableRef:
    """Prompts table version + teacher -> the `triplets` table version holding every (prompt, seed) triplet.

    Reads `generation`, `models`, `storage` and `orchestration` (task runner, workers). `shard_slice` ("i/N")
    makes only every N-th shard (several runs share the work; see infra/GPU_CLUSTER.md).
    """
    if teacher is None:
        teacher = teacher_model(cfg.models, cfg.storage)
    job = PairsJob.from_generation(cfg.generation)
    return run_pairs(
        job, prompts, teacher, cfg.storage, cfg.orchestration, cfg.models, shard_slice=shard_slice
    )
