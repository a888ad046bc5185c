"""SD-architecture models small enough for a CPU, built from config with a fixed seed (no download)."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from instaflow_core.config import TinyModelConfig
from instaflow_core.errors import ConfigError
from instaflow_core.models.components import SD15_SCALING_FACTOR, SD15_SCHEDULER, SDComponents
from instaflow_core.models.tokenizer import tiny_tokenizer


def build_tiny(tiny_cfg: TinyModelConfig | None = None) -> SDComponents:
    """SD-architecture UNet / VAE / CLIP text encoder, random init from `tiny_cfg.seed` (same weights every call)."""
    cfg = tiny_cfg or TinyModelConfig()
    n_unet = len(cfg.unet_channels)
    n_vae = len(cfg.vae_channels)
    if n_unet < 1 or n_vae < 1:
        raise ConfigError("models.tiny.unet_channels and models.tiny.vae_channels need at least one entry")
    if cfg.text_hidden_size != cfg.cross_attention_dim:
        raise ConfigError(
            f"models.tiny.text_hidden_size ({cfg.text_hidden_size}) must equal cross_attention_dim "
            f"({cfg.cross_attention_dim}): the UNet attends to the text encoder's hidden states"
        )
    tokenizer = tiny_tokenizer(cfg.vocab_merges)
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        # SD 1.x layout: cross-attention in every block but the deepest down block (and its mirror up block).
        unet = UNet2DConditionModel(
            sample_size=cfg.sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=tuple(cfg.unet_channels),
            layers_per_block=cfg.layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * (n_unet - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_unet - 1),
            cross_attention_dim=cfg.cross_attention_dim,
            attention_head_dim=cfg.attention_head_dim,
            norm_num_groups=min(32, min(cfg.unet_channels)),
        )
        torch.manual_seed(cfg.seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=tuple(cfg.vae_channels),
            down_block_types=("DownEncoderBlock2D",) * n_vae,
            up_block_types=("UpDecoderBlock2D",) * n_vae,
            layers_per_block=1,
            norm_num_groups=min(32, min(cfg.vae_channels)),
            sample_size=cfg.sample_size * 2 ** (n_vae - 1),
            scaling_factor=SD15_SCALING_FACTOR,
        )
        torch.manual_seed(cfg.seed + 2)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=cfg.text_hidden_size,
                intermediate_size=cfg.text_intermediate_size,
                num_hidden_layers=cfg.text_layers,
                num_attention_heads=cfg.text_heads,
                max_position_embeddings=77,
                projection_dim=cfg.cross_attention_dim,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = DPMSolverMultistepScheduler(**SD15_SCHEDULER, algorithm_type="dpmsolver++")
    for module in (unet, vae, text_encoder):
        module.eval()
    return SDComponents(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
    )
