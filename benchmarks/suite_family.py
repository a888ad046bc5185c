"""The family rows of gpu_suite.py: a reflow step of SDXL and of FLUX.1 at real width, and the memory formula
(training/memory.py, what `instaflow check` uses) against the step's measured peak.

Each row builds the family's denoiser from the real repo's configs (tests/support/teacher_repos.py
`real_size_configs`; with --tiny the hub-shaped tiny repos' own configs) through `ModelFamily.from_configs`,
float32 master weights on the device, and runs the project's training pieces as `training.train` sets them up:
the family's `Velocity`, `apply_perf_switches` (gradient checkpointing on, as the presets), `build_optimizer`, the
EMA, the reflow loss under bf16 autocast, on random latents and stored-shape conditions (the text encoders are
never in training memory). The note holds the formula's bytes for the same step (without the 3 GB reserve: torch's
peak allocation does not see the CUDA context) beside the measured peak.

- sdxl: the whole 2.6B UNet at 1024 px, micro-batch 4 (the sdxl preset's);
- flux: FLUX.1-dev at real width and 2 double- + 2 single-stream blocks of 19 + 38 (its 12B with AdamW does not
  fit one card: 20 B/param), 1024 px, micro-batch 1; the note extrapolates to 19 + 38 blocks: the step time by
  forward FLOPs (both depths counted on fake tensors) and the memory by the formula (FSDP processes it needs).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from suite_harness import PeakMemory, Suite, free_memory, median, time_calls

from instaflow_core.config import TrainConfig, TrainStageConfig
from instaflow_core.models import footprint
from instaflow_core.models.family import Condition, family_of
from instaflow_core.models.sources import model_configs
from instaflow_core.rectified_flow import reflow_loss
from instaflow_core.training import memory
from instaflow_core.training.ema import EMA
from instaflow_core.training.setup import apply_perf_switches, build_optimizer

LR, DECAY = 1e-5, 0.9999


@dataclass(frozen=True)
class FamilyRow:
    name: str  # the row's name in the table
    repo: str  # the hub id whose configs are built
    depth: tuple[int, int] | None  # FLUX: (double, single) blocks built; None = the configs' own depth
    px: int
    micro: int
    steps: int  # timed optimizer steps (after 2 warm-up steps)


def rows_for(preset: str) -> list[FamilyRow]:
    from tests.support.teacher_repos import FLUX_DEV, SDXL

    if preset == "tiny":  # the tiny repos' configs (FLUX: 2 + 4 blocks, built at 1 + 2), 64 px
        return [
            FamilyRow("sdxl reflow step, grad ckpt", SDXL, None, 64, 2, 2),
            FamilyRow("flux reflow step, reduced depth, grad ckpt", FLUX_DEV, (1, 2), 64, 1, 2),
        ]
    return [
        FamilyRow("sdxl reflow step, grad ckpt", SDXL, None, 1024, 4, 3),
        FamilyRow("flux reflow step, reduced depth, grad ckpt", FLUX_DEV, (2, 2), 1024, 1, 3),
    ]


def configs_for(row: FamilyRow, real: bool, root: Path) -> tuple[Path, Path]:
    """(full-depth folder, built folder) of config files (no weights)."""
    from tests.support import teacher_repos

    configs = teacher_repos.real_size_configs(row.repo) if real else teacher_repos.hub_configs(row.repo)
    full = teacher_repos.write_configs(configs, root / "full")
    if row.depth is not None:
        configs["transformer/config.json"] = {
            **configs["transformer/config.json"], "num_layers": row.depth[0], "num_single_layers": row.depth[1],
        }  # fmt: skip
    return full, teacher_repos.write_configs(configs, root / "built")


def family_row(s: Suite, row: FamilyRow) -> None:
    dev, real = s.device, s.preset.name != "tiny"
    full_dir, built_dir = configs_for(row, real, Path(tempfile.mkdtemp(prefix="gpu-suite-family-")))
    family = family_of(built_dir)
    full_index, full_configs = model_configs(str(full_dir))
    index, configs = model_configs(str(built_dir))
    shape = family.geometry(configs).latent_shape(row.px)
    fwd = footprint.forward_flops(family, index, configs, shape)
    flops = 3 * fwd  # forward + backward per sample, recomputation not counted (as the training rows)
    est_s = s.est((row.steps + 2) * row.micro * flops * 4 / 3, fixed=40)

    def measure() -> dict[str, Any]:
        skip = tuple(
            c for c in (*family.required, *family.optional) if c.startswith(("text_encoder", "tokenizer"))
        )
        with torch.random.fork_rng(devices=[]), torch.device(dev):
            torch.manual_seed(0)
            model = family.from_configs(built_dir, skip=skip)
        model.to(dev)
        model.denoiser.train().requires_grad_(True)
        student = model.velocity()
        cfg = TrainConfig(
            stages=[TrainStageConfig(steps=1, batch_size=row.micro)], lr=LR, mixed_precision="bf16",
            gradient_checkpointing=True,
        )  # fmt: skip
        flags = apply_perf_switches(student, cfg, dev)
        opt = build_optimizer(student, cfg, dev)
        for g in opt.param_groups:  # build_optimizer starts at 1.0 for the LR schedule to scale
            g["lr"] = LR
        ema = EMA(student, DECAY).to(dev)
        params = [p for p in student.parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(0)
        x0, x1 = (torch.randn(row.micro, *shape, generator=gen).to(dev) for _ in range(2))
        shapes = family.condition_shapes(configs)
        cond = Condition.from_tensors(
            {k: torch.randn(row.micro, *v, generator=gen) for k, v in shapes.items()}
        )
        cond = cond.to(dev)

        def step() -> None:
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = reflow_loss(student, x0, x1, cond)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(student)
            loss.item()

        for _ in range(2):  # warm-up: AdamW's state, autotuning
            step()
        with PeakMemory(dev) as pm:
            sec = median(time_calls(step, dev, iters=row.steps, warm=False))
        return {"sec": sec, "peak": pm.gib, "flags": flags}

    def fn() -> dict[str, Any]:
        try:
            got = measure()
        finally:
            free_memory()  # the model, AdamW and the EMA went with measure's frame
        p = footprint.parameter_count(index, configs, family.denoiser)
        latents = 16 * shape[0] * shape[1] * shape[2]
        common = dict(
            gradient_checkpointing=True,
            frozen_params=footprint.parameter_count(index, configs, "vae"),
            batch_bytes_per_sample=footprint.condition_bytes(family, configs) + latents,
        )
        a = footprint.count_activations(family, index, configs, shape, gradient_checkpointing=True)
        est = memory.estimate(p, a.fixed, a.per_sample, micro_batch=row.micro, reserve_gb=0, **common)
        peak = f"{got['peak']:.1f} GiB measured" if got["peak"] is not None else "no device peak on CPU"
        note = f"{row.px} px, micro {row.micro}: formula {memory.gb(est.total)} GiB (no reserve), {peak}"
        extra: dict[str, Any] = {
            "px": row.px, "micro_batch": row.micro, "seconds_per_step": got["sec"], "params": p,
            "formula_gib": est.total / memory.GB, "formula_terms": est.terms, "switches": got["flags"],
        }  # fmt: skip
        if row.depth is not None:  # the whole model: time by FLOPs, memory by the formula
            full_p = footprint.parameter_count(full_index, full_configs, family.denoiser)
            ratio = footprint.forward_flops(family, full_index, full_configs, shape) / fwd
            fa = footprint.count_activations(
                family, full_index, full_configs, shape, gradient_checkpointing=True
            )
            common["largest_block"] = footprint.largest_block(full_index, full_configs, family.denoiser)
            whole = memory.estimate(full_p, fa.fixed, fa.per_sample, micro_batch=row.micro, **common)
            card = (
                torch.cuda.get_device_properties(dev).total_memory / memory.GB if dev.type == "cuda" else 80.0
            )
            n = memory.fsdp_processes(card, full_p, fa.fixed, fa.per_sample, micro_batch=row.micro, **common)
            tr_full = full_configs["transformer"]
            blocks = f"{tr_full['num_layers']}+{tr_full['num_single_layers']}"
            note += (
                f"; at {blocks} blocks (x{ratio:.1f} FLOPs): ~{got['sec'] * ratio:.2g} s/step, "
                f"{memory.gb(whole.total)} GB/GPU with the reserve"
                f"{f' -> FSDP over {n}' if not whole.fits(card) else ''}"
            )
            extra.update(
                full_params=full_p, flops_ratio=ratio, full_seconds_per_step=got["sec"] * ratio,
                full_formula_gb=whole.total / memory.GB, fsdp_processes=n,
            )  # fmt: skip
        return {"value": row.micro / got["sec"], "peak_gib": got["peak"], "note": note, "extra": extra}

    s.row("family", row.name, "samples/s", fn, est_s=est_s, flops_per_item=flops)


def family_core(s: Suite, st: Any) -> None:
    """The SDXL and FLUX rows (the suite's SD 1.5 models stay where they are: ~4 GB beside these)."""
    for row in rows_for(s.preset.name):
        family_row(s, row)
        free_memory()
