"""What a generation run shows: a decoded sample per shard (the preview grid) and the stage's lineage artifact
with its rates. Shared by triplet generation and distillation's pair generation (flows/pairs.py)."""

from __future__ import annotations

import base64
from typing import Any

from prefect import task

from instaflow_core.config import ModelsConfig, StorageConfig
from instaflow_core.generation.triplets import PairsJob
from instaflow_core.models.loading import load_model_cached
from instaflow_core.refs import ModelRef, TableRef
from instaflow_core.store import Store, open_ref
from tasks.artifacts import lineage_markdown, publish_markdown, run_logger
from tasks.generation import current_run_id


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
