"""Solvers for pair-making: (prompts, seeds) -> X1, through the teacher's own sampler or a rectified flow's
Euler steps, for any model family.

`teacher_latents` is the teacher's ODE from X0 = noise_from_seeds(seeds) through the family's sampler (its
diffusers scheduler, with guidance as the family takes it); `flow_latents` is `rectified_flow.euler_sample`
along the family's velocity (the 2-RF making distillation pairs, a pretrained 1-RF teacher). Both draw X0 on
CPU generators (the same seed gives the same X0 on any device and in any batch composition) and return the
latent X1 in the project's convention (decode it with the family's `decode`); generation never decodes.
`make_solver` picks one for a `PairsJob` and sets the job's GPU speed switches on the denoiser, in place and
only ever on (another stage may share the module): docs/gpu-speed.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from instaflow_core.errors import ConfigError, DataError
from instaflow_core.generation.triplets import PairsJob
from instaflow_core.models.family import Model
from instaflow_core.models.sd import autocast
from instaflow_core.models.switches import set_switches, switch_on
from instaflow_core.rectified_flow import euler_sample, noise_from_seeds

Solve = Callable[[list[str], list[int]], Any]  # solve(prompts, seeds) -> X1 (B, C, h, w)


def resolve_device(device: str) -> str:
    """ "auto" -> cuda when available, else cpu."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str) -> Tensor:
    """X0 (B, *shape) on `device` from CPU generators (pinned for an asynchronous upload to a GPU)."""
    x0 = noise_from_seeds(list(seeds), shape)
    if torch.device(device).type == "cuda":
        x0 = x0.pin_memory()
    return x0.to(device, non_blocking=True)


@torch.no_grad()
def teacher_latents(
    model: Model,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = 25,
    guidance: float = 5.0,
    scheduler: str = "dpmsolver++",
    negative_prompt: str = "",
    device: str | torch.device = "cpu",
    mixed_precision: str = "no",
    cfg_batched: bool = True,
    resolution: int | None = None,
    out_device: str | torch.device | None = "cpu",
) -> Tensor:
    """X1 (B, C, h, w) float32 on `out_device` (None: left on `device`): the teacher's own sampler from
    X0 = noise_from_seeds(seeds) at `resolution` px (None: the model's native size). The networks are moved to
    `device` in place."""
    if len(prompts) != len(seeds):
        raise DataError(f"teacher sampling: {len(prompts)} prompts but {len(seeds)} seeds")
    if steps < 1:
        raise ConfigError(f"num_inference_steps must be >= 1, got {steps}")
    family = model.family
    if family.schedulers and scheduler not in family.schedulers:
        raise ConfigError(
            f"generation.scheduler={scheduler!r}: the {family.name} teacher's sampler takes one of "
            f"{list(family.schedulers)}"
        )
    shape = model.latent_shape(resolution)
    b = len(prompts)
    if b == 0:
        return torch.empty((0, *shape))
    device = torch.device(device)
    model.to(device)
    cond = model.encode(list(prompts))  # B rows
    uncond = model.negative([negative_prompt]).expand(b) if guidance > 1.0 else None
    x0 = seeded_noise(seeds, shape, device)
    x1 = family.teacher_sample(
        model, x0, cond, uncond, steps=steps, guidance=guidance, scheduler=scheduler,
        mixed_precision=mixed_precision, cfg_batched=cfg_batched,
    )  # fmt: skip
    return x1 if out_device is None else x1.to(out_device)


@torch.no_grad()
def flow_latents(
    model: Model,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = 25,
    guidance: float = 1.5,
    negative_prompt: str = "",
    device: str | torch.device = "cpu",
    mixed_precision: str = "no",
    resolution: int | None = None,
    velocity: Any = None,
) -> Tensor:
    """A rectified flow's Euler solution X1 (B, C, h, w) float32 on the CPU from X0 = noise_from_seeds(seeds):
    `rectified_flow.euler_sample` over the family's velocity, guidance as the family takes it."""
    device = torch.device(device)
    velocity = velocity if velocity is not None else model.velocity().eval()
    x0 = noise_from_seeds(list(seeds), model.latent_shape(resolution)).to(device)  # CPU generators
    cond, weight = model.family.with_guidance(model.encode(list(prompts)), guidance)
    uncond = model.negative([negative_prompt] * len(prompts)) if weight > 1.0 else None
    with autocast(device, mixed_precision):
        x1 = euler_sample(velocity, x0, cond, steps, guidance=weight, uncond=uncond)
    return x1.float().cpu()


def make_solver(job: PairsJob, model: Model, device: str) -> Solve:
    """solve(prompts, seeds) -> X1 for the job's SolverSpec: the teacher's sampler or a rectified flow's Euler,
    with the job's speed switches set on the denoiser."""
    spec = job.solver
    model.to(device)
    set_switches(
        model.denoiser,
        channels_last=switch_on(job.channels_last, device) or None,
        compile=switch_on(job.compile, device) or None,
    )
    if spec.kind == "teacher":

        def solve(prompts: list[str], seeds: list[int]) -> Any:
            return teacher_latents(
                model, prompts, seeds, steps=spec.steps, guidance=spec.guidance, scheduler=spec.scheduler,
                negative_prompt=spec.negative_prompt, device=device, mixed_precision=spec.mixed_precision,
                cfg_batched=job.cfg_batched, resolution=job.pairs.resolution,
            )  # fmt: skip

        return solve

    velocity = model.velocity().eval()

    def solve_pairs(prompts: list[str], seeds: list[int]) -> Any:
        return flow_latents(
            model, prompts, seeds, steps=spec.steps, guidance=spec.guidance, negative_prompt=spec.negative_prompt,
            device=device, mixed_precision=spec.mixed_precision, resolution=job.pairs.resolution, velocity=velocity,
        )  # fmt: skip

    return solve_pairs
