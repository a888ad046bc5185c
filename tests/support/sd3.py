"""A Stable Diffusion 3.5 Medium-shaped repo with random weights, laid out like `stabilityai/stable-diffusion-3.5-medium`.

The real repo's components and classes (model_index.json names them as the hub's does), its config keys and the
values that matter to the family seam: an `SD3Transformer2DModel` with patch size 2, dual attention layers and qk
RMS-norm over 16-channel latents; an x8 `AutoencoderKL` with `scaling_factor` 1.5305 and `shift_factor` 0.0609 and
no quant convs; two CLIP text encoders with projection (the second's tokenizer pads with "!", as the real
tokenizer_2); a T5 encoder whose width is the transformer's `joint_attention_dim` (wider than the two CLIPs
together, so the CLIP states are zero-padded as in the real model); a FlowMatchEulerDiscreteScheduler with shift
3.0. Widths are tiny (a few MB, built in about a second): the CLIP tokenizers are the project's tiny CLIP BPE,
the T5 tokenizer a small `tokenizers` Unigram model (no sentencepiece, no download). fp16 variants sit beside the
full-precision weights, as on the hub, so saved folders can be checked to leave them out.

`build_sd35_folder(root, t5=True)`: the folder (t5=False: model_index.json names text_encoder_3 / tokenizer_3
null, the repo without T5 that diffusers' pipeline fills with zeros). `install_in_hub_cache(folder, hf_home)`:
the same files under the hub id in an offline Hugging Face cache (`tests.support.hub_cache`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.support import hub_cache
from tests.support.hub_cache import offline_hub  # noqa: F401  (re-exported)

REPO_ID = "stabilityai/stable-diffusion-3.5-medium"
MODEL_INDEX = {
    "_class_name": "StableDiffusion3Pipeline",
    "_diffusers_version": "0.31.0.dev0",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
# words of the tests' captions (and a few more): whole-word pieces of the tiny T5 vocabulary, letters beside them
_T5_WORDS = (
    "a photo of the cat dog red car bird tree house on table street painting blue green small big in with and"
).split()


@dataclass(frozen=True)
class Sd35Shape:
    """The reduced widths; the structure (block kinds, patch 2, 16 latent channels, 77 CLIP tokens) is SD 3.5's."""

    layers: int = 2  # SD 3.5 Medium: 24 (13 with dual attention)
    heads: int = 4  # 24
    head_dim: int = 8  # 64
    sample_size: int = 16  # latent side of the native size: 128 (1024 px)
    pos_embed_max_size: int = 32  # 384
    clip_l: int = 32  # CLIP ViT-L text width 768 (projection 768)
    clip_g: int = 48  # OpenCLIP bigG text width 1280 (projection 1280)
    t5: int = 96  # T5-XXL d_model 4096 = joint_attention_dim
    vae_channels: tuple[int, ...] = (16, 32, 32, 32)  # (128, 256, 512, 512)
    vocab_merges: int = 1000


def _clip(tokenizer: object, width: int, act: str) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),  # type: ignore[arg-type]
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=width,
            hidden_act=act,
            bos_token_id=tokenizer.bos_token_id,  # type: ignore[attr-defined]
            eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
            pad_token_id=1,
        )
    )


def t5_tokenizer() -> object:
    """A T5TokenizerFast over a small Unigram vocabulary (pad 0, eos 1, unk 2; whole words, then letters)."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"\u2581{w}", -1.0) for w in _T5_WORDS]
    pieces += [("\u2581", -2.0)] + [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def build_sd35_folder(root: str | Path, *, t5: bool = True, shape: Sd35Shape = Sd35Shape()) -> Path:
    """The repo as a local diffusers folder (random weights from fixed seeds; the same bytes every build)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import T5Config, T5EncoderModel

    from instaflow_core.models.folder_layout import write_fp16_variant
    from instaflow_core.models.tokenizer import tiny_tokenizer

    root = Path(root)
    tok_l = tiny_tokenizer(shape.vocab_merges)
    tok_g = tiny_tokenizer(shape.vocab_merges)
    tok_g.pad_token = "!"  # the real tokenizer_2 pads with "!" (id 0), tokenizer with <|endoftext|>
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(
            sample_size=shape.sample_size,
            patch_size=2,
            in_channels=16,
            num_layers=shape.layers,
            attention_head_dim=shape.head_dim,
            num_attention_heads=shape.heads,
            joint_attention_dim=shape.t5,
            caption_projection_dim=shape.heads * shape.head_dim,
            pooled_projection_dim=shape.clip_l + shape.clip_g,
            out_channels=16,
            pos_embed_max_size=shape.pos_embed_max_size,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        )
        # diffusers zero-initialises the output projection (adaLN-Zero): random instead, so the velocity is not 0
        for p in transformer.proj_out.parameters():
            torch.nn.init.normal_(p, std=0.05)
        torch.manual_seed(1)
        n = len(shape.vae_channels)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=shape.vae_channels,
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=8,
            sample_size=shape.sample_size * 2 ** (n - 1),
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
            force_upcast=True,
        )
        torch.manual_seed(2)
        text_encoder = _clip(tok_l, shape.clip_l, "quick_gelu")
        torch.manual_seed(3)
        text_encoder_2 = _clip(tok_g, shape.clip_g, "gelu")
        tok_t5 = t5_tokenizer() if t5 else None
        text_encoder_3 = None
        if t5:
            torch.manual_seed(4)
            text_encoder_3 = T5EncoderModel(
                T5Config(
                    vocab_size=len(tok_t5),  # type: ignore[arg-type]
                    d_model=shape.t5,
                    d_ff=2 * shape.t5,
                    d_kv=16,
                    num_heads=2,
                    num_layers=1,
                    feed_forward_proj="gated-gelu",
                    relative_attention_num_buckets=8,
                    relative_attention_max_distance=16,
                    dense_act_fn="gelu_new",
                    is_gated_act=True,
                    pad_token_id=0,
                    eos_token_id=1,
                )
            )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok_l,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok_g,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tok_t5,
    )
    pipe.save_pretrained(root, safe_serialization=True)
    index = dict(MODEL_INDEX)
    if not t5:
        index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if (root / name).is_dir():
            write_fp16_variant(root / name)
    return root


def install_in_hub_cache(folder: str | Path, hf_home: str | Path, repo_id: str = REPO_ID) -> Path:
    """The folder's files as the offline hub cache entry of `repo_id`; returns the snapshot folder."""
    return hub_cache.install_in_hub_cache(folder, hf_home, repo_id)
