"""The five parts of an SD-architecture model, and the dtypes they load in."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    SchedulerMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, PreTrainedTokenizerBase

from instaflow_core.errors import ConfigError

# SD 1.x noise schedule (scheduler_config.json of stable-diffusion-v1-5): the tiny teacher uses the same one.
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    prediction_type="epsilon",
)


SD15_SCALING_FACTOR = 0.18215


COMPONENT_NAMES = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SDComponents:
    """The five parts of an SD-architecture model. `save` writes a standard diffusers SD folder."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerBase
    scheduler: SchedulerMixin

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
    ) -> SDComponents:
        """Move (and optionally cast) the three networks in place; returns self."""
        kwargs: dict[str, Any] = {}
        if device is not None:
            kwargs["device"] = device
        if dtype is not None:
            kwargs["dtype"] = to_dtype(dtype)
        if kwargs:
            for module in (self.unet, self.vae, self.text_encoder):
                module.to(**kwargs)
        return self

    def save(self, path: str | Path) -> Path:
        """Write a diffusers folder (model_index.json says StableDiffusionPipeline, safety checker null)."""
        path = Path(path)
        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(path, safe_serialization=True)
        # transformers 5 writes only tokenizer.json; older readers (and the released folders) use vocab + merges.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and hasattr(backend.model, "save"):
            backend.model.save(str(path / "tokenizer"))
        return path

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def to_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' (or a torch.dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"models.dtype={dtype!r}: choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]
