"""Solvers for pair-making: (prompts, seeds) -> X1 through the teacher's ODE or a rectified flow's Euler steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from instaflow_core.generation.triplets import (
    PairsJob,
)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_solver(job: PairsJob, components: Any, device: str) -> Callable[[list[str], list[int]], Any]:
    """solve(prompts, seeds) -> X1 for the job's SolverSpec: the teacher's ODE or a rectified flow's Euler."""
    from instaflow_core.generation.teacher import solve_rf, solve_teacher
    from instaflow_core.models.loading import latent_shape
    from instaflow_core.models.switches import set_switches, switch_on
    from instaflow_core.rectified_flow import noise_from_seeds

    spec = job.solver
    if spec.kind == "teacher":

        def solve(prompts: list[str], seeds: list[int]) -> Any:
            return solve_teacher(
                components,
                prompts,
                seeds,
                steps=spec.steps,
                guidance=spec.guidance,
                scheduler=spec.scheduler,
                negative_prompt=spec.negative_prompt,
                device=device,
                mixed_precision=spec.mixed_precision,
                compile=switch_on(job.compile, device),
                channels_last=switch_on(job.channels_last, device),
                cfg_batched=job.cfg_batched,
                resolution=job.pairs.resolution,
            )

        return solve

    import torch

    from instaflow_core.generation.teacher import autocast
    from instaflow_core.models.velocity import UNetVelocity

    components.to(device)
    set_switches(
        components.unet,
        channels_last=switch_on(job.channels_last, device) or None,
        compile=switch_on(job.compile, device) or None,
    )
    velocity = UNetVelocity.from_components(components).eval()
    shape = latent_shape(components, job.pairs.resolution)

    def solve_pairs(prompts: list[str], seeds: list[int]) -> Any:
        x0 = noise_from_seeds(seeds, shape).to(device)  # (B, 4, h, w), CPU generators: device-independent
        cond = velocity.encode(prompts)
        uncond = velocity.encode([spec.negative_prompt] * len(prompts)) if spec.guidance > 1.0 else None
        with torch.no_grad(), autocast(device, spec.mixed_precision):
            x1 = solve_rf(velocity, x0, cond, uncond, steps=spec.steps, guidance=spec.guidance)
        return x1.float().cpu()

    return solve_pairs
