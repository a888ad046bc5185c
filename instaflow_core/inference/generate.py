"""Making images from a model: a rectified flow's Euler steps (every family), the teacher's own sampler, the
options users add (LoRA, weight delta, ControlNet), and latent interpolation. What `instaflow sample`,
`interpolate`, `demo`, the registered model, the training sample grids and the evaluation run.

A model folder loads as a `Model` of its family (models/loading.py), whatever its pipeline class; images come
from `flow_images` (encode -> `rectified_flow.euler_sample` over the family's velocity -> the family's decode)
or `teacher_images` (the family's own scheduler). Noise is a seed (`noise_from_seeds`, a CPU generator per
row): the same prompt and seed give the image the evaluation and the registered model give.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from instaflow_core.errors import DataError
from instaflow_core.inference.images import decode_latents
from instaflow_core.models.family import Condition, Model, to_dtype
from instaflow_core.models.loading import load_source
from instaflow_core.models.lora import load_lora, merge_weight_delta
from instaflow_core.rectified_flow import euler_sample, noise_from_seeds

logger = logging.getLogger("instaflow.inference")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model_folder(
    folder: str | Path,
    *,
    dtype: str = "float32",
    device: str | torch.device | None = None,
    controlnet: str | Path | None = None,
) -> Model:
    """The model of a local diffusers folder (safetensors only), optionally with a ControlNet folder (SD
    families), on `device` (default: CUDA when there is one)."""
    path = Path(folder)
    if not (path / "model_index.json").is_file():
        raise DataError(f"{path}: not a diffusers model folder (no model_index.json)")
    model = load_source(path, dtype=dtype)
    if controlnet is not None:
        if model.family.denoiser != "unet":
            raise DataError(
                f"{path}: ControlNet folders fit UNet models; this is a {model.family.name} model"
            )
        model.parts["controlnet"] = load_controlnet(controlnet, dtype)
    return model.to(device or default_device())


def load_controlnet(folder: str | Path, dtype: str = "float32") -> Any:
    """A diffusers ControlNetModel folder (config.json + safetensors)."""
    from diffusers import ControlNetModel

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise DataError(f"{path}: not a ControlNet folder (no config.json)")
    try:
        return ControlNetModel.from_pretrained(path, torch_dtype=to_dtype(dtype), use_safetensors=True).eval()
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot load the ControlNet: {str(err).splitlines()[0]}") from err


def apply_options(
    model: Model,
    *,
    lora: str | Path | None = None,
    lora_scale: float = 1.0,
    delta: tuple[str | Path, str | Path] | None = None,
    alpha: float = 1.0,
) -> Model:
    """The released InstaFlow's model edits, fused into the weights (sampling costs the same after):

    `delta` = (base, finetuned) denoisers: net += alpha * (finetuned - base) (the DreamShaper-style merge);
    `lora`: a diffusers/PEFT or Kohya LoRA file or folder, loaded by the family's diffusers pipeline and fused
    at `lora_scale`.
    """
    if delta is not None:
        base, finetuned = delta
        merge_weight_delta(model.denoiser, finetuned, base, alpha)
        logger.info("merged the weight delta %s - %s at alpha %g", finetuned, base, alpha)
    if lora is not None:
        load_lora(model.family.pipeline(model), lora, lora_scale)
        logger.info("fused LoRA %s at scale %g", lora, lora_scale)
    return model


def load_control_image(path: str | Path) -> Any:
    """A control image file as RGB PIL (resized to the model's resolution when used)."""
    import PIL.Image

    try:
        with PIL.Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as err:
        raise DataError(f"control image {path}: cannot read it ({err})") from err


def control_tensor(image: Any, batch: int, height: int, width: int) -> torch.Tensor:
    """A control image (PIL, array or tensor in [0, 1]) -> (batch, 3, H, W) float32, as diffusers prepares it."""
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(do_convert_rgb=True, do_normalize=False)
    img = proc.preprocess(image, height=height, width=width).to(torch.float32)
    if img.shape[0] == 1:
        img = img.expand(batch, -1, -1, -1)
    elif img.shape[0] != batch:
        raise DataError(f"controlnet image batch {img.shape[0]} does not match the prompt batch {batch}")
    return img


@torch.no_grad()
def flow_latents_from(
    model: Model,
    x0: torch.Tensor,
    cond: Condition,
    steps: int,
    guidance: float = 1.0,
    *,
    negative_prompt: str = "",
    control_image: Any = None,
    control_scale: float = 1.0,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Euler from X0 (B, C, h, w) (t = 0) to X1 (t = 1) along the model's velocity, guidance as its family takes
    it (classifier-free: one doubled forward), float32 on the model's device."""
    if steps < 1:
        raise DataError(f"steps must be >= 1, got {steps}")
    device = model.device
    x0 = x0.to(device=device, dtype=torch.float32)  # integrate in float32 whatever the networks' dtype
    cond = cond.to(device)
    velocity = model.velocity(controlnet=model.get("controlnet"), control_scale=control_scale)
    if control_image is not None:
        if model.get("controlnet") is None:
            raise DataError("a controlnet image was given but the model has no controlnet")
        side = model.geometry().vae_factor
        control = control_tensor(control_image, len(x0), x0.shape[-2] * side, x0.shape[-1] * side).to(device)
        cond = Condition(cond.embeds, cond.pooled, cond.mask, {**cond.extra, "control": control})
    cond, weight = model.family.with_guidance(cond, guidance)
    uncond = None
    if weight > 1.0:
        uncond = model.negative([negative_prompt] * len(x0)).to(device)
        if "control" in cond.extra:  # the control image rides with the text, so guidance doubles it along
            uncond = Condition(
                uncond.embeds, uncond.pooled, uncond.mask, {**uncond.extra, "control": cond.extra["control"]}
            )
    return euler_sample(velocity, x0, cond, steps, guidance=weight, uncond=uncond, on_step=on_step).float()


@torch.no_grad()
def flow_images(
    model: Model,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 1,
    guidance: float = 1.0,
    *,
    resolution: int | None = None,
    negative_prompt: str = "",
    control_image: Any = None,
    control_scale: float = 1.0,
    batch_size: int = 8,
) -> np.ndarray:
    """uint8 images (B, H, W, 3) for prompts[i] from X0 = noise_from_seeds(seeds)[i] at `resolution` px (None:
    the model's native size), `batch_size` at a time: N Euler steps of a rectified flow (1 for InstaFlow)."""
    if len(prompts) != len(seeds):
        raise DataError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not prompts:
        raise DataError("no prompts to generate images for")
    shape = model.latent_shape(resolution)
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        x0 = noise_from_seeds(list(seeds[i : i + batch_size]), shape)
        x1 = flow_latents_from(
            model, x0, model.encode(chunk), steps, guidance, negative_prompt=negative_prompt,
            control_image=control_image, control_scale=control_scale,
        )  # fmt: skip
        out.append(decode_latents(model, x1, batch_size=max(1, len(chunk))))
    return np.concatenate(out)


@torch.no_grad()
def teacher_images(
    model: Model,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance: float,
    scheduler: str,
    *,
    resolution: int | None = None,
    negative_prompt: str = "",
) -> np.ndarray:
    """uint8 images (B, H, W, 3) from the teacher's own sampler (its scheduler, guidance) and decode."""
    from instaflow_core.generation.solvers import teacher_latents

    x1 = teacher_latents(
        model, list(prompts), list(seeds), steps=steps, guidance=guidance, scheduler=scheduler,
        negative_prompt=negative_prompt, device=model.device, resolution=resolution, out_device=None,
    )  # fmt: skip
    return decode_latents(model, x1, batch_size=max(1, len(prompts)))


def slerp(
    x0_a: torch.Tensor, x0_b: torch.Tensor, alpha: float | torch.Tensor, eps: float = 1e-7
) -> torch.Tensor:
    """Spherical interpolation between noises, row by row: x0_a, x0_b (B, ...), alpha scalar or (B,).

    Keeps the norm of Gaussian noise (a straight lerp shrinks it toward the middle); falls back to lerp when
    the two rows are (nearly) parallel. alpha = 0 gives x0_a, 1 gives x0_b.
    """
    if x0_a.shape != x0_b.shape:
        raise DataError(f"slerp: shapes {tuple(x0_a.shape)} and {tuple(x0_b.shape)} differ")
    a, b = x0_a.flatten(1).double(), x0_b.flatten(1).double()  # (B, D)
    alpha_t = torch.as_tensor(alpha, dtype=torch.float64, device=a.device).reshape(-1, 1)  # (1 or B, 1)
    cos = (a * b).sum(1, keepdim=True) / (
        a.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True)
    ).clamp_min(eps)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))  # (B, 1)
    sin = torch.sin(theta)
    parallel = sin.abs() < 1e-4
    safe_sin = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, 1.0 - alpha_t, torch.sin((1.0 - alpha_t) * theta) / safe_sin)
    wb = torch.where(parallel, alpha_t, torch.sin(alpha_t * theta) / safe_sin)
    return (wa * a + wb * b).reshape(x0_a.shape).to(x0_a.dtype)


@torch.no_grad()
def interpolation_frames(
    model: Model,
    prompts: tuple[str, str],
    seeds: tuple[int, int],
    frames: int,
    steps: int = 1,
    guidance: float = 1.0,
    batch_size: int = 8,
) -> np.ndarray:
    """`frames` images (N, H, W, 3) uint8 from prompt/seed A to B: noise slerped, conditions lerped.

    Slerp keeps the Gaussian norm of the noise along the way (a straight lerp would shrink it mid-way); the
    conditions (text embeddings, pooled embeddings) are blended linearly, as the released InstaFlow's
    interpolation videos do.
    """
    if frames < 2:
        raise DataError(f"--frames must be at least 2, got {frames}")
    cond_a, cond_b = model.encode([prompts[0]]), model.encode([prompts[1]])  # 1 row each
    shape = model.latent_shape()
    x_a, x_b = noise_from_seeds([seeds[0]], shape), noise_from_seeds([seeds[1]], shape)
    alphas = torch.linspace(0.0, 1.0, frames)
    out = []
    for i in range(0, frames, batch_size):
        chunk = alphas[i : i + batch_size]
        n = len(chunk)
        x0 = slerp(x_a.expand(n, *shape), x_b.expand(n, *shape), chunk)
        cond = _lerp(cond_a.expand(n), cond_b.expand(n), chunk)
        out.append(decode_latents(model, flow_latents_from(model, x0, cond, steps, guidance), batch_size=n))
    return np.concatenate(out)


def _lerp(a: Condition, b: Condition, w: torch.Tensor) -> Condition:
    """(1 - w) a + w b on the floating fields, row by row (w (n,)); masks and ids from `a`."""

    def mix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            return x
        ww = w.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return (1 - ww) * x + ww * y

    return Condition(
        embeds=mix(a.embeds, b.embeds),
        pooled=None if a.pooled is None else mix(a.pooled, b.pooled),
        mask=a.mask,
        extra={k: mix(v, b.extra[k]) for k, v in a.extra.items()},
    )
