"""Triplet generation rate on the tiny preset: our batched `teacher_latents` (and the whole shard worker, Lance
writes included) vs diffusers' `StableDiffusionPipeline(output_type="latent")` on the same components, prompts,
seeds, scheduler, steps and guidance. Prints triplets/s and ratios, asserts nothing.

The pipeline is called two ways: one prompt per call (the loop public pair-generation scripts run, one latent
and one noise file per sample) and a batch of prompts per call with a list of per-sample generators (its best
case). Both solve the same ODE from the same X0 (CPU generator per seed), so the outputs are compared too.

    .venv/bin/python benchmarks/generation_rate.py [--prompts 64] [--batch 8] [--steps 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import lancedb
import torch
from diffusers import StableDiffusionPipeline

from instaflow_core.config import load
from instaflow_core.generation.shards import ShardWorker
from instaflow_core.generation.solvers import teacher_latents
from instaflow_core.generation.triplets import PairsJob, expand_jobs, triplet_schema
from instaflow_core.models.sd import build_tiny, make_scheduler


def rate(fn, n: int, repeats: int = 2) -> float:
    """triplets/s of fn() making n triplets: best of `repeats` after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument(
        "--batch", type=int, default=None, help="default: the tiny preset's generation.batch_size"
    )
    ap.add_argument("--steps", type=int, default=None, help="default: the tiny preset's num_inference_steps")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: on a shared 2-core machine OpenMP spin-waits make small ops 40x slower)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load("tiny")
    gen = cfg.generation
    batch = args.batch or gen.batch_size
    steps = args.steps or gen.num_inference_steps
    job = PairsJob.from_generation(gen.model_copy(update={"batch_size": batch}))
    model = build_tiny(cfg.models.tiny)
    shape = model.latent_shape()
    prompts = [f"a photo of thing {i}, style {i % 7}" for i in range(args.prompts)]
    jobs = expand_jobs(
        [(f"{i:08x}", p) for i, p in enumerate(prompts)],
        images_per_prompt=1,
        base_seed=0,
        teacher="tiny",
        solver=job.solver,
    )
    texts, seeds = [j.prompt for j in jobs], [j.seed for j in jobs]
    n = len(jobs)
    kw = dict(
        steps=steps, guidance=gen.guidance_scale, scheduler=gen.scheduler, negative_prompt=gen.negative_prompt
    )
    print(
        f"tiny preset: latents {shape}, {gen.scheduler} {steps} steps, guidance {gen.guidance_scale}, {n} prompts, "
        f"batch {batch}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )

    def ours() -> torch.Tensor:
        return torch.cat(
            [
                teacher_latents(model, texts[i : i + batch], seeds[i : i + batch], **kw)
                for i in range(0, n, batch)
            ]
        )

    pipe = StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model["text_encoder"],
        tokenizer=model["tokenizer"],
        unet=model.denoiser,
        scheduler=make_scheduler(gen.scheduler, model.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    side = shape[1] * pipe.vae_scale_factor

    def diffusers_call(ps: list[str], ss: list[int]) -> torch.Tensor:
        return pipe(
            ps,
            height=side,
            width=side,
            num_inference_steps=steps,
            guidance_scale=gen.guidance_scale,
            negative_prompt=[gen.negative_prompt] * len(ps) if gen.negative_prompt else None,
            generator=[torch.Generator().manual_seed(s) for s in ss],
            output_type="latent",
        ).images

    def diffusers_per_prompt() -> torch.Tensor:
        return torch.cat([diffusers_call([p], [s]) for p, s in zip(texts, seeds, strict=True)])

    def diffusers_batched() -> torch.Tensor:
        return torch.cat(
            [diffusers_call(texts[i : i + batch], seeds[i : i + batch]) for i in range(0, n, batch)]
        )

    # the same ODE from the same noise: outputs agree
    a, b = ours(), diffusers_batched()
    diff = (a - b).abs().max().item()

    # the whole shard worker: solve + float16 rows + one merged Lance commit per batch
    tmp = tempfile.mkdtemp(prefix="instaflow-gen-bench-")
    db = lancedb.connect(tmp)
    counter = [0]

    def shard() -> None:
        counter[0] += 1
        table = db.create_table(f"t{counter[0]}", schema=triplet_schema(shape))
        ShardWorker(
            table=table,
            solve=lambda p, s: teacher_latents(model, p, s, **kw),
            teacher="tiny",
            solver=job.solver,
            batch_size=batch,
            run_id="bench",
            write=lambda t, rows: (
                t.merge_insert("triplet_id")
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .execute(rows)
            ),
        ).run(jobs, 0, "true")

    results = {
        "diffusers pipeline, one prompt per call": rate(diffusers_per_prompt, n),
        f"diffusers pipeline, {batch} prompts per call": rate(diffusers_batched, n),
        f"ours: teacher_latents, batch {batch}": rate(ours, n),
        f"ours: shard worker (solve + Lance merge), batch {batch}": rate(shard, n),
    }
    base = results["diffusers pipeline, one prompt per call"]
    best_pipe = results[f"diffusers pipeline, {batch} prompts per call"]
    print()
    print(f"{'generator':55s} {'triplets/s':>10s} {'vs per-prompt':>14s} {'vs batched pipe':>16s}")
    for name, r in results.items():
        print(f"{name:55s} {r:10.1f} {r / base:13.2f}x {r / best_pipe:15.2f}x")
    print(f"\nmax |ours - diffusers| over {n} latents: {diff:.2e} (same ODE, same X0 per seed)")


if __name__ == "__main__":
    main()
