"""Diffusers -> original (LDM/CompVis) key names for SD 1.x, and the matching `v1-inference.yaml`.

The single-file checkpoint of the SD 1.5 fixture (`v1-5-pruned-emaonly.safetensors`) holds the three networks under
their original names: `model.diffusion_model.*` (UNetModel), `first_stage_model.*` (AutoencoderKL) and
`cond_stage_model.transformer.*` (FrozenCLIPEmbedder = a HF CLIPTextModel). The mapping follows the logic of
diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py` (not shipped in the pip package), written
here from the block structure in the component configs instead of hard-coded SD 1.5 sizes, so that a reduced-width
model of the same shape converts too. It accepts both the current diffusers VAE attention names (`to_q` ...) and
the deprecated ones (`query` ...) that the real SD 1.5 repo files still use.
"""

from __future__ import annotations

from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

# (diffusers, LDM) name pieces inside one resnet / one VAE attention block.
_UNET_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
_VAE_ATTN = {
    "group_norm": "norm",
    "to_q": "q",
    "query": "q",
    "to_k": "k",
    "key": "k",
    "to_v": "v",
    "value": "v",
    "to_out.0": "proj_out",
    "proj_attn": "proj_out",
}


def _rename_resnet(rest: str) -> str:
    for hf, ldm in _UNET_RESNET:
        if rest.startswith(hf + "."):
            return ldm + rest[len(hf) :]
    return rest


def unet_key_to_ldm(key: str, config: dict[str, Any]) -> str:
    """One diffusers UNet2DConditionModel key -> its LDM UNetModel key (without the `model.diffusion_model.` prefix)."""
    per = (
        int(config["layers_per_block"]) + 1
    )  # input blocks per level: the resnets (+ attentions) and a downsampler
    top = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    for hf, ldm in top.items():
        if key.startswith(hf):
            return ldm + key[len(hf) :]
    parts = key.split(".")
    if parts[0] == "down_blocks":
        level, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv.* -> input_blocks.k.0.op.*
            return f"input_blocks.{(level + 1) * per}.0.op." + ".".join(parts[5:])
        idx, rest = int(parts[3]), ".".join(parts[4:])
        block = 1 + level * per + idx
        if kind == "resnets":
            return f"input_blocks.{block}.0.{_rename_resnet(rest)}"
        return f"input_blocks.{block}.1.{rest}"  # attentions: same inner names as LDM's SpatialTransformer
    if parts[0] == "mid_block":
        idx, rest = int(parts[2]), ".".join(parts[3:])
        if parts[1] == "resnets":
            return f"middle_block.{2 * idx}.{_rename_resnet(rest)}"
        return f"middle_block.1.{rest}"
    if parts[0] == "up_blocks":
        level, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":  # after the resnet (and the attention, when the level has one)
            has_attn = config["up_block_types"][level].startswith("CrossAttn")
            return f"output_blocks.{level * per + per - 1}.{2 if has_attn else 1}." + ".".join(parts[4:])
        idx, rest = int(parts[3]), ".".join(parts[4:])
        block = level * per + idx
        if kind == "resnets":
            return f"output_blocks.{block}.0.{_rename_resnet(rest)}"
        return f"output_blocks.{block}.1.{rest}"
    raise KeyError(f"unexpected UNet key {key!r}")


def vae_key_to_ldm(key: str, n_levels: int) -> str:
    """One diffusers AutoencoderKL key -> its LDM AutoencoderKL key (without the `first_stage_model.` prefix)."""
    parts = key.split(".")
    side = parts[0]  # encoder | decoder | quant_conv | post_quant_conv
    if side not in ("encoder", "decoder"):
        return key
    if parts[1] == "conv_norm_out":
        return f"{side}.norm_out." + ".".join(parts[2:])
    if parts[1] in ("down_blocks", "up_blocks"):
        level = int(parts[2])
        ldm_level = (
            level if side == "encoder" else n_levels - 1 - level
        )  # the decoder counts levels backwards
        stage = "down" if side == "encoder" else "up"
        if parts[3] in ("downsamplers", "upsamplers"):
            return f"{side}.{stage}.{ldm_level}.{stage}sample." + ".".join(parts[5:])
        rest = ".".join(parts[5:]).replace("conv_shortcut.", "nin_shortcut.")
        return f"{side}.{stage}.{ldm_level}.block.{parts[4]}.{rest}"
    if parts[1] == "mid_block":
        if parts[2] == "resnets":
            rest = ".".join(parts[4:]).replace("conv_shortcut.", "nin_shortcut.")
            return f"{side}.mid.block_{int(parts[3]) + 1}.{rest}"
        rest = ".".join(parts[4:])  # attentions.0.<name>.<weight|bias>
        for hf, ldm in _VAE_ATTN.items():
            if rest.startswith(hf + "."):
                return f"{side}.mid.attn_1.{ldm}{rest[len(hf) :]}"
        raise KeyError(f"unexpected VAE attention key {key!r}")
    return key  # conv_in / conv_out


def diffusers_to_ldm(
    unet: dict[str, torch.Tensor],
    unet_config: dict[str, Any],
    vae: dict[str, torch.Tensor],
    vae_config: dict[str, Any],
    text_encoder: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Three diffusers state dicts -> one LDM state dict (what `v1-5-pruned-emaonly` holds, minus DDPM buffers).

    `text_encoder` may carry the `text_model.` prefix (the SD 1.5 repo's files) or not (transformers >= 5.6 saves
    the flattened CLIPTextModel); the LDM key always has it.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in unet.items():
        out[UNET_PREFIX + unet_key_to_ldm(key, unet_config)] = value
    n_levels = len(vae_config["block_out_channels"])
    for key, value in vae.items():
        ldm = vae_key_to_ldm(key, n_levels)
        if ".mid.attn_1." in ldm and ldm.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[VAE_PREFIX + ldm] = value
    for key, value in text_encoder.items():
        full = key if key.startswith("text_model.") else "text_model." + key
        out[TEXT_PREFIX + full] = value
    if len(out) != len(unet) + len(vae) + len(text_encoder):
        raise ValueError("two diffusers keys mapped to the same LDM key: the mapping does not fit this model")
    return out


def ddpm_buffers(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> dict[str, torch.Tensor]:
    """The noise-schedule buffers an LDM `LatentDiffusion` checkpoint stores at its top level (scaled_linear)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
    }
    return {k: v.to(torch.float32) for k, v in buffers.items()}


def inference_yaml(unet_config: dict[str, Any], vae_config: dict[str, Any], scale_factor: float) -> str:
    """`v1-inference.yaml` (the original LDM config) describing the fixture's reduced-width networks."""
    ch = unet_config["block_out_channels"]
    mult = [c // ch[0] for c in ch]
    vch = vae_config["block_out_channels"]
    vmult = [c // vch[0] for c in vch]
    attn = [2**i for i, t in enumerate(unet_config["down_block_types"]) if t.startswith("CrossAttn")]
    return f"""model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: {unet_config["sample_size"]}
    channels: {unet_config["in_channels"]}
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: {scale_factor}
    use_ema: False

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32 # unused
        in_channels: {unet_config["in_channels"]}
        out_channels: {unet_config["out_channels"]}
        model_channels: {ch[0]}
        attention_resolutions: {sorted(attn, reverse=True)}
        num_res_blocks: {unet_config["layers_per_block"]}
        channel_mult: {mult}
        num_heads: {unet_config["attention_head_dim"]}
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: {unet_config["cross_attention_dim"]}
        use_checkpoint: True
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: {vae_config["latent_channels"]}
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: {vae_config["latent_channels"]}
          resolution: 256
          in_channels: {vae_config["in_channels"]}
          out_ch: {vae_config["out_channels"]}
          ch: {vch[0]}
          ch_mult: {vmult}
          num_res_blocks: {vae_config["layers_per_block"]}
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""
