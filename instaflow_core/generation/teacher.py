"""Teacher sampling: SD's probability-flow ODE through a diffusers scheduler, noise from seeds, 2-RF pairs.

`solve_teacher` is the loop of diffusers' StableDiffusionPipeline written out for a batch of (prompt, seed)
rows: X0 comes from per-row CPU generators (so the same seed gives the same X0 on any device and any batch
composition), uncond and cond run in one doubled forward, and the result is the scaled latent X1 (decode it
with `vae.decode(x1 / scaling_factor)`; generation never decodes). A fresh scheduler is made per call:
multistep schedulers keep state. The GPU fast paths are options of the same function (docs/gpu-speed.md):
`channels_last` and `compile` are set on the UNet itself (once: later calls find them set), `cfg_batched=False`
runs uncond and cond as two forwards (half the activation memory), `out_device=None` leaves X1 on the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, SchedulerMixin
from torch import Tensor

from instaflow_core.errors import ConfigError, DataError
from instaflow_core.models.components import SDComponents
from instaflow_core.models.loading import latent_shape
from instaflow_core.models.switches import set_switches
from instaflow_core.models.velocity import encode_prompts
from instaflow_core.rectified_flow import VelocityModel, euler_sample, noise_from_seeds

SCHEDULERS = ("dpmsolver++", "euler", "ddim")


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
    channels_last: bool = False,
    cfg_batched: bool = True,
    out_device: str | torch.device | None = "cpu",
    resolution: int | None = None,
) -> Tensor:
    """X1 (B, 4, h, w) float32 on `out_device` (None: left on `device`): the teacher's ODE solution from
    X0 = noise_from_seeds(seeds).

    Classifier-free guidance when guidance > 1 (uncond = `negative_prompt`), as StableDiffusionPipeline does.
    The networks are moved to `device` in place; `compile` / `channels_last` are switched on the UNet in place
    (only ever on: another stage may share the module). `resolution` (px) sets
    h = w = resolution / VAE factor (None: the UNet's native sample_size).
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
    unet = components.unet
    set_switches(unet, channels_last=channels_last or None, compile=compile or None)
    sched = make_scheduler(scheduler, components.scheduler.config)
    sched.set_timesteps(steps, device=device)
    do_cfg = guidance > 1.0

    cond = encode_prompts(components.text_encoder, components.tokenizer, list(prompts))  # (B, 77, D)
    uncond = None
    if do_cfg:
        uncond = encode_prompts(components.text_encoder, components.tokenizer, [negative_prompt]).expand(
            b, -1, -1
        )  # (B, 77, D)
        if cfg_batched:
            cond = torch.cat([uncond, cond])  # (2B, 77, D): uncond first, as diffusers
        uncond = uncond.to(unet.dtype)
    cond = cond.to(unet.dtype)

    x0 = noise_from_seeds(seeds, shape)  # (B, 4, h, w) on the CPU, one generator per seed
    if device.type == "cuda":  # pinned: an asynchronous upload, not a synchronous copy from pageable memory
        x0 = x0.pin_memory()
    x = x0.to(device, non_blocking=True) * sched.init_noise_sigma
    for t in sched.timesteps:
        with autocast(device, mixed_precision):
            if do_cfg and cfg_batched:
                x_in = sched.scale_model_input(torch.cat([x, x]), t)  # (2B, 4, h, w)
                eps = unet(x_in.to(unet.dtype), t, encoder_hidden_states=cond).sample
            else:  # no guidance, or uncond and cond as two forwards of (B, 4, h, w)
                x_in = sched.scale_model_input(x, t).to(unet.dtype)
                eps = unet(x_in, t, encoder_hidden_states=cond).sample
                if do_cfg:
                    eps = torch.cat([unet(x_in, t, encoder_hidden_states=uncond).sample, eps])
        eps = eps.float()
        if do_cfg:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        x = sched.step(eps, t, x).prev_sample  # the scheduler integrates in float32
    x = x.float()
    return x if out_device is None else x.to(out_device)


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
