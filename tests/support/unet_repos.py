"""Tiny SDXL base 1.0- and SD 2.1-shaped repos with random weights, for the SDXL and SD 2.x family tests.

Built through diffusers' own pipeline classes (`StableDiffusionXLPipeline`, `StableDiffusionPipeline`) and
`save_pretrained`, with the real repos' configs at reduced width:

- SDXL (`stabilityai/stable-diffusion-xl-base-1.0`): UNet blocks (DownBlock2D, CrossAttnDown x2), linear
  projections, `addition_embed_type="text_time"` (size conditioning: 6 time ids x `addition_time_embed_dim` + the
  pooled width); text_encoder CLIPTextModel (quick_gelu) + text_encoder_2 CLIPTextModelWithProjection (gelu), both
  read at their penultimate layer; tokenizer_2 pads with "!" as OpenCLIP does; an x8 VAE with scaling 0.13025 and
  `force_upcast`; the repo's EulerDiscreteScheduler config (leading spacing, steps_offset 1);
  model_index.json `force_zeros_for_empty_prompt: true`.
- SD 2.1 (`stabilityai/stable-diffusion-2-1`): SD's UNet with linear projections and `upcast_attention`, an
  OpenCLIP-like text encoder (gelu, "!" padding), DDIMScheduler with `prediction_type="v_prediction"`, no
  safety checker (`requires_safety_checker: false`).

`install(folder, hf_home, repo_id)` lays a folder out as a Hugging Face cache entry (tests/support/hub_cache.py),
so the hub id resolves offline. ~1 s to build each once diffusers is imported; a few MB.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.support import hub_cache

SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
SD21_REPO = "stabilityai/stable-diffusion-2-1"
N_MERGES = 1000  # the tiny CLIP BPE (vocab 1514): real word pieces for captions

SDXL_SCHEDULER = {  # scheduler/scheduler_config.json of stable-diffusion-xl-base-1.0
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SD21_SCHEDULER = {  # scheduler/scheduler_config.json of stable-diffusion-2-1
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def _tokenizers() -> tuple[object, object]:
    """(CLIP-L-like tokenizer padding with <|endoftext|>, OpenCLIP-like padding with "!")."""
    from transformers import CLIPTokenizer

    from instaflow_core.models.tokenizer import tiny_tokenizer

    first = tiny_tokenizer(N_MERGES)
    second = CLIPTokenizer(
        vocab=dict(first.get_vocab()),
        merges=_merges(N_MERGES),
        model_max_length=77,
        pad_token="!",
    )
    return first, second


def _merges(n: int) -> list[tuple[str, str]]:
    from instaflow_core.models.tokenizer import TINY_CLIP_DIR

    lines = (TINY_CLIP_DIR / "merges.txt").read_text().split("\n")[1 : 1 + n]
    return [tuple(line.split()) for line in lines]  # type: ignore[misc]


def _text_config(tokenizer: object, hidden: int, act: str, projection: int) -> object:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id,  # type: ignore[attr-defined]
        eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
        pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
    )


def _vae(scaling: float, force_upcast: bool) -> object:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 32, 64, 64),  # 4 levels: x8, as the real VAEs
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=256,
        scaling_factor=scaling,
        force_upcast=force_upcast,
    )


def build_sdxl_folder(root: str | Path, seed: int = 0) -> Path:
    """The SDXL base-shaped repo as a local diffusers folder (random weights from `seed`)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = Path(root)
    tok, tok2 = _tokenizers()
    d1, d2, time_dim = 32, 64, 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=32,  # 256 px native (SDXL: 128 -> 1024 px)
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4, 8),
            transformer_layers_per_block=(1, 1, 2),
            use_linear_projection=True,
            cross_attention_dim=d1 + d2,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + d2,
            norm_num_groups=32,
        )
        torch.manual_seed(seed + 1)
        vae = _vae(0.13025, True)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_text_config(tok, d1, "quick_gelu", d1))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tok2, d2, "gelu", d2))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(root, safe_serialization=True)
    _write_bpe(root, ("tokenizer", "tokenizer_2"))
    _write_scheduler(root, "EulerDiscreteScheduler", SDXL_SCHEDULER)
    return root


def build_sd21_folder(root: str | Path, seed: int = 0) -> Path:
    """The SD 2.1-shaped repo (v-prediction) as a local diffusers folder (random weights from `seed`)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = Path(root)
    _, tok = _tokenizers()  # OpenCLIP's tokenizer pads with "!"
    d = 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,  # 128 px native (SD 2.1: 96 -> 768 px)
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64, 64, 64),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            attention_head_dim=(2, 4, 8, 8),
            use_linear_projection=True,
            upcast_attention=True,
            cross_attention_dim=d,
            norm_num_groups=32,
        )
        torch.manual_seed(seed + 1)
        vae = _vae(0.18215, False)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_text_config(tok, d, "gelu", 32))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=DDIMScheduler.from_config(SD21_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root, safe_serialization=True)
    _write_bpe(root, ("tokenizer",))
    _write_scheduler(root, "DDIMScheduler", SD21_SCHEDULER)
    return root


def _write_scheduler(root: Path, cls: str, config: dict) -> None:
    """The repo's scheduler_config.json as it is (keys of other scheduler classes included)."""
    path = root / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": cls, "_diffusers_version": "0.19.0.dev0", **config}, indent=2))


def _write_bpe(root: Path, names: tuple[str, ...]) -> None:
    """vocab.json + merges.txt beside tokenizer.json, as the real repos hold them."""
    from transformers import CLIPTokenizer

    for name in names:
        tok = CLIPTokenizer.from_pretrained(root / name)
        tok.backend_tokenizer.model.save(str(root / name))
        assert json.loads((root / name / "vocab.json").read_text())


def install(folder: str | Path, hf_home: str | Path, repo_id: str) -> Path:
    """The folder as the hub cache entry `repo_id` under `hf_home` (offline use: hub_cache.offline_hub)."""
    return hub_cache.install_in_hub_cache(folder, hf_home, repo_id)
