"""Memory and time at SD 1.5's real size (860M-parameter UNet, random weights) on this CPU, and the GPU budget.

    flock /tmp/heavy-memory.lock .venv/bin/python benchmarks/sd15_footprint.py [--resolution 256] [--batch 1]
        [--phases teacher,reflow,distill,eval,activations] [--out footprint.json]

Needs ~19 GB of free RAM (the reflow and distill steps hold the UNet, its gradients, AdamW's two moments and
the EMA copy in float32: 20 bytes per parameter). Each phase runs in a fresh process, so its peak RSS is its own:

- teacher:  one batch of the teacher's ODE (DPM-Solver++, CFG, `--steps` steps) at `--resolution` px;
- reflow:   one optimizer step of the 2-RF (forward + backward + AdamW + EMA update, gradient checkpointing on,
            as the sd15 preset);
- distill:  one optimizer step of the one-step student (t = 0, L2), the same machinery;
- eval:     one InstaFlow batch (text encoder + one UNet pass + VAE decode), what an evaluation batch costs;
- activations: the bytes autograd saves for backward per sample (bf16 autocast, as the preset trains), with and
            without gradient checkpointing, at two latent sizes; extrapolated to 512 px (64x64 latents) by the
            measured scaling (SDPA keeps attention memory linear in the tokens).

The report prints the measured CPU numbers beside the GPU formula (weights, grads, optimizer state, EMA,
activations) and the largest micro-batch that fits an 80 GB card. The networks are built from SD 1.5's own
configs (tests/support/sd15.py holds them verbatim), the text encoder with its 49,408-token embedding.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 1024**3
PHASES = ("teacher", "reflow", "distill", "eval", "activations")


# ----------------------------------------------------------------------------------------------- models
def sd15_components():
    """SD 1.5 at full size, random weights: the real unet/vae/text_encoder/scheduler configs, as an SD-family
    `Model`."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(REPO))
    from instaflow_core.models.family import Model
    from instaflow_core.models.sd import FAMILY
    from instaflow_core.models.tokenizer import tiny_tokenizer
    from tests.support.sd15 import Sd15Shape, sd15_configs

    full = Sd15Shape(
        unet_channels=(320, 640, 1280, 1280),
        vae_channels=(128, 256, 512, 512),
        text_layers=12,
        text_intermediate=3072,
    )
    cfg = sd15_configs(full)
    text = {
        k: v
        for k, v in cfg["text_encoder/config.json"].items()
        if not k.startswith("_") and k != "architectures"
    }
    text["vocab_size"] = 49408  # the real CLIP-L embedding; the stand-in tokenizer's ids are a subset
    torch.manual_seed(0)
    parts = {
        "unet": UNet2DConditionModel.from_config(cfg["unet/config.json"]).eval(),
        "vae": AutoencoderKL.from_config(cfg["vae/config.json"]).eval(),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**text)).eval(),
        "tokenizer": tiny_tokenizer(),
        "scheduler": PNDMScheduler.from_config(cfg["scheduler/scheduler_config.json"]),
    }
    return Model(FAMILY, parts)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # ru_maxrss is KiB on Linux


# ----------------------------------------------------------------------------------------------- phases
def _train_step(comps, stage: str, batch: int, resolution: int, checkpointing: bool) -> dict:
    import torch

    from instaflow_core.config import TrainConfig
    from instaflow_core.rectified_flow import distill_loss, noise_from_seeds, reflow_loss
    from instaflow_core.training.ema import EMA
    from instaflow_core.training.setup import build_optimizer
    from instaflow_core.training.student import ConditionCache

    shape = comps.latent_shape(resolution)
    if checkpointing:
        comps.denoiser.enable_gradient_checkpointing()
    comps.denoiser.requires_grad_(True)  # as TrainJob.run sets the student up
    student = comps.velocity().train()
    optimizer = build_optimizer(student, TrainConfig(stages=[{"steps": 1, "batch_size": batch}]))
    ema = EMA(student, 0.9999)
    embed = ConditionCache(comps)
    prompts = [f"a photo of object {i}" for i in range(batch)]
    x0, x1 = noise_from_seeds(list(range(batch)), shape), noise_from_seeds(list(range(9, 9 + batch)), shape)
    times = []
    for _ in range(2):  # the first step also allocates AdamW's state: time the second
        t0 = time.perf_counter()
        cond = embed(prompts)
        if stage == "reflow":
            loss = reflow_loss(student, x0, x1, cond, torch.full((batch,), 0.5))
        else:
            loss = distill_loss(student, x0, x1, cond)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(student)
        times.append(time.perf_counter() - t0)
    return {"seconds": times[-1], "first_step_seconds": times[0], "latents": list(shape)}


def phase(name: str, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    comps = sd15_components()
    built = time.perf_counter() - t0
    out = {
        "phase": name,
        "build_seconds": round(built, 1),
        "params": {k: n_params(comps[k]) for k in ("unet", "text_encoder", "vae")},
    }
    prompts = [f"a photo of object {i}" for i in range(args.batch)]
    if name == "teacher":
        from instaflow_core.generation.solvers import teacher_latents

        teacher_latents(comps, prompts[:1], [0], steps=1, resolution=args.resolution)  # warm up
        t = time.perf_counter()
        teacher_latents(comps, prompts, list(range(args.batch)), steps=args.steps, resolution=args.resolution)
        out.update(seconds=time.perf_counter() - t, steps=args.steps)
    elif name in ("reflow", "distill"):
        out.update(_train_step(comps, name, args.batch, args.resolution, checkpointing=True))
    elif name == "eval":
        from instaflow_core.evaluation.sampling import Sampler, SamplerSpec

        sampler = Sampler(
            comps, SamplerSpec("instaflow_1step", "instaflow", "euler", 1, 1.0), args.resolution
        )
        sampler(prompts[:1], [0])
        t = time.perf_counter()
        images = sampler(prompts, list(range(args.batch)))
        out.update(seconds=time.perf_counter() - t, images=list(images.shape))
    elif name == "activations":
        out.update(activations(comps))
    out["peak_rss_gb"] = round(peak_rss_gb(), 2)
    return out


def activations(comps) -> dict:
    """Bytes autograd saves for backward, per sample, under bf16 autocast: {latent side: {gc: bytes}}."""
    import torch

    from instaflow_core.models.family import Condition
    from instaflow_core.rectified_flow import noise_from_seeds

    comps.denoiser.requires_grad_(True)
    student = comps.velocity().train()
    params = {p.untyped_storage().data_ptr() for p in student.parameters()}
    cond = Condition(embeds=torch.randn(1, 77, 768))
    result: dict = {}
    for side in (16, 32):
        for gc in (False, True):
            if gc:
                comps.denoiser.enable_gradient_checkpointing()
            else:
                comps.denoiser.disable_gradient_checkpointing()
            seen: dict[int, int] = {}

            def pack(t, seen=seen):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in params:
                    seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
                return t

            x = noise_from_seeds([0], (4, side, side))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = student(x, torch.tensor([0.5]), cond)
            del out
            result.setdefault(str(side), {})["gc" if gc else "no_gc"] = sum(seen.values())
    return {"saved_bytes_per_sample": result}


# ------------------------------------------------------------------------------------------------ report
def gpu_budget(results: dict, card_gb: float = 80.0) -> list[str]:
    """The per-GPU memory formula for reflow / distillation at 512 px, and the micro-batch that fits."""
    p = next(iter(results.values()))["params"]
    unet, text, vae = p["unet"], p["text_encoder"], p["vae"]
    static = {
        "UNet weights (fp32 master)": 4 * unet,
        "gradients (fp32)": 4 * unet,
        "AdamW moments (2 x fp32)": 8 * unet,
        "EMA copy (fp32)": 4 * unet,
        "text encoder (frozen, fp32)": 4 * text,
        "VAE (frozen; decoded by the lpips stage)": 4 * vae,
    }
    lines = [
        f"GPU budget per process at 512 px (bf16 autocast, float32 master weights, {card_gb:.0f} GB card):"
    ]
    lines += [f"  {k:<42} {v / GB:6.2f} GB" for k, v in static.items()]
    total = sum(static.values())
    lines.append(f"  {'static total (20 B/param UNet + frozen nets)':<42} {total / GB:6.2f} GB")
    lines.append(f"  {'  with use_8bit_adam (2 B/param moments)':<42} {(total - 6 * unet) / GB:6.2f} GB")
    act = results.get("activations", {}).get("saved_bytes_per_sample")
    if not act:
        return lines + ["  (run the activations phase for the per-sample activation term)"]
    reserve = 3 * GB  # CUDA context, allocator fragmentation, workspaces
    for gc in ("no_gc", "gc"):
        # saved bytes = W + a * latent pixels: W is what does not grow with the image (autocast's bf16 copies of
        # the weights are saved for backward once per forward, ~2 B/param), a the per-pixel activations (SDPA
        # keeps attention linear in the tokens); two sizes give both
        small, big = act["16"][gc], act["32"][gc]
        per_pixel = max(0.0, (big - small) / (32 * 32 - 16 * 16))
        fixed = max(0.0, small - per_pixel * 16 * 16)
        at512 = per_pixel * 64 * 64
        fits = int(max(0, card_gb * GB - total - fixed - reserve) // at512) if at512 else 0
        label = "with gradient checkpointing" if gc == "gc" else "without gradient checkpointing"
        lines.append(
            f"  activations {label:<31} {at512 / GB:6.2f} GB / sample at 512 px + {fixed / GB:.2f} GB once "
            f"(measured {small / GB:.3f} GB at 128 px, {big / GB:.3f} GB at 256 px) -> micro_batch_size <= {fits}"
        )
    return lines


def report(results: dict, args: argparse.Namespace) -> str:
    lines = [
        f"SD 1.5 footprint on this CPU ({os.cpu_count()} cores, {args.threads} torch thread(s)), "
        f"{args.resolution} px, batch {args.batch}:",
    ]
    p = next(iter(results.values()))["params"]
    lines.append(
        "  parameters: UNet {:.1f}M, text encoder {:.1f}M, VAE {:.1f}M".format(
            p["unet"] / 1e6, p["text_encoder"] / 1e6, p["vae"] / 1e6
        )
    )
    names = {
        "teacher": f"teacher batch ({args.steps} DPM-Solver++ steps, CFG)",
        "reflow": "reflow step (fwd + bwd + AdamW + EMA, GC on)",
        "distill": "distill step (t = 0, L2, AdamW + EMA, GC on)",
        "eval": "eval batch (InstaFlow, 1 step + VAE decode)",
        "activations": "activation probe (forward only)",
    }
    for name, r in results.items():
        secs = f"{r['seconds']:8.1f} s" if "seconds" in r else " " * 10
        lines.append(f"  {names[name]:<48} {secs}   peak RSS {r['peak_rss_gb']:5.1f} GB")
    return "\n".join(lines + [""] + gpu_budget(results))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--out", default=None, help="also write the results as JSON")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--report", default=None, help="print the report of results saved with --out (JSON files)"
    )
    args = ap.parse_args()
    if args.report:
        results = {k: v for f in args.report.split(",") for k, v in json.loads(Path(f).read_text()).items()}
        print(report(results, args))
        return 0
    if args.child:
        print("RESULT " + json.dumps(phase(args.child, args)), flush=True)
        return 0
    results = {}
    for name in args.phases.split(","):
        cmd = [sys.executable, __file__, "--child", name] + [
            f"--{k}={getattr(args, k)}" for k in ("resolution", "batch", "steps", "threads")
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"phase {name} failed (rc {proc.returncode}): {proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        results[name] = json.loads(line[len("RESULT ") :])
        print(f"{name}: {results[name]}", flush=True)
    print(report(results, args))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
