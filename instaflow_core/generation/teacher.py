"""Teacher sampling: SD's probability-flow ODE through a diffusers scheduler, noise from seeds, 2-RF pairs.

`solve_teacher` is the loop of diffusers' StableDiffusionPipeline written out for a batch of (prompt, seed)
rows: X0 comes from per-row CPU generators (so the same seed gives the same X0 on any device and any batch
composition), uncond and cond run in one doubled forward, and the result is the scaled latent X1 (decode it
with `vae.decode(x1 / scaling_factor)`). A fresh scheduler is made per call: multistep schedulers keep state.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, SchedulerMixin
from torch import Tensor

from instaflow_core.errors import ConfigError, DataError
from instaflow_core.models.components import SDComponents
from instaflow_core.models.loading import latent_shape
from instaflow_core.models.velocity import encode_prompts
from instaflow_core.rectified_flow import VelocityModel, euler_sample, noise_from_seeds

SCHEDULERS = ("dpmsolver++", "euler", "ddim")
_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def make_scheduler(name: str, base_config: Any) -> SchedulerMixin:
    """A fresh scheduler of kind `name` (dpmsolver++ | euler | ddim) on the teacher's noise schedule."""
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(
            base_config, algorithm_type="dpmsolver++", solver_order=2
        )
    if name == "euler":
        return EulerDiscreteScheduler.from_config(base_config)
    if name == "ddim":
        # clip_sample clips x0 to [-1, 1], meant for pixels, wrong for SD latents (StableDiffusionPipeline turns
        # it off too); set_alpha_to_one=False is SD's setting.
        return DDIMScheduler.from_config(
            base_config, clip_sample=False, set_alpha_to_one=dict(base_config).get("set_alpha_to_one", False)
        )
    raise ConfigError(f"generation.scheduler={name!r}: choose one of {list(SCHEDULERS)}")


def autocast(device: torch.device | str, mixed_precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast for 'fp16' / 'bf16', a no-op for 'no'."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    if mixed_precision not in dtypes:
        raise ConfigError(f"mixed_precision={mixed_precision!r}: choose no, fp16 or bf16")
    return torch.autocast(device_type=torch.device(device).type, dtype=dtypes[mixed_precision])


def _maybe_compile(unet: torch.nn.Module, compile: bool) -> Any:
    if not compile:
        return unet
    if unet not in _compiled:  # compile once per UNet object, not once per shard
        _compiled[unet] = torch.compile(unet)
    return _compiled[unet]


@torch.no_grad()
def solve_teacher(
    components: SDComponents,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = 25,
    guidance: float = 5.0,
    scheduler: str = "dpmsolver++",
    negative_prompt: str = "",
    device: str | torch.device = "cpu",
    mixed_precision: str = "no",
    compile: bool = False,
    resolution: int | None = None,
) -> Tensor:
    """X1 (B, 4, h, w) float32 on CPU: the teacher's ODE solution from X0 = noise_from_seeds(seeds).

    Classifier-free guidance when guidance > 1 (uncond = `negative_prompt`), as StableDiffusionPipeline does.
    The networks are moved to `device` in place. `resolution` (px) sets h = w = resolution / VAE factor
    (None: the UNet's native sample_size).
    """
    if len(prompts) != len(seeds):
        raise DataError(f"solve_teacher: {len(prompts)} prompts but {len(seeds)} seeds")
    if steps < 1:
        raise ConfigError(f"num_inference_steps must be >= 1, got {steps}")
    b = len(prompts)
    shape = latent_shape(components, resolution)
    if b == 0:
        return torch.empty((0, *shape))
    device = torch.device(device)
    components.to(device)
    sched = make_scheduler(scheduler, components.scheduler.config)
    sched.set_timesteps(steps, device=device)
    unet = _maybe_compile(components.unet, compile)
    do_cfg = guidance > 1.0

    cond = encode_prompts(components.text_encoder, components.tokenizer, list(prompts))  # (B, 77, D)
    if do_cfg:
        uncond = encode_prompts(
            components.text_encoder, components.tokenizer, [negative_prompt]
        )  # (1, 77, D)
        cond = torch.cat([uncond.expand(b, -1, -1), cond])  # (2B, 77, D): uncond first, as diffusers
    cond = cond.to(components.unet.dtype)

    x = noise_from_seeds(seeds, shape).to(device) * sched.init_noise_sigma  # (B, 4, h, w)
    for t in sched.timesteps:
        x_in = torch.cat([x, x]) if do_cfg else x  # (2B or B, 4, h, w)
        x_in = sched.scale_model_input(x_in, t)
        with autocast(device, mixed_precision):
            eps = unet(x_in.to(components.unet.dtype), t, encoder_hidden_states=cond).sample
        eps = eps.float()
        if do_cfg:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        x = sched.step(eps, t, x).prev_sample  # the scheduler integrates in float32
    return x.float().cpu()


@torch.no_grad()
def solve_rf(
    velocity_model: VelocityModel,
    x0: Tensor,
    cond: Any,
    uncond: Any = None,
    steps: int = 25,
    guidance: float = 1.5,
) -> Tensor:
    """A rectified flow's Euler solution from x0 (the 2-RF's distillation pairs): rectified_flow.euler_sample."""
    return euler_sample(velocity_model, x0, cond, steps, guidance=guidance, uncond=uncond)
