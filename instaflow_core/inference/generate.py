"""Making images from a saved model folder: the pipeline with its options (LoRA, weight delta, ControlNet),
generation from seeds, and latent interpolation. What `instaflow sample`, `interpolate` and `demo` run.

Everything goes through `InstaFlowPipeline.from_pretrained(folder)`, whatever model classes the folder's
model_index.json names, so any model the pipeline loads works here. Noise is a seed (`noise_from_seeds`, a CPU
generator per row): the same prompt and seed give the image the evaluation and the registered model give.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from instaflow_core.errors import DataError
from instaflow_core.inference.images import to_uint8
from instaflow_core.inference.pipeline import InstaFlowPipeline, slerp
from instaflow_core.models.components import to_dtype
from instaflow_core.models.lora import load_lora, merge_weight_delta
from instaflow_core.rectified_flow import noise_from_seeds

logger = logging.getLogger("instaflow.inference")


def load_pipeline(
    folder: str | Path,
    *,
    dtype: str = "float32",
    device: str | torch.device | None = None,
    controlnet: str | Path | None = None,
) -> InstaFlowPipeline:
    """The pipeline of a local diffusers folder (safetensors only), optionally with a ControlNet folder."""
    path = Path(folder)
    if not (path / "model_index.json").is_file():
        raise DataError(f"{path}: not a diffusers model folder (no model_index.json)")
    extra: dict[str, Any] = {}
    if controlnet is not None:
        extra["controlnet"] = load_controlnet(controlnet, dtype)
    try:
        pipe = InstaFlowPipeline.from_pretrained(
            path, torch_dtype=to_dtype(dtype), use_safetensors=True, local_files_only=True, **extra
        )
    except (OSError, ValueError, TypeError) as err:
        raise DataError(f"{path}: cannot load the model: {str(err).splitlines()[0]}") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


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
    pipe: InstaFlowPipeline,
    *,
    lora: str | Path | None = None,
    lora_scale: float = 1.0,
    delta: tuple[str | Path, str | Path] | None = None,
    alpha: float = 1.0,
) -> InstaFlowPipeline:
    """The released InstaFlow's model edits, fused into the weights (sampling costs the same after):

    `delta` = (base, finetuned) UNets: unet += alpha * (finetuned - base) (the DreamShaper-style merge);
    `lora`: a diffusers/PEFT or Kohya LoRA file or folder, fused at `lora_scale`.
    """
    if delta is not None:
        base, finetuned = delta
        merge_weight_delta(pipe, finetuned, base, alpha)
        logger.info("merged the weight delta %s - %s at alpha %g", finetuned, base, alpha)
    if lora is not None:
        load_lora(pipe, lora, lora_scale)
        logger.info("fused LoRA %s at scale %g", lora, lora_scale)
    return pipe


def latent_shape(pipe: InstaFlowPipeline) -> tuple[int, int, int]:
    """(C, h, w) of the noise the pipeline starts from, from its UNet config."""
    size = pipe.unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(pipe.unet.config.in_channels), int(h), int(w))


def load_control_image(path: str | Path) -> Any:
    """A control image file as RGB PIL (the pipeline resizes it to the model's resolution)."""
    import PIL.Image

    try:
        with PIL.Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as err:
        raise DataError(f"control image {path}: cannot read it ({err})") from err


@torch.no_grad()
def generate(
    pipe: InstaFlowPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 1,
    guidance: float = 1.0,
    *,
    control_image: Any = None,
    control_scale: float = 1.0,
    batch_size: int = 8,
) -> np.ndarray:
    """uint8 images (B, H, W, 3) for prompts[i] from X0 = noise_from_seeds(seeds)[i], `batch_size` at a time."""
    if len(prompts) != len(seeds):
        raise DataError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not prompts:
        raise DataError("no prompts to generate images for")
    shape = latent_shape(pipe)
    out = []
    for i in range(0, len(prompts), batch_size):
        x0 = noise_from_seeds(list(seeds[i : i + batch_size]), shape)
        extra: dict[str, Any] = {}
        if control_image is not None:
            extra = {"image": control_image, "controlnet_conditioning_scale": control_scale}
        images = pipe(
            list(prompts[i : i + batch_size]),
            num_inference_steps=int(steps),
            guidance_scale=float(guidance),
            latents=x0,
            output_type="np",
            **extra,
        ).images
        out.append(to_uint8(images))
    return np.concatenate(out)


@torch.no_grad()
def interpolation_frames(
    pipe: InstaFlowPipeline,
    prompts: tuple[str, str],
    seeds: tuple[int, int],
    frames: int,
    steps: int = 1,
    guidance: float = 1.0,
    batch_size: int = 8,
) -> np.ndarray:
    """`frames` images (N, H, W, 3) uint8 from prompt/seed A to B: noise slerped, text embeddings lerped.

    Slerp keeps the Gaussian norm of the noise along the way (a straight lerp would shrink it mid-way); the
    text embeddings are blended linearly, as the released InstaFlow's interpolation videos do.
    """
    if frames < 2:
        raise DataError(f"--frames must be at least 2, got {frames}")
    velocity = pipe.velocity_model()
    emb_a, emb_b = velocity.encode([prompts[0]]), velocity.encode([prompts[1]])  # (1, T, D)
    x_a, x_b = (
        noise_from_seeds([seeds[0]], latent_shape(pipe)),
        noise_from_seeds([seeds[1]], latent_shape(pipe)),
    )
    alphas = torch.linspace(0.0, 1.0, frames)
    out = []
    for i in range(0, frames, batch_size):
        chunk = alphas[i : i + batch_size]
        n = len(chunk)
        x0 = slerp(x_a.expand(n, -1, -1, -1), x_b.expand(n, -1, -1, -1), chunk)
        w = chunk.reshape(-1, 1, 1).to(emb_a.dtype)
        embeds = (1 - w) * emb_a + w * emb_b  # (n, T, D)
        images = pipe(
            prompt_embeds=embeds,
            num_inference_steps=int(steps),
            guidance_scale=float(guidance),
            latents=x0,
            output_type="np",
        ).images
        out.append(to_uint8(images))
    return np.concatenate(out)
