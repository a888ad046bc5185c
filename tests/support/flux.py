"""FLUX.1-dev- and FLUX.1-schnell-shaped repos with random weights, laid out like `black-forest-labs/FLUX.1-dev` and
`black-forest-labs/FLUX.1-schnell`.

The real repos' components and classes (model_index.json as the hub's), their config keys and the values that matter
to the family seam: a `FluxTransformer2DModel` over 64 token features (16 latent channels packed 2x2), with the
guidance embedding (dev) or without (schnell); an x8 `AutoencoderKL` with `scaling_factor` 0.3611 and
`shift_factor` 0.1159 and no quant convs; a CLIP-L-shaped text encoder whose pooled output is the transformer's
`pooled_projection_dim`; a T5 encoder whose width is its `joint_attention_dim`; the FlowMatchEulerDiscreteScheduler
configs of the two repos (dev: dynamic shifting between 256 and 4096 image tokens; schnell: none, shift 1). As on
the hub: the transformer and T5 weights sharded (with their index), no fp16 variants (the real weights are
bf16 safetensors only), and root Black-Forest-Labs files (`flux1-dev.safetensors`, `ae.safetensors`) that a
pipeline never loads. Widths are tiny (a few MB, built in about a second): the CLIP tokenizer is the project's
tiny CLIP BPE, the T5 tokenizer a small `tokenizers` Unigram model (no sentencepiece, no download).

`build_flux_folder(root, variant="dev" | "schnell")`: the folder. `install_in_hub_cache(folder, hf_home, repo_id)`:
the same files under the hub id in an offline Hugging Face cache (`tests.support.hub_cache`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tests.support import hub_cache
from tests.support.hub_cache import offline_hub  # noqa: F401  (re-exported)

REPO_IDS = {"dev": "black-forest-labs/FLUX.1-dev", "schnell": "black-forest-labs/FLUX.1-schnell"}
MODEL_INDEX = {
    "_class_name": "FluxPipeline",
    "_diffusers_version": "0.30.0.dev0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SCHEDULERS = {
    "dev": dict(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
        base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15,
    ),
    "schnell": dict(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False,
        base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15,
    ),
}  # fmt: skip
ROOT_FILES = {
    "dev": ("flux1-dev.safetensors", "ae.safetensors"),
    "schnell": ("flux1-schnell.safetensors", "ae.safetensors"),
}
# words of the tests' captions (and a few more): whole-word pieces of the tiny T5 vocabulary, letters beside them
_T5_WORDS = (
    "a photo of the cat dog red car bird tree house on table street painting blue green small big in with and"
).split()


@dataclass(frozen=True)
class FluxShape:
    """The reduced widths; the structure (double and single stream blocks, 2x2 packing of 16 latent channels, RoPE
    over (0, row, column) ids, 77 CLIP tokens) is FLUX.1's."""

    layers: int = 1  # FLUX.1: 19 double-stream blocks
    single_layers: int = 1  # 38 single-stream blocks
    heads: int = 2  # 24
    head_dim: int = 16  # 128 = sum(axes_dims_rope)
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)  # (16, 56, 56)
    clip: int = 32  # CLIP ViT-L text width 768 = pooled_projection_dim
    t5: int = 64  # T5-XXL d_model 4096 = joint_attention_dim
    vae_channels: tuple[int, ...] = (16, 32, 32, 32)  # (128, 256, 512, 512)
    vae_sample_size: int = 128  # 1024
    vocab_merges: int = 1000
    shard_bytes: tuple[int, int] = (150_000, 100_000)  # transformer (3 shards) and T5 (2), as on the hub


def t5_tokenizer() -> object:
    """A T5TokenizerFast over a small Unigram vocabulary (pad 0, eos 1, unk 2; whole words, then letters)."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"\u2581{w}", -1.0) for w in _T5_WORDS]
    pieces += [("\u2581", -2.0)] + [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def build_flux_folder(
    root: str | Path, variant: Literal["dev", "schnell"] = "dev", *, shape: FluxShape = FluxShape()
) -> Path:
    """The repo as a local diffusers folder (random weights from fixed seeds; the same bytes every build)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from instaflow_core.models.sd import save_tokenizer_files
    from instaflow_core.models.tokenizer import tiny_tokenizer

    root = Path(root)
    tok = tiny_tokenizer(shape.vocab_merges)
    tok_t5 = t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=shape.layers,
            num_single_layers=shape.single_layers,
            attention_head_dim=shape.head_dim,
            num_attention_heads=shape.heads,
            joint_attention_dim=shape.t5,
            pooled_projection_dim=shape.clip,
            guidance_embeds=variant == "dev",
            axes_dims_rope=shape.axes_dims_rope,
        )
        # adaLN modulations start near zero in a fresh model: larger weights, so the velocity depends on its inputs
        for name, p in transformer.named_parameters():
            if "norm" in name and p.ndim == 2:
                torch.nn.init.normal_(p, std=0.2)
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
            sample_size=shape.vae_sample_size,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        torch.manual_seed(2)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tok),
                hidden_size=shape.clip,
                intermediate_size=2 * shape.clip,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                projection_dim=shape.clip,
                hidden_act="quick_gelu",
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=1,
            )
        )
        torch.manual_seed(3)
        text_encoder_2 = T5EncoderModel(
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
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULERS[variant]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok_t5,
    )
    pipe.save_pretrained(root, safe_serialization=True)
    # as on the hub: the two large networks in shards (an index beside them), the pipeline's model_index.json
    transformer.save_pretrained(root / "transformer", max_shard_size=shape.shard_bytes[0])
    text_encoder_2.save_pretrained(root / "text_encoder_2", max_shard_size=shape.shard_bytes[1])
    save_tokenizer_files(
        tok, root / "tokenizer"
    )  # vocab.json + merges.txt beside tokenizer.json, as the repo
    for stale in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"):
        if len(list((root / stale).parent.glob("*.safetensors"))) > 1:
            (root / stale).unlink(missing_ok=True)
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2, sort_keys=True) + "\n")
    # root checkpoints that a pipeline never loads (their contents do not matter here)
    for name in ROOT_FILES[variant]:
        save_file({"unused": torch.zeros(4)}, str(root / name))
    return root


def install_in_hub_cache(folder: str | Path, hf_home: str | Path, repo_id: str) -> Path:
    """The folder's files as the offline hub cache entry of `repo_id`; returns the snapshot folder."""
    return hub_cache.install_in_hub_cache(folder, hf_home, repo_id)
