"""Rectified flow: the math, stated once. Pure functions over tensors, no I/O.

Time convention (the one place it is defined; everything else imports it from here):

    t = 0  ->  noise  X0 ~ N(0, I)
    t = 1  ->  data   X1 (for SD: the VAE latent already multiplied by the VAE scaling factor)

    X_t      = t * X1 + (1 - t) * X0          interpolation
    target   = X1 - X0                        the velocity the network predicts
    Euler    t_i = i / N,  x <- x + v(x, t_i) / N,  i = 0 .. N-1
    one step X1_hat = X0 + v(X0, 0)

Each model family maps this convention to its network's own (an SD UNet's timestep (1 - t) * 1000, SD3's and
FLUX's sigma = 1 - t with the opposite velocity) in its module under models/, and nowhere else.

A velocity model is any callable `model(x_t, t, cond) -> v` with x_t (B, ...), t (B,) in [0, 1] and v shaped
like x_t. `cond` is whatever the model understands: a family's `Condition` (a dataclass of batch-first tensors),
text embeddings (B, 77, D), class ids (B,), a list, a dict.
Classifier-free guidance needs an `uncond` of the same kind (batch 1 or B); it is concatenated in front of
`cond` along dim 0 so that one forward evaluates both.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from instaflow_core.errors import ConfigError

VelocityModel = Callable[[Tensor, Tensor, Any], Tensor]
TSchedule = Literal["uniform", "logit_normal", "cosmap", "u_shaped"]
LossKind = Literal["l2", "pseudo_huber", "lpips"]

U_SHAPED_A = 4.0  # 2-rectified flow++'s U-shaped density exp(a t) + exp(a (1 - t)), a = 4 (Lee et al. 2024)


# ------------------------------------------------------------------------------------------- the noise
def noise_from_seeds(seeds: Sequence[int], shape: Sequence[int]) -> Tensor:
    """X0 (B, *shape) float32 on CPU, row i drawn from `torch.Generator().manual_seed(seeds[i])`.

    Noise is a seed: drawn on a CPU generator it is the same on any device and in any batch composition, so a
    triplet stores its seed, not its noise. Imports torch only (DataLoader workers start in a second).
    """
    out = torch.empty((len(seeds), *shape))
    gen = torch.Generator()
    for i, s in enumerate(seeds):
        # manual_seed resets the whole generator state: identical to a fresh Generator per row; writing into
        # the output row saves the stack copy.
        torch.randn(tuple(shape), generator=gen.manual_seed(int(s)), out=out[i])
    return out


# ------------------------------------------------------------------------------------------- the path
def _per_row(t: Tensor | float, like: Tensor) -> Tensor:
    """t (B,) or a float -> (B, 1, 1, ...) broadcastable against `like` (B, ...)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x0: Tensor, x1: Tensor, t: Tensor | float) -> Tensor:
    """X_t = t * X1 + (1 - t) * X0; x0, x1 (B, ...), t (B,) or scalar -> (B, ...)."""
    tb = _per_row(t, x0)  # (B, 1, ...)
    return tb * x1 + (1.0 - tb) * x0


def velocity_target(x0: Tensor, x1: Tensor) -> Tensor:
    """The straight-line velocity X1 - X0, (B, ...)."""
    return x1 - x0


def sample_t(
    n: int,
    schedule: TSchedule = "uniform",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """n training times in [0, 1], (n,) float32.

    uniform: U[0, 1] (the InstaFlow paper). logit_normal: sigmoid(N(0, 1)), mass in the middle (SD3).
    cosmap: t = 1 - 1 / (tan(pi u / 2) + 1), a density symmetric about 1/2 (SD3). u_shaped: p(t) ~ exp(a t) +
    exp(a (1 - t)), mass at both ends (2-rectified flow++, NeurIPS 2024): an exponential draw
    t = log(1 + u (e^a - 1)) / a, mirrored to 1 - t with probability 1/2. The draw happens on the generator's
    device (CPU by default) and is then moved, so a seed gives the same times on any device.
    """
    gen_device = generator.device if generator is not None else "cpu"
    if schedule == "uniform":
        t = torch.rand(n, generator=generator, device=gen_device)
    elif schedule == "logit_normal":
        t = torch.sigmoid(torch.randn(n, generator=generator, device=gen_device))
    elif schedule == "cosmap":
        u = torch.rand(n, generator=generator, device=gen_device)
        t = 1.0 - 1.0 / (torch.tan(u * (math.pi / 2)) + 1.0)
    elif schedule == "u_shaped":
        u = torch.rand(n, generator=generator, device=gen_device)
        t = torch.log1p(u * math.expm1(U_SHAPED_A)) / U_SHAPED_A
        flip = torch.rand(n, generator=generator, device=gen_device) < 0.5
        t = torch.where(flip, 1.0 - t, t)
    else:
        raise ConfigError(f"t_schedule {schedule!r}: choose uniform, logit_normal, cosmap or u_shaped")
    return t.clamp_(0.0, 1.0).to(device if device is not None else gen_device)


# ------------------------------------------------------------------------------------------- guidance
def _is_record(c: Any) -> bool:
    """A dataclass instance (a family's `Condition`): handled field by field like a dict."""
    return dataclasses.is_dataclass(c) and not isinstance(c, type)


def _fields(c: Any) -> dict[str, Any]:
    return {f.name: getattr(c, f.name) for f in dataclasses.fields(c)}


def _batch_size(cond: Any) -> int | None:
    if isinstance(cond, Tensor):
        return cond.shape[0] if cond.ndim > 0 else None
    if isinstance(cond, (list, tuple)):
        return len(cond)
    if _is_record(cond):
        cond = {k: v for k, v in _fields(cond).items() if v is not None}
    if isinstance(cond, dict) and cond:
        return _batch_size(next(iter(cond.values())))
    return None


def _expand(c: Any, n: int) -> Any:
    """Broadcast a batch-1 condition to n rows (tensor, list/tuple, dict or dataclass of those; None stays)."""
    if isinstance(c, Tensor):
        return c.expand(n, *c.shape[1:]) if c.shape[0] == 1 and n != 1 else c
    if isinstance(c, (list, tuple)):
        return type(c)(list(c) * n) if len(c) == 1 and n != 1 else c
    if isinstance(c, dict):
        return {k: _expand(v, n) for k, v in c.items()}
    if _is_record(c):
        return dataclasses.replace(c, **{k: _expand(v, n) for k, v in _fields(c).items()})
    return c


def concat_cond(uncond: Any, cond: Any, batch: int) -> Any:
    """[uncond; cond] along dim 0, uncond broadcast to `batch` rows first: (2B, ...)."""
    uncond, cond = _expand(uncond, batch), _expand(cond, batch)
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return torch.cat([uncond.to(device=cond.device, dtype=cond.dtype), cond], dim=0)
    if isinstance(cond, (list, tuple)):
        return type(cond)(list(uncond) + list(cond))
    if isinstance(cond, dict):
        return {k: concat_cond(uncond[k], cond[k], batch) for k in cond}
    if _is_record(cond):
        u = _fields(uncond)
        return dataclasses.replace(cond, **{k: concat_cond(u[k], v, batch) for k, v in _fields(cond).items()})
    raise TypeError(f"cannot batch conditions of type {type(cond).__name__} for guidance")


def guided_velocity(
    model: VelocityModel,
    x: Tensor,
    t: Tensor,
    cond: Any,
    uncond: Any = None,
    guidance: float = 1.0,
) -> Tensor:
    """v = v_u + w (v_c - v_u) when w > 1 (one forward on the doubled batch), else v_c. x (B, ...), t (B,)."""
    if guidance <= 1.0:
        return model(x, t, cond)
    if uncond is None:
        raise ValueError(f"guidance {guidance} > 1 needs an unconditional input (uncond)")
    b = x.shape[0]
    v = model(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), concat_cond(uncond, cond, b))  # (2B, ...)
    v_u, v_c = v[:b], v[b:]
    return v_u + guidance * (v_c - v_u)


# ------------------------------------------------------------------------------------------- sampling
def _euler(
    model: VelocityModel,
    x0: Tensor,
    cond: Any,
    steps: int,
    guidance: float,
    uncond: Any,
    on_step: Callable[[int], None] | None = None,
    keep: bool = True,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The Euler loop, autograd left as the caller set it. Returns x1 (B, ...), states [N+1], velocities [N]
    (empty lists when `keep` is false: a sampler that needs only x1 holds one state at a time)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x, b = x0, x0.shape[0]
    states, velocities = ([x0], []) if keep else ([], [])
    for i in range(steps):
        t = torch.full((b,), i / steps, dtype=x0.dtype, device=x0.device)  # (B,)
        v = guided_velocity(model, x, t, cond, uncond, guidance)  # (B, ...)
        x = x + v / steps
        if keep:
            states.append(x)
            velocities.append(v)
        if on_step is not None:
            on_step(i)
    return x, states, velocities


@torch.no_grad()
def euler_sample(
    model: VelocityModel,
    x0: Tensor,
    cond: Any,
    steps: int,
    guidance: float = 1.0,
    uncond: Any = None,
    return_trajectory: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Solve dx/dt = v(x, t) from t=0 (x0, noise) to t=1 with N Euler steps: x1 (B, ...).

    With return_trajectory, also the states (N+1, B, ...) at t = 0, 1/N, ..., 1. `on_step(i)` is called after
    step i (progress bars).
    """
    x1, states, _ = _euler(model, x0, cond, steps, guidance, uncond, on_step, keep=return_trajectory)
    return (x1, torch.stack(states)) if return_trajectory else x1


@torch.no_grad()
def straightness(
    model: VelocityModel,
    x0: Tensor,
    cond: Any,
    steps: int,
    guidance: float = 1.0,
    uncond: Any = None,
) -> float:
    """S = int_0^1 E ||(Z1 - Z0) - v(Z_t, t)||^2 dt along the model's own Euler trajectory (0 = straight).

    The squared norm is averaged over elements (so S does not grow with the latent size), then over samples,
    and the time integral is the N-point left Riemann sum at the Euler nodes t_i = i/N.
    """
    z1, _, velocities = _euler(model, x0, cond, steps, guidance, uncond)
    chord = z1 - x0  # (B, ...)
    dims = tuple(range(1, x0.ndim))
    per_t = [((chord - v) ** 2).mean(dim=dims).mean() for v in velocities]  # N scalars
    return float(torch.stack(per_t).mean())


# ------------------------------------------------------------------------------------------- losses
def pair_loss(pred: Tensor, target: Tensor, kind: str = "l2", huber_c: float = 0.001) -> Tensor:
    """A scalar distance between pred and target (B, ...).

    l2: mean squared error over all elements. pseudo_huber: mean over rows of sqrt(||d||^2 + c^2) - c with
    c = huber_c * sqrt(dim) (dim = elements per row), so the constant means the same at any latent size.
    """
    d = (pred.float() - target.float()).flatten(1)  # (B, dim)
    if kind == "l2":
        return d.pow(2).mean()
    if kind == "pseudo_huber":
        c = huber_c * math.sqrt(d.shape[1])
        return (torch.sqrt(d.pow(2).sum(dim=1) + c * c) - c).mean()
    raise ConfigError(f"loss {kind!r} is not defined on latents here: choose l2 or pseudo_huber")


def reflow_loss(
    model: VelocityModel,
    x0: Tensor,
    x1: Tensor,
    cond: Any,
    t: Tensor | None = None,
    kind: str = "l2",
    huber_c: float = 0.001,
) -> Tensor:
    """E || (X1 - X0) - v(X_t, t | cond) ||: the (re)flow objective. x0, x1 (B, ...), t (B,) or None = U[0,1]."""
    if t is None:
        t = torch.rand(x0.shape[0], device=x0.device)
    t = t.to(device=x0.device, dtype=x0.dtype)
    x_t = interpolate(x0, x1, t)  # (B, ...)
    pred = model(x_t, t, cond)  # (B, ...)
    return pair_loss(pred, velocity_target(x0, x1), kind, huber_c)


def one_step(model: VelocityModel, x0: Tensor, cond: Any) -> Tensor:
    """X1_hat = X0 + v(X0, t=0), with autograd (the one-step generator being distilled)."""
    t = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)  # (B,)
    return x0 + model(x0, t, cond)


def _image_loss(
    pred: Tensor, target: Tensor, decode: Callable[[Tensor], Tensor] | None, lpips: Callable | None
) -> Tensor:
    if decode is None or lpips is None:
        raise ConfigError(
            "distill loss 'lpips' needs a decoder and an LPIPS network (set distillation.lpips_weights); "
            "use loss l2 or pseudo_huber otherwise"
        )
    return lpips(decode(pred), decode(target)).mean()


def distill_loss(
    model: VelocityModel,
    x0: Tensor,
    x1: Tensor,
    cond: Any,
    kind: str = "l2",
    huber_c: float = 0.001,
    decode: Callable[[Tensor], Tensor] | None = None,
    lpips: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """One-step distillation: X0 + v(X0, 0) should land on the teacher's ODE output X1 (B, ...).

    kind l2 / pseudo_huber compare latents; lpips decodes both with `decode` (latents -> images in [-1, 1])
    and averages `lpips(images_pred, images_target)`.
    """
    pred = one_step(model, x0, cond)  # (B, ...)
    if kind == "lpips":
        return _image_loss(pred, x1, decode, lpips)
    return pair_loss(pred, x1, kind, huber_c)


def k_step_distill_loss(
    model: VelocityModel,
    x0: Tensor,
    x1: Tensor,
    cond: Any,
    k: int,
    kind: str = "l2",
    huber_c: float = 0.001,
    decode: Callable[[Tensor], Tensor] | None = None,
    lpips: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """k-step distillation: the k-step Euler output (gradients through every step) should match X1."""
    pred, _, _ = _euler(model, x0, cond, k, 1.0, None)
    if kind == "lpips":
        return _image_loss(pred, x1, decode, lpips)
    return pair_loss(pred, x1, kind, huber_c)
