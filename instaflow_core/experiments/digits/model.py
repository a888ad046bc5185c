"""The digits model family: pixel-space models for small grey images, shaped like SD's components, so the SD
family's velocity mapping, conditions and folder layout apply unchanged (`DigitsFamily(SDFamily)`).

- `DigitsVelocityNet` stands in for SD's UNet: `forward(sample, timestep, encoder_hidden_states)` with sample
  (B, 1, 8, 8), the SD timestep tau = (1 - t) * 1000 (B,) (1000 = noise, mapped by the SD family's `velocity`,
  the one place that applies it) and CLIP hidden states (B, 77, D); returns an output with `.sample` (the
  velocity X1 - X0). A residual MLP over the pixels with DiT-style adaptive LayerNorm on (time + pooled text):
  ~0.9M parameters, ~20x faster than a UNet at 8x8 on a CPU (STACK.md).
- `DigitsPixelVAE` stands in for SD's VAE: the identity between [-1, 1] images and the "latent" (pixels times
  `scaling_factor`), with `encode(x).latent_dist.sample()` and `decode(z).sample` (grey, repeated to
  `out_channels` = 3 so diffusers' image processor and PIL see RGB).
- `build_digits(cfg)`: a fresh (random-init, seeded) model; the pretrain stage saves it as a diffusers folder and
  trains the velocity net into a text-conditioned 1-rectified flow, which the family samples by Euler steps.

Both classes are `diffusers.ModelMixin` + `ConfigMixin` (safetensors `save_pretrained` / `from_pretrained`). A
saved folder names them as ["instaflow_core.experiments.digits.model", "DigitsVelocityNet"] in model_index.json;
`models.family.CUSTOM_CLASSES` finds them by their config's `_class_name` when a folder is loaded, and
`inference/pipeline.py` imports this module so diffusers' own `from_pretrained` finds them too (diffusers looks
non-diffusers libraries up in `sys.modules` only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.utils import BaseOutput
from torch import Tensor, nn

from instaflow_core.experiments.digits.config import DigitsModelConfig
from instaflow_core.models.family import Model
from instaflow_core.models.sd import SDFamily, clip_text_encoder, sd15_scheduler
from instaflow_core.models.tokenizer import tiny_tokenizer

__all__ = [
    "FAMILY",
    "DigitsFamily",
    "DigitsPixelVAE",
    "DigitsVelocityNet",
    "DigitsVelocityOutput",
    "build_digits",
]


@dataclass
class DigitsVelocityOutput(BaseOutput):
    """Like `UNet2DConditionOutput`: `sample` is the predicted velocity, shaped like the input (B, C, H, W)."""

    sample: Tensor


class _AdaLNBlock(nn.Module):
    """h + gate(c) * MLP(LN(h) * (1 + scale(c)) + shift(c)): a DiT block without attention."""

    def __init__(self, hidden: int, cond_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        inner = int(hidden * mlp_ratio)
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.SiLU(), nn.Linear(inner, hidden))
        self.modulation = nn.Linear(cond_dim, 3 * hidden)
        nn.init.zeros_(self.modulation.weight)  # the block starts as the identity (adaLN-Zero)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(c).chunk(3, dim=1)  # 3 x (B, hidden)
        return h + gate * self.mlp(self.norm(h) * (1 + scale) + shift)


class DigitsVelocityNet(ModelMixin, ConfigMixin):
    """A text-conditioned velocity network over small images, called exactly like an SD UNet.

    Time: the SD timestep tau in [0, num_train_timesteps] is mapped to s = tau / num_train_timesteps (1 = noise)
    and embedded with sin/cos features. Text: the (B, 77, D) hidden states are pooled (`text_pooling`: "mean"
    over the tokens, or "attention" with one learned query) and projected; the encoder itself stays outside.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        sample_size: int = 8,
        in_channels: int = 1,
        out_channels: int = 1,
        cross_attention_dim: int = 64,
        hidden_size: int = 256,
        num_blocks: int = 3,
        mlp_ratio: float = 1.0,
        cond_dim: int = 256,
        time_frequencies: int = 8,
        text_pooling: str = "mean",
        text_norm: str = "batch",
        num_train_timesteps: int = 1000,
    ) -> None:
        super().__init__()
        if text_pooling not in ("mean", "attention"):
            raise ValueError(f"text_pooling {text_pooling!r}: choose mean or attention")
        if in_channels != out_channels:
            raise ValueError("in_channels must equal out_channels (the output is a velocity of the input)")
        n_pix = in_channels * sample_size * sample_size
        self.register_buffer(
            "freqs",
            math.pi * 2.0 ** torch.arange(time_frequencies, dtype=torch.float32) / 2,
            persistent=False,
        )
        self.time_embed = nn.Sequential(
            nn.Linear(2 * time_frequencies, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )
        if text_pooling == "attention":
            self.text_query = nn.Parameter(torch.randn(cross_attention_dim) / math.sqrt(cross_attention_dim))
        if text_norm not in ("layer", "batch"):
            raise ValueError(f"text_norm {text_norm!r}: choose layer or batch")
        # batch: standardise each feature over the prompts seen in training (running statistics at inference):
        # removes the component all captions share, which dominates a frozen random encoder's pooled states
        norm = (
            nn.LayerNorm(cross_attention_dim) if text_norm == "layer" else nn.BatchNorm1d(cross_attention_dim)
        )
        self.text_embed = nn.Sequential(
            norm, nn.Linear(cross_attention_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )
        self.proj_in = nn.Linear(n_pix, hidden_size)
        self.blocks = nn.ModuleList(_AdaLNBlock(hidden_size, cond_dim, mlp_ratio) for _ in range(num_blocks))
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.out_modulation = nn.Linear(cond_dim, 2 * hidden_size)
        self.proj_out = nn.Linear(hidden_size, n_pix)
        for layer in (self.out_modulation, self.proj_out):  # v = 0 at init
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def pool_text(self, encoder_hidden_states: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L, D) hidden states -> (B, D): masked mean, or softmax attention of one learned query."""
        h = encoder_hidden_states.float()
        mask = None if attention_mask is None else attention_mask.to(h.dtype)  # (B, L), 1 = keep
        if self.config.text_pooling == "mean":
            if mask is None:
                return h.mean(dim=1)
            return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        logits = h @ self.text_query / math.sqrt(h.shape[-1])  # (B, L)
        if mask is not None:
            logits = logits.masked_fill(mask == 0, float("-inf"))
        return (logits.softmax(dim=1)[..., None] * h).sum(1)

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float,
        encoder_hidden_states: Tensor,
        encoder_attention_mask: Tensor | None = None,
        return_dict: bool = True,
        **kwargs: object,
    ) -> DigitsVelocityOutput | tuple[Tensor]:
        """sample (B, C, H, W), timestep tau (B,) or scalar (1000 = noise), encoder_hidden_states (B, L, D).

        Extra UNet keywords (cross_attention_kwargs, added_cond_kwargs, ...) are accepted and ignored; ControlNet
        residuals are not supported (there are no feature maps to add them to).
        """
        for key in ("down_block_additional_residuals", "mid_block_additional_residual"):
            if kwargs.get(key) is not None:
                raise ValueError(f"{type(self).__name__} does not take ControlNet residuals ({key})")
        b = sample.shape[0]
        tau = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32)
        if tau.ndim == 0:
            tau = tau.expand(b)
        s = tau / self.config.num_train_timesteps  # (B,) 1 = noise
        sf = s[:, None] * self.freqs  # (B, F)
        c = self.time_embed(torch.cat([sf.sin(), sf.cos()], dim=1))  # (B, cond)
        c = c + self.text_embed(self.pool_text(encoder_hidden_states, encoder_attention_mask))
        c = nn.functional.silu(c)
        h = self.proj_in(sample.float().flatten(1))  # (B, hidden)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.out_modulation(c).chunk(2, dim=1)
        v = self.proj_out(self.norm_out(h) * (1 + scale) + shift).view_as(sample).to(sample.dtype)
        return DigitsVelocityOutput(sample=v) if return_dict else (v,)


class DigitsPixelVAE(ModelMixin, ConfigMixin):
    """The identity "autoencoder" of pixel-space models: latent = image * scaling_factor, image in [-1, 1].

    encode: (B, in_channels, H, W) -> grey (channel mean) -> `AutoencoderKLOutput` whose `latent_dist` is a
    deterministic `DiagonalGaussianDistribution` (sample() = mode() = the image), so SD-style code
    `vae.encode(x).latent_dist.sample() * scaling_factor` works. decode: (B, latent_channels, H, W) -> clamp to
    [-1, 1] -> repeated to out_channels. `block_out_channels=(1,)` makes SD pipelines compute a
    vae_scale_factor of 2 ** (len - 1) = 1 (no down-sampling).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = 1,
        sample_size: int = 8,
        scaling_factor: float = 1.0,
        block_out_channels: tuple[int, ...] = (1,),
        clamp: bool = True,
    ) -> None:
        super().__init__()
        if latent_channels != 1:
            raise ValueError("DigitsPixelVAE holds grey images: latent_channels must be 1")
        # one float buffer so that ModelMixin.dtype / .device resolve (the model has no weights)
        self.register_buffer("_anchor", torch.zeros(()), persistent=True)

    def encode(self, x: Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Images (B, C, H, W) in [-1, 1] -> a deterministic latent distribution over (B, 1, H, W)."""
        mean = x.to(self._anchor.dtype).mean(dim=1, keepdim=True)
        params = torch.cat([mean, torch.zeros_like(mean)], dim=1)  # logvar is ignored when deterministic
        dist = DiagonalGaussianDistribution(params, deterministic=True)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: Tensor, return_dict: bool = True, **kwargs: object) -> DecoderOutput | tuple:
        """Unscaled latents (B, 1, H, W) (the caller divides by scaling_factor, as for SD) -> (B, out, H, W)."""
        x = z.to(self._anchor.dtype)
        if self.config.clamp:
            x = x.clamp(-1.0, 1.0)
        x = x.expand(-1, self.config.out_channels, -1, -1)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, sample: Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Encode then decode (the identity, clamped): for API parity with SD's VAE."""
        return self.decode(self.encode(sample).latent_dist.mode(), return_dict=return_dict)


class DigitsFamily(SDFamily):
    """SD's family for folders whose networks are the digits classes (model_index.json says
    StableDiffusionPipeline for them too): the same conditions (CLIP hidden states), the same velocity mapping
    (tau = (1 - t) * 1000), an identity VAE; the model the pretrain stage trains is a 1-rectified flow."""

    name = "digits"

    def claims(self, index: dict) -> bool:
        return (index.get("unet") or [None, None])[1] == "DigitsVelocityNet"

    def build(self, cfg: Any) -> Model:
        """A fresh digits model from `digits.model` (`build_digits`)."""
        return build_digits(cfg)


FAMILY = DigitsFamily()


def build_digits(cfg: DigitsModelConfig | None = None) -> Model:
    """A fresh digits model: velocity net (random init from `cfg.seed`), identity VAE, a small frozen random
    CLIP text encoder (from `cfg.text_seed`, the same for every experiment seed) over the tiny CLIP tokenizer,
    and an Euler scheduler (kept for folder compatibility: rectified flows are sampled by Euler steps)."""
    cfg = cfg or DigitsModelConfig()
    tokenizer = tiny_tokenizer()  # the full tiny CLIP vocabulary (curation counts tokens with the same one)
    with torch.random.fork_rng(devices=[]):  # seeding must not disturb the caller's RNG stream
        torch.manual_seed(cfg.text_seed)
        text_encoder = clip_text_encoder(
            tokenizer, hidden=cfg.text_hidden_size, layers=cfg.text_layers, heads=cfg.text_heads,
            intermediate=2 * cfg.text_hidden_size, projection=cfg.text_hidden_size,
        )  # fmt: skip
        torch.manual_seed(cfg.seed)
        unet = DigitsVelocityNet(
            sample_size=cfg.sample_size, in_channels=1, out_channels=1,
            cross_attention_dim=cfg.text_hidden_size, hidden_size=cfg.hidden_size, num_blocks=cfg.num_blocks,
            mlp_ratio=cfg.mlp_ratio, cond_dim=cfg.cond_dim, time_frequencies=cfg.time_frequencies,
            text_pooling=cfg.text_pooling, text_norm=cfg.text_norm,
        )  # fmt: skip
    vae = DigitsPixelVAE(sample_size=cfg.sample_size)
    for module in (unet, vae, text_encoder):
        module.eval()
    text_encoder.requires_grad_(False)
    parts = {
        "unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": sd15_scheduler(),
    }  # fmt: skip
    return Model(FAMILY, parts, None)
