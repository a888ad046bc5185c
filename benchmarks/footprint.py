"""Memory and time of every teacher family at its real width on this CPU, and the memory of training it on a GPU.

    flock /tmp/heavy-memory.lock .venv/bin/python benchmarks/footprint.py --family {sd15,sdxl,sd35,flux-dev}
        [--resolution 256] [--batch 1] [--phases count,teacher,reflow,distill,eval,activations] [--depth D,S]
        [--train auto|step|grad] [--out footprint-sdxl.json]
    .venv/bin/python benchmarks/footprint.py --report footprint-sdxl.json[,more.json]   # reprint saved results

The networks are the real ones from their real configs (tests/support/teacher_repos.py `real_size_configs`: the
hub-shaped fixtures' configs with the real widths and depths put back), random weights, built through the family's
own `ModelFamily.from_configs`; the text encoders are never built (training reads stored conditions: random
conditions of the family's `condition_shapes` stand in for them). Each phase runs in a fresh process, so its peak
(VmHWM, reset after the model is built) is its own:

- count:    no memory, no arithmetic: every network's parameters on the meta device at full depth, the denoiser's
            peak saved activations at the native resolution counted on fake tensors (models/footprint.py), with
            and without gradient checkpointing, and its FLOPs per forward at the built and the full depth;
- teacher:  one batch of the teacher's own sampler (the preset's scheduler and guidance, `--steps` steps, bf16
            autocast) at `--resolution` px;
- reflow:   one training step at t = 0.5. `step` (what fits: 20 B/param, SD 1.5 and FLUX at depth 1+1): the real
            machinery, float32 master weights, bf16 autocast, gradient checkpointing, AdamW and the EMA; `grad`
            (SDXL, SD 3.5, FLUX at 2+2: their float32 AdamW state does not fit 24 GB): forward + backward with
            gradient checkpointing in bf16 weights and gradients, no optimizer; the formula adds the rest;
- distill:  the same at t = 0 with the distillation loss;
- eval:     one InstaFlow batch: one denoiser pass at t = 0 + the VAE decode to `--resolution` px;
- activations: the bytes autograd saves for backward per forward (float32 weights, bf16 autocast, as the
            presets train), measured on the real network at two latent sizes with and without checkpointing,
            beside the fake-tensor count of the same forward (the check that the count is right).

FLUX.1 runs at real width and reduced depth (`--depth 2,2`: 2 double- + 2 single-stream blocks of 19 + 38): its
parameters and activations at 19 + 38 are counted (meta / fake tensors, exact, no extrapolation needed), its times
extrapolated by FLOPs (measured seconds x full-depth FLOPs / built-depth FLOPs, both counted).

The report prints the CPU numbers beside the GPU formula (training/memory.py, the one `instaflow check` uses) at
the native resolution for an 80 GB card: weights, grads, AdamW, EMA, activations with and without gradient
checkpointing, the VAE, the batch's conditions, and the largest micro-batch that fits (or the FSDP processes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GB = 1024**3
PHASES = ("count", "teacher", "reflow", "distill", "eval", "activations")
FAMILIES = {  # --family -> (hub id whose real-size configs are built, preset, its size in words)
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15", "SD 1.5"),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", "SDXL base 1.0"),
    "sd35": ("stabilityai/stable-diffusion-3.5-medium", "sd35", "SD 3.5 medium"),
    "flux-dev": ("black-forest-labs/FLUX.1-dev", "flux-dev", "FLUX.1-dev"),
}
STEP_LIMIT_GB = (
    18.0  # `--train auto`: the real optimizer step when 20 B/param fits this, else forward + backward
)
CARD_GB = 80.0


# ----------------------------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_gb() -> float:
    return _status_kb("VmRSS") * 1024 / GB


def peak_gb() -> float:
    """Peak resident memory since the last `reset_peak` (VmHWM)."""
    return _status_kb("VmHWM") * 1024 / GB


def reset_peak() -> None:
    """Linux: writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------- models
def write_folder(family: str, depth: str, folder: Path) -> Path:
    """The family's real configs (denoiser at `depth` for FLUX: "D,S" double, single blocks) as a config folder."""
    from tests.support.teacher_repos import real_size_configs, write_configs

    configs = real_size_configs(FAMILIES[family][0])
    if depth != "full":
        double, single = (int(x) for x in depth.split(","))
        configs["transformer/config.json"].update(num_layers=double, num_single_layers=single)
    return write_configs(configs, folder)


def build(folder: Path, dtype: str = "float32") -> Any:
    """The family's Model from the config folder: denoiser, VAE and scheduler, random weights, in `dtype` (built
    in it: no float32 copy first), the text encoders and tokenizers left out."""
    import torch

    from instaflow_core.models.family import family_of
    from instaflow_core.models.footprint import default_dtype

    family = family_of(folder)
    skip = tuple(
        c for c in (*family.required, *family.optional) if c.startswith(("text_encoder", "tokenizer"))
    )
    torch.manual_seed(0)
    with default_dtype(getattr(torch, dtype)):
        return family.from_configs(folder, dtype=dtype, skip=skip)


def conditions(model: Any, batch: int) -> Any:
    """Random conditions of the family's stored shapes (what the pairs flow's text encoders would give)."""
    import torch

    from instaflow_core.models.family import Condition, config_dict

    configs = {k: config_dict(v) for k, v in model.parts.items() if hasattr(v, "config")}
    shapes = model.family.condition_shapes(configs)
    g = torch.Generator().manual_seed(batch)
    return Condition.from_tensors({k: torch.randn(batch, *s, generator=g) for k, s in shapes.items()})


def n_params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------- phases
def count_phase(args: argparse.Namespace) -> dict[str, Any]:
    """Parameters of every network at full depth (meta device), activations at the native resolution and FLOPs
    per forward at the built and full depth (fake tensors)."""
    from instaflow_core.models import footprint
    from instaflow_core.models.family import family_of
    from instaflow_core.models.sources import model_configs

    full = write_folder(args.family, "full", Path(tempfile.mkdtemp()))
    index, configs = model_configs(str(full))
    family = family_of(full)
    geometry = family.geometry(configs)
    native = geometry.latent_shape(None)
    nets = [family.denoiser, "vae", *sorted(c for c in configs if c.startswith("text_encoder"))]
    params = {name: footprint.parameter_count(index, configs, name) for name in nets if name in configs}
    counts: dict[str, Any] = {}
    for gc in (False, True):
        for precision in ("bf16", "no"):
            a = footprint.count_activations(
                family, index, configs, native, mixed_precision=precision, gradient_checkpointing=gc
            )
            counts[f"{'gc' if gc else 'no_gc'}/{precision}"] = {"fixed": a.fixed, "per_sample": a.per_sample}
    built_index, built_configs = model_configs(str(args.folder))
    shape = geometry.latent_shape(args.resolution)
    return {
        "params": params,
        "denoiser": family.denoiser,
        "family": family.name,
        "native_latents": list(native),
        "native_px": native[-1] * geometry.vae_factor,
        "largest_block": footprint.largest_block(index, configs, family.denoiser),
        "condition_bytes": footprint.condition_bytes(family, configs),
        "activations_native": counts,
        "flops_forward": {
            "full": footprint.forward_flops(family, index, configs, shape),
            "built": footprint.forward_flops(family, built_index, built_configs, shape),
        },
        "built_denoiser_params": footprint.parameter_count(built_index, built_configs, family.denoiser),
    }


def teacher_phase(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from instaflow_core.config import load
    from instaflow_core.rectified_flow import noise_from_seeds

    gen = load(FAMILIES[args.family][1], ["storage.root=/tmp/unused"]).generation
    shape = model.latent_shape(args.resolution)
    family = model.family
    cond, uncond = conditions(model, args.batch), conditions(model, args.batch)
    x0 = noise_from_seeds(list(range(args.batch)), shape)
    kw = dict(guidance=gen.guidance_scale, scheduler=gen.scheduler, mixed_precision="bf16")
    with torch.no_grad():
        family.teacher_sample(model, x0[:1], cond.rows(slice(0, 1)), uncond.rows(slice(0, 1)), steps=1, **kw)
        reset_peak()
        t0 = time.perf_counter()
        family.teacher_sample(model, x0, cond, uncond, steps=args.steps, **kw)
    return {
        "seconds": time.perf_counter() - t0,
        "steps": args.steps,
        "guidance": gen.guidance_scale,
        "scheduler": gen.scheduler,
        "cfg": family.guidance == "cfg" and gen.guidance_scale > 1,
    }


def train_phase(model: Any, stage: str, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """One step of reflow (t = 0.5) or distillation (t = 0): `step` = the real machinery (AdamW + EMA), `grad` =
    forward + backward only, in the weights' dtype. Gradient checkpointing on, as the presets train."""
    import torch

    from instaflow_core.config import TrainConfig
    from instaflow_core.rectified_flow import distill_loss, noise_from_seeds, reflow_loss
    from instaflow_core.training.ema import EMA
    from instaflow_core.training.setup import build_optimizer

    shape = model.latent_shape(args.resolution)
    model.denoiser.enable_gradient_checkpointing()
    model.denoiser.requires_grad_(True)
    student = model.velocity().train()
    b = args.batch
    cond = conditions(model, b)
    x0, x1 = noise_from_seeds(list(range(b)), shape), noise_from_seeds(list(range(9, 9 + b)), shape)
    optimizer = ema = None
    if mode == "step":
        optimizer = build_optimizer(student, TrainConfig(stages=[{"steps": 1, "batch_size": b}]))
        ema = EMA(student, 0.9999)
    amp = torch.autocast("cpu", dtype=torch.bfloat16)
    times = []
    for _ in range(
        2 if mode == "step" else 1
    ):  # the first step also allocates AdamW's state: time the second
        t0 = time.perf_counter()
        with amp:
            if stage == "reflow":
                loss = reflow_loss(student, x0, x1, cond, torch.full((b,), 0.5))
            else:
                loss = distill_loss(student, x0, x1, cond)
        loss.backward()
        if optimizer is not None and ema is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(student)
        times.append(time.perf_counter() - t0)
    return {
        "seconds": times[-1],
        "first_step_seconds": times[0],
        "latents": list(shape),
        "mode": mode,
        "counted_activations": step_activations(args, mode, list(shape), b),
    }


def step_activations(args: argparse.Namespace, mode: str, shape: list[int], batch: int) -> int:
    """The saved activations of this step's own forward (its weights' dtype, bf16 autocast, checkpointing),
    counted on fake tensors: the activation term of `formula_check`."""
    import torch

    from instaflow_core.models import footprint
    from instaflow_core.models.family import family_of
    from instaflow_core.models.sources import model_configs

    index, configs = model_configs(str(args.folder))
    weights = torch.bfloat16 if mode == "grad" else torch.float32
    counted = footprint.count_activations(
        family_of(Path(args.folder)), index, configs, tuple(shape),
        gradient_checkpointing=True, weights_dtype=weights,
    )  # fmt: skip
    return counted.at(batch)


def eval_phase(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from instaflow_core.rectified_flow import noise_from_seeds

    shape = model.latent_shape(args.resolution)
    velocity = model.velocity().eval()
    cond = conditions(model, args.batch)
    x0 = noise_from_seeds(list(range(args.batch)), shape)

    def one() -> Any:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            x1 = x0 + velocity(x0, torch.zeros(args.batch), cond).float()
        with torch.no_grad():
            return model.family.decode(model, x1)

    one()
    reset_peak()
    t0 = time.perf_counter()
    images = one()
    return {"seconds": time.perf_counter() - t0, "images": list(images.shape)}


def activations_phase(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Saved bytes of one training forward at two latent sizes, with and without checkpointing: measured on the
    real network, and counted on fake tensors (models/footprint.py) for the same forward."""
    from instaflow_core.models import footprint
    from instaflow_core.models.family import config_dict
    from instaflow_core.models.sources import model_configs

    index, configs = model_configs(str(args.folder))
    family = model.family
    cond_shapes = family.condition_shapes({k: config_dict(v) for k, v in model.parts.items()})
    net = model.denoiser.train().requires_grad_(True)
    out: dict[str, Any] = {}
    for key in args.probe.split(",") if args.probe else probe_cases(args):
        side, gc = int(key.split("/")[0]), key.endswith("/gc")
        shape = (model.latent_shape(None)[0], side, side)
        t0 = time.perf_counter()
        measured = footprint.saved_activations(family, net, cond_shapes, shape, 1, gradient_checkpointing=gc)
        seconds = time.perf_counter() - t0
        weights = next(net.parameters()).dtype  # float32, or bfloat16 with --probe-dtype bfloat16
        counted = footprint.count_activations(
            family, index, configs, shape, gradient_checkpointing=gc, weights_dtype=weights
        ).at(1)
        out[key] = {
            "measured": measured,
            "counted": counted,
            "seconds": round(seconds, 2),
            "peak_gb": peak_gb(),
        }
        print(f"  activations {key}: measured {measured / GB:.3f} GB, counted {counted / GB:.3f} GB",
              file=sys.stderr, flush=True)  # fmt: skip
    return {"saved_bytes": out}


def probe_cases(args: argparse.Namespace) -> list[str]:
    """'side/gc' and 'side/no_gc' for every probe side."""
    return [f"{side}/{gc}" for side in args.probe_sides.split(",") for gc in ("no_gc", "gc")]


def train_mode(args: argparse.Namespace) -> str:
    if args.train != "auto":
        return args.train
    from instaflow_core.models import footprint
    from instaflow_core.models.family import family_of
    from instaflow_core.models.sources import model_configs

    index, configs = model_configs(str(args.folder))
    params = footprint.parameter_count(index, configs, family_of(args.folder).denoiser)
    return "step" if 20 * params / GB <= STEP_LIMIT_GB else "grad"


def phase(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"phase": name, "rss_start_gb": round(rss_gb(), 2)}
    if name == "count":
        reset_peak()
        out.update(count_phase(args))
        out["peak_gb"] = round(peak_gb(), 2)
        return out
    mode = train_mode(args) if name in ("reflow", "distill") else ""
    half = mode == "grad" or (name == "activations" and args.probe_dtype == "bfloat16")
    dtype = "bfloat16" if half else "float32"
    t0 = time.perf_counter()
    model = build(args.folder, dtype)
    out.update(
        build_seconds=round(time.perf_counter() - t0, 1),
        weights_dtype=dtype,
        params={k: n_params(v) for k, v in model.modules().items()},
        rss_built_gb=round(rss_gb(), 2),
        build_peak_gb=round(peak_gb(), 2),
    )
    reset_peak()
    if name == "teacher":
        out.update(teacher_phase(model, args))
    elif name in ("reflow", "distill"):
        out.update(train_phase(model, name, args, mode))
    elif name == "eval":
        out.update(eval_phase(model, args))
    elif name == "activations":
        out.update(activations_phase(model, args))
    out["peak_gb"] = round(peak_gb(), 2)
    return out


# ------------------------------------------------------------------------------------------------ report
def gpu_budget(results: dict[str, Any], card_gb: float = CARD_GB) -> list[str]:
    """training/memory.py's formula at the native resolution: per term, with and without checkpointing, the
    largest micro-batch on one card, or the FSDP processes when the state alone does not fit."""
    from instaflow_core.training import memory

    c = results.get("count")
    if not c:
        return ["  (run the count phase for the GPU formula)"]
    p = c["params"][c["denoiser"]]
    latents = 4 * 4 * c["native_latents"][0] * c["native_latents"][1] * c["native_latents"][2]
    common = dict(
        frozen_params=c["params"].get("vae", 0),
        batch_bytes_per_sample=c["condition_bytes"] + latents,
        largest_block=c["largest_block"],
    )
    px = c["native_px"]
    text = {k: v for k, v in c["params"].items() if k.startswith("text_encoder")}
    lines = [
        f"GPU memory per process, full fine-tuning at {px} px ({tuple(c['native_latents'])} latents), float32 "
        f"master weights, bf16 autocast, text conditions from the store ({c['condition_bytes'] / 2**20:.2f} MB "
        f"per sample, float32), {card_gb:.0f} GB card (GB = 2^30 bytes):",
        f"  denoiser {p / 1e9:.3f}B parameters; not in training memory (conditions precomputed): "
        + ", ".join(f"{k} {v / 1e9:.3f}B ({2 * v / GB:.1f} GB bf16)" for k, v in text.items()),
    ]
    for gc in (False, True):
        a = c["activations_native"][f"{'gc' if gc else 'no_gc'}/bf16"]
        one = memory.estimate(
            p, a["fixed"], a["per_sample"], micro_batch=1, gradient_checkpointing=gc, **common
        )
        fits = memory.largest_micro_batch(card_gb, p, a["fixed"], a["per_sample"], **common)
        label = "with" if gc else "without"
        lines.append(
            f"  {label} gradient checkpointing: activations {a['per_sample'] / GB:.2f} GB/sample + "
            f"{a['fixed'] / GB:.2f} GB once; micro-batch 1 {one.line()}"
        )
        if fits:
            lines.append(f"    -> micro_batch_size <= {fits} on one {card_gb:.0f} GB card")
        else:
            n = memory.fsdp_processes(card_gb, p, a["fixed"], a["per_sample"], micro_batch=1, **common) or 1
            each = memory.estimate(
                p, a["fixed"], a["per_sample"], micro_batch=1, processes=n, fsdp=True, **common
            )
            lines.append(
                f"    -> micro-batch 1 does not fit one {card_gb:.0f} GB card; FSDP over {n} GPUs: {each.line()}"
            )
    eight = memory.estimate(p, 0, 0, micro_batch=0, use_8bit_adam=True, **common)
    lines.append(f"  with use_8bit_adam the state is {memory.gb(eight.total - eight.terms['reserve'])} GB")
    return lines


def formula_check(results: dict[str, Any]) -> list[str]:
    """The training steps' peaks against the formula's terms for the same CPU step: the state (step: 20 B per
    denoiser parameter + the float32 VAE; grad: bf16 weights and gradients), the step's saved activations
    counted on fake tensors, and the process's own memory before the build."""
    out = []
    for name in ("reflow", "distill"):
        r = results.get(name)
        if not r:
            continue
        p = r["params"]
        den = next(v for k, v in p.items() if k != "vae")
        vae = p.get("vae", 0)
        state = 20 * den + 4 * vae if r["mode"] == "step" else 4 * den + 2 * vae
        saved = r.get("counted_activations")
        if saved is None:  # results from before the steps counted their own
            folder = write_folder(r["family_arg"], r["depth"], Path(tempfile.mkdtemp()))
            args = argparse.Namespace(folder=folder)
            saved = step_activations(args, r["mode"], r["latents"], r["batch"])
        total = state + saved + r["rss_start_gb"] * GB
        out.append(
            f"  {name} step, formula for this CPU step: {total / GB:.2f} GB (state {state / GB:.2f} + saved "
            f"activations {saved / GB:.2f} + process {r['rss_start_gb']:.2f}) vs measured peak {r['peak_gb']:.2f} GB"
        )
    return out


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    first = next(iter(results.values()))
    fam = first.get("family_arg", args.family)
    name = FAMILIES[fam][2]
    lines = [
        f"{name} footprint on this CPU ({os.cpu_count()} cores, {first.get('threads', args.threads)} torch "
        f"thread(s)), {first.get('resolution', args.resolution)} px, batch {first.get('batch', args.batch)}, "
        f"denoiser depth {first.get('depth', args.depth)}:"
    ]
    c = results.get("count")
    built = next((r for r in results.values() if "params" in r and r.get("phase") != "count"), None)
    if c:
        full = c["params"][c["denoiser"]]
        lines.append(
            "  parameters (full depth, meta device): "
            + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in c["params"].items())
        )
        if c["built_denoiser_params"] != full:
            ratio = c["flops_forward"]["full"] / c["flops_forward"]["built"]
            lines.append(
                f"  built at reduced depth: {c['built_denoiser_params'] / 1e6:.1f}M of {full / 1e6:.1f}M "
                f"denoiser parameters; forward FLOPs full / built = {ratio:.2f} (times below x that for full depth)"
            )
    elif built:
        lines.append("  parameters: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in built["params"].items()))
    names = {
        "count": "count (meta + fake tensors)",
        "teacher": "teacher batch ({steps} steps{cfg}, {scheduler})",
        "reflow": "reflow step ({how})",
        "distill": "distill step (t = 0, {how})",
        "eval": "eval batch (1 step + VAE decode)",
        "activations": "activation probe (forwards, measured + counted)",
    }
    hows = {"step": "AdamW + EMA, fp32 master, bf16 autocast, GC", "grad": "fwd + bwd only, bf16, GC"}
    for phase_name, r in results.items():
        label = names[phase_name].format(
            steps=r.get("steps"), cfg=", CFG" if r.get("cfg") else "", scheduler=r.get("scheduler"),
            how=hows.get(r.get("mode", ""), ""),
        )  # fmt: skip
        secs = f"{r['seconds']:8.1f} s" if "seconds" in r else " " * 10
        build = (
            f"  (built in {r['build_seconds']} s, RSS {r['rss_built_gb']} GB)" if "build_seconds" in r else ""
        )
        lines.append(f"  {label:<64} {secs}   peak {r['peak_gb']:5.1f} GB{build}")
    lines += formula_check(results)
    act = results.get("activations", {}).get("saved_bytes")
    if act:
        dtype = results["activations"].get("probe_dtype", "float32")
        how = "float32 weights, bf16 autocast" if dtype == "float32" else "bf16 weights, bf16 autocast"
        lines.append(
            f"  saved activations per forward, batch 1, {how} (measured on the real network / counted):"
        )
        for key, v in act.items():
            side, gc = key.split("/")
            lines.append(
                f"    {side}x{side} latents, {'with' if gc == 'gc' else 'without'} checkpointing: "
                f"{v['measured'] / GB:.3f} / {v['counted'] / GB:.3f} GB"
            )
    return "\n".join(lines + [""] + gpu_budget(results))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=sorted(FAMILIES), default="sd15")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--depth", default=None, help="FLUX: double,single blocks built (default 2,2); others: full"
    )
    ap.add_argument("--train", choices=("auto", "step", "grad"), default="auto")
    ap.add_argument("--probe-sides", default="16,32", help="latent sides of the activation probe")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument(
        "--probe-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="the probe's weights: float32 under bf16 autocast (as training), or bfloat16 (half the memory)",
    )
    ap.add_argument("--probe", default=None, help="activation probe cases to run, e.g. 32/gc (default: all)")
    ap.add_argument("--out", default=None, help="also write the results as JSON")
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--report", default=None, help="print the report of results saved with --out (JSON files)"
    )
    args = ap.parse_args()
    args.depth = args.depth or ("2,2" if args.family.startswith("flux") else "full")
    if args.report:
        results: dict[str, Any] = {}
        for f in args.report.split(","):
            for k, v in json.loads(Path(f).read_text()).items():
                if k == "activations" and k in results:  # probe cases saved by separate runs
                    v = {**v, "saved_bytes": {**results[k]["saved_bytes"], **v["saved_bytes"]}}
                    v["peak_gb"] = max(v["peak_gb"], results[k]["peak_gb"])
                results[k] = v
        print(report(results, args))
        return 0
    if args.child:
        args.folder = Path(args.folder)
        print("RESULT " + json.dumps(phase(args.child, args)), flush=True)
        return 0
    folder = write_folder(args.family, args.depth, Path(tempfile.mkdtemp(prefix=f"footprint-{args.family}-")))
    results = {}
    keys = (
        "family",
        "resolution",
        "batch",
        "steps",
        "threads",
        "depth",
        "train",
        "probe_sides",
        "probe_dtype",
    )
    runs = [(n, None) for n in args.phases.split(",") if n != "activations"]
    if "activations" in args.phases.split(","):  # a process per probe case: the unchecked ones are big
        cases = args.probe.split(",") if args.probe else probe_cases(args)
        runs += [("activations", case) for case in cases]
    for name, case in runs:
        cmd = [sys.executable, __file__, "--child", name, "--folder", str(folder)]
        cmd += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in keys]
        cmd += [f"--probe={case}"] if case else []
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            why = f"phase {name} {case or ''} failed (rc {proc.returncode}): {proc.stderr[-3000:]}"
            print(why, file=sys.stderr)
            return 1
        got = json.loads(line[len("RESULT ") :])
        got.update({k if k != "family" else "family_arg": getattr(args, k) for k in keys})
        got["wall_seconds"] = round(time.perf_counter() - t0, 1)
        if case and name in results:
            got["saved_bytes"] = {**results[name]["saved_bytes"], **got["saved_bytes"]}
            got["peak_gb"] = max(got["peak_gb"], results[name]["peak_gb"])
        results[name] = got
        print(f"{name}{' ' + case if case else ''}: {json.dumps(got)[:400]}", flush=True)
        if args.out:  # after every phase: a later failure keeps what ran
            Path(args.out).write_text(json.dumps(results, indent=1))
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
