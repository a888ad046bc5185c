"""The velocity adapter: an SD UNet as `v(x_t, t, cond)`, the one place t in [0, 1] becomes the UNet timestep."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    UNet2DConditionModel,
)
from torch import nn
from transformers import CLIPTextModel, PreTrainedTokenizerBase

from instaflow_core.models.components import SDComponents
from instaflow_core.rectified_flow import unet_timestep


@torch.no_grad()
def encode_prompts(
    text_encoder: CLIPTextModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str] | str
) -> torch.Tensor:
    """Prompts -> (B, 77, D) last hidden states, padded to max length: exactly what SD pipelines feed the UNet."""
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


class UNetVelocity(nn.Module):
    """`v(x_t, t, cond)` over an SD UNet: the UNet output is the velocity X1 - X0 (rectified-flow models).

    The only place that maps `t` (0 = noise) to the UNet timestep `(1 - t) * 1000` and prompts to embeddings.
    The text encoder is frozen; `trainable_parameters()` is the UNet's. An optional ControlNet adds its residuals
    to the UNet call at the same timestep.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder: CLIPTextModel,
        tokenizer: PreTrainedTokenizerBase,
        controlnet: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder.requires_grad_(False)
        self.tokenizer = tokenizer
        self.controlnet = controlnet

    @classmethod
    def from_components(cls, components: SDComponents) -> UNetVelocity:
        return cls(components.unet, components.text_encoder, components.tokenizer)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def encode(self, prompts: list[str] | str) -> torch.Tensor:
        """Prompts -> text embeddings (B, 77, D), padded to the tokenizer's max length, no grad."""
        return encode_prompts(self.text_encoder, self.tokenizer, prompts)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | float,
        cond: torch.Tensor,
        control_image: torch.Tensor | None = None,
        control_scale: float = 1.0,
    ) -> torch.Tensor:
        """x_t (B,4,h,w), t (B,) or scalar in [0,1], cond (B,77,D) -> velocity (B,4,h,w)."""
        if not torch.is_tensor(t):
            t = torch.tensor(float(t))
        t = t.to(device=x_t.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        tau = unet_timestep(t)  # (B,) float, 1000 = noise as in SD
        dtype = self.unet.dtype
        x_in, cond = x_t.to(dtype), cond.to(dtype)
        extra: dict[str, Any] = {}
        if self.controlnet is not None and control_image is not None:
            down, mid = self.controlnet(
                x_in,
                tau,
                encoder_hidden_states=cond,
                controlnet_cond=control_image.to(device=x_t.device, dtype=dtype),
                conditioning_scale=control_scale,
                return_dict=False,
            )
            extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return self.unet(x_in, tau, encoder_hidden_states=cond, **extra).sample.to(x_t.dtype)


class StudentVelocity(nn.Module):
    """The trainable `v(x_t, t, cond)`: a UNet and `UNetVelocity.forward` (the one t -> tau mapping).

    Unlike `UNetVelocity` it holds no text encoder: embeddings come from `PromptEmbeddings` in the loss, so
    DDP, the EMA copy and the checkpoints carry the UNet alone, under `unet.` keys.
    """

    forward = UNetVelocity.forward

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet
        self.controlnet = None  # UNetVelocity.forward reads it

    @classmethod
    def from_components(cls, components: SDComponents) -> StudentVelocity:
        """The student over `components.unet` (trainable); VAE and text encoder frozen."""
        components.unet.requires_grad_(True).train()
        components.vae.requires_grad_(False).eval()
        components.text_encoder.requires_grad_(False).eval()
        return cls(components.unet)
