"""The image geometry of an SD-architecture model: latent channels, native size, VAE and UNet down-sampling.

A `resolution` setting (`generation.resolution`, `distillation.pairs.resolution`, `evaluation.resolution`) is
the image side in pixels; the latent side is `resolution / vae_factor`. An SD UNet runs at any latent size its
down-sampling divides (2 ** (levels - 1): 8 for SD 1.5), so SD 1.5 takes any multiple of 64 px (256 for a pilot,
512 native, 768 ...). `None` means the model's native size: the UNet's `sample_size` times the VAE factor.
Read from the component configs alone (no weights), so a preflight can check it before anything is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from instaflow_core.errors import ConfigError


@dataclass(frozen=True)
class Geometry:
    """in_channels and native latent (h, w) of the denoiser; the VAE's and the denoiser's down-sampling factors
    (a UNet's levels, a transformer's patch size: `factor_name` says which in messages); `max_latent`: the largest
    latent side the denoiser takes (a transformer's position embedding grid), None for no limit."""

    in_channels: int
    sample_size: tuple[int, int]
    vae_factor: int
    unet_factor: int
    factor_name: str = "UNet down-sampling"
    max_latent: int | None = None

    @classmethod
    def from_configs(cls, unet: dict[str, Any], vae: dict[str, Any] | None) -> Geometry:
        """From unet/config.json and vae/config.json (as dicts; a missing VAE config means SD's factor 8)."""
        size = unet.get("sample_size", 64)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        levels = len(unet.get("down_block_types") or unet.get("block_out_channels") or [0] * 4)
        vae_levels = len((vae or {}).get("block_out_channels") or [0] * 4)
        return cls(
            int(unet.get("in_channels", 4)), (int(h), int(w)), 2 ** (vae_levels - 1), 2 ** (levels - 1)
        )

    @property
    def native_resolution(self) -> int:
        """The image side the UNet was configured for (512 for SD 1.5)."""
        return self.sample_size[0] * self.vae_factor

    def problem(self, resolution: int | None, what: str = "resolution") -> str | None:
        """Why `resolution` does not fit this model (None when it does, or when it is None = native)."""
        if resolution is None:
            return None
        step = self.vae_factor * self.unet_factor
        if resolution <= 0 or resolution % step:
            return (
                f"{what}={resolution}: must be a multiple of {step} px for this model (VAE factor "
                f"{self.vae_factor} x {self.factor_name} {self.unet_factor}); e.g. {max(step, resolution // step * step)}"
                f" (native {self.native_resolution})"
            )
        if self.max_latent is not None and resolution // self.vae_factor > self.max_latent:
            return (
                f"{what}={resolution}: larger than this model takes ({self.max_latent * self.vae_factor} px at most: "
                f"its position embeddings cover {self.max_latent} latents a side)"
            )
        return None

    def latent_shape(self, resolution: int | None = None, what: str = "resolution") -> tuple[int, int, int]:
        """(C, h, w) of the latents at `resolution` px (None: the native size); ConfigError when it does not fit."""
        if resolution is None:
            return (self.in_channels, *self.sample_size)
        problem = self.problem(resolution, what)
        if problem:
            raise ConfigError(problem)
        side = resolution // self.vae_factor
        return (self.in_channels, side, side)

    def resolution_of(self, latent_shape: tuple[int, ...]) -> int:
        """The image side in px of latents (C, h, w)."""
        return int(latent_shape[-2]) * self.vae_factor

    def latent_problem(self, latent_shape: tuple[int, ...]) -> str | None:
        """Why latents of this shape cannot train this UNet (channels, or a size its down-sampling does not divide)."""
        c, h, w = (int(s) for s in latent_shape)
        if c != self.in_channels:
            return f"latents have {c} channels, the model takes {self.in_channels}"
        if h % self.unet_factor or w % self.unet_factor:
            return f"latents of {h}x{w} do not fit the {self.factor_name} by {self.unet_factor}"
        if self.max_latent is not None and max(h, w) > self.max_latent:
            return f"latents of {h}x{w} are larger than the {self.max_latent} a side the model takes"
        return None


def tiny_geometry(tiny_cfg: Any) -> Geometry:
    """The tiny teacher's geometry from its config (models.tiny), without building it (see models/sd.py's `build_tiny`)."""
    return Geometry(
        in_channels=4,
        sample_size=(int(tiny_cfg.sample_size), int(tiny_cfg.sample_size)),
        vae_factor=2 ** (len(tiny_cfg.vae_channels) - 1),
        unet_factor=2 ** (len(tiny_cfg.unet_channels) - 1),
    )
