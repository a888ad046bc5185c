"""Training throughput on the tiny preset: samples/s and the share of step time spent waiting on data.

    .venv/bin/python benchmarks/train_throughput.py [--rows 256] [--steps 60] [--batch-size 8] [--stage reflow]

Builds a triplets table with the tiny teacher (DPM-Solver++, a few steps) in a temporary file:// store (or
`--root`), then trains the tiny 2-RF student through the real path: `TripletDataset` over the Lance table ->
the batch factory of the training stage -> `instaflow_core.training.train` (checkpoints included). For
comparison it trains again from the same batches held in memory (no data loading), which gives the step time
the model alone needs. Numbers are per optimizer step (batch-size samples), averaged over the log windows after
the first (warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_table(root: str, rows: int, steps: int) -> tuple:
    """A `triplets` table of `rows` rows from the tiny teacher, and its saved folder: (TableRef, ModelRef)."""
    from instaflow_core.config import StorageConfig, TinyModelConfig
    from instaflow_core.generation.shards import ShardWorker
    from instaflow_core.generation.solvers import teacher_latents
    from instaflow_core.generation.triplets import SolverSpec, expand_jobs, triplet_schema
    from instaflow_core.models.sd import build_tiny
    from instaflow_core.refs import ModelRef
    from instaflow_core.store import Store, create_table, merge_rows, open_table, table_ref

    storage = StorageConfig(root=root)
    store = Store(storage)
    model = build_tiny(TinyModelConfig())
    with tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp) / "teacher")
        store.put_dir(Path(tmp) / "teacher", store.uri("models", "teacher-bench"), clean=True)
    teacher = ModelRef(uri=store.uri("models", "teacher-bench"), kind="teacher", source="tiny-bench")
    solver = SolverSpec(kind="teacher", scheduler="dpmsolver++", steps=steps, guidance=5.0)
    create_table(
        store, "triplets", triplet_schema(model.latent_shape()), metadata={"teacher": teacher.source}
    )
    table = open_table(store, "triplets")
    n_prompts = max(1, rows // 2)
    prompts = [(f"{i:06d}", f"a photo of object number {i} on a table") for i in range(n_prompts)]
    jobs = expand_jobs(prompts, images_per_prompt=2, base_seed=0, teacher=teacher.source, solver=solver)[
        :rows
    ]
    ShardWorker(
        table=table,
        solve=lambda p, s: teacher_latents(model, p, s, steps=steps, guidance=5.0),
        teacher=teacher.source,
        solver=solver,
        batch_size=32,
        run_id="bench",
        write=lambda t, r: merge_rows(t, r, "triplet_id"),
    ).run(jobs, 0, "true")
    return storage, table_ref(store, "triplets"), teacher


def summarise(history: list[dict]) -> tuple[float, float]:
    """(samples/s, data-wait share) averaged over the log windows after the first."""
    rows = history[1:] or history
    return statistics.mean(r["samples_per_s"] for r in rows), statistics.mean(
        r["data_wait_share"] for r in rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--teacher-steps", type=int, default=4)
    parser.add_argument("--stage", choices=["reflow", "distill"], default="reflow")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--root", default=None, help="store root (default: a temporary folder)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from instaflow_core.config import TrainConfig, TrainStageConfig
    from instaflow_core.store import Store
    from instaflow_core.training import BatchRequest, train
    from instaflow_core.training.job import triplet_batches
    from instaflow_core.training.losses import distill_batch_loss, reflow_batch_loss
    from instaflow_core.training.student import ConditionCache, load_student

    tmp = tempfile.TemporaryDirectory(prefix="instaflow-bench-")
    root = args.root or f"file://{tmp.name}/store"
    t0 = time.perf_counter()
    storage, table, teacher = build_table(root, args.rows, args.teacher_steps)
    print(f"table: {table.rows} triplets in {time.perf_counter() - t0:.1f}s ({table.key()})")

    cfg = TrainConfig(
        stages=[TrainStageConfig(steps=args.steps, batch_size=args.batch_size, loss="l2")],
        lr=1e-4,
        warmup_steps=5,
        ema_decay=0.99,
        checkpoint_every=max(args.steps // 2, 1),
        log_every=max(args.steps // 6, 1),
    )
    store = Store(storage)
    base = store.local_copy(teacher.uri)
    factory = triplet_batches(table, storage)

    def run(label: str, batches, ckpt: str) -> tuple[float, float]:
        student = load_student(base)
        student.denoiser.requires_grad_(True).train()  # as TrainJob.run sets the student up
        model = student.velocity()
        embed = ConditionCache(student)
        loss = reflow_batch_loss(embed) if args.stage == "reflow" else distill_batch_loss(embed)
        torch.manual_seed(0)
        start = time.perf_counter()
        result = train(model, batches, loss, cfg, store.uri("checkpoints", ckpt), store=store)
        wall = time.perf_counter() - start
        sps, wait = summarise(result.history)
        print(
            f"{label:28s} {sps:8.1f} samples/s   data wait {100 * wait:5.1f}% of step time   "
            f"({result.steps} steps x {args.batch_size} in {wall:.1f}s incl. checkpoints, final loss "
            f"{result.final_loss:.4f}, text-embedding cache {embed.hits} hits / {embed.misses} misses)"
        )
        return sps, wait

    sps_data, wait_data = run("TripletDataset (Lance)", factory, "bench-lance")
    # the same micro-batches, read once up front: the model-only step time
    req = BatchRequest(0, cfg.stages[0], args.batch_size, 0, 0, 1, cfg.seed)
    it = iter(factory(req))
    cached = [next(it) for _ in range(args.steps)]
    sps_mem, wait_mem = run("in-memory batches", cached, "bench-memory")
    print(
        f"\nstage {args.stage}, tiny preset, batch {args.batch_size}, {torch.get_num_threads()} torch threads: "
        f"{sps_data:.1f} samples/s with data loading ({100 * wait_data:.1f}% waiting on data), "
        f"{sps_mem:.1f} samples/s from memory (a {100 * (1 - sps_data / sps_mem):+.1f}% difference between two "
        "runs, which on a shared CPU is mostly run-to-run noise: the data-wait share is measured inside each step)"
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()
