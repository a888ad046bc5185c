"""Teacher repos shaped like the hub's: SDXL base 1.0, SD 3.5 medium, FLUX.1-dev, FLUX.1-schnell, SD 2.1.

One builder per hub repo writes a local folder laid out like the real repo, with random weights from a fixed seed
and reduced widths/depths only (the companion of `tests/support/sd15.py`, which does the same for SD 1.5):

- the same file names and folders: component folders, `model_index.json` with the real class names, configs with
  the real keys and values except widths / depths / sample sizes, fp16 variants where the real repo has them,
  sharded weights + `*.index.json` where the real repo shards, the root single-file checkpoints in the original
  key format (SGM for SDXL, LDM + OpenCLIP for SD 2.1, MMDiT for SD 3.5, BFL for FLUX), SD 3.5's `text_encoders/`;
- every structural feature: two / three text encoders, pooled projections, SDXL's `text_time` embedding,
  SD 3.5's dual-attention layers and RMS q/k norm, FLUX's guidance embedding (dev) and dynamic shifting, SD 2.1's
  v-prediction and its 23-of-24-layer OpenCLIP text encoder, the head dims where the architecture fixes them
  (FLUX 128 with RoPE axes 16/56/56, SD3 64, T5 d_kv 64), text width relations (SD3's CLIP widths sum to less than
  the T5 width, as 768 + 1280 < 4096);
- the storage dtypes the real files have, as their sizes tell: SDXL / SD 2.1 full precision + `fp16` variants,
  SDXL's root files fp16, SD 2.1's root file fp32; SD 3.5 and FLUX half precision (transformers and VAEs bf16,
  FLUX's text encoders bf16, SD 3.5's fp16 with `fp16` variants of the same bytes, the T5 variant sharded as
  `model.fp16-0000i-of-00002.safetensors` + `model.safetensors.index.fp16.json`), FLUX's `ae.safetensors` fp32;
  the configs' `torch_dtype` as written by the transformers versions that saved them (transformers 5 honours it:
  a plain `from_pretrained` gives fp16 / bf16 text encoders beside an fp32 UNet / transformer; pass `dtype=`).

Faithful on purpose where real repos surprise loaders: SDXL's `vae/` holds the 0.9 VAE and `vae_1_0/` the 1.0 VAE,
so `sd_xl_base_1.0.safetensors` carries `vae_1_0` and `sd_xl_base_1.0_0.9vae.safetensors` carries `vae` (two VAE
draws; a loader taking the root file gets a different VAE than the folder); SDXL's `tokenizer_2` and SD 2.1's
tokenizer pad with "!" (OpenCLIP's 0), not `<|endoftext|>`; SD 2.1's text encoder config says 23 layers while its
root checkpoint holds all 24 OpenCLIP resblocks + `text_projection` (diffusers drops resblock 23 by name); SD 3.5's
last MMDiT block is context-pre-only and its original adaLN rows are (shift, scale); SD 3.5's
`text_encoders/clip_l.safetensors` lacks the `text_projection` its `text_encoder/` has, and its T5 files hold the
tied embedding twice; the CLIP text encoders carry `text_model.*` keys (and, saved by transformers 4.2x as SD 2.1's,
a `position_ids` buffer).

Not reproduced (and why): ONNX / OpenVINO / Flax exports of SDXL and SD 2.1 (`model.onnx`, `*.msgpack`, ...: other
runtimes, nothing here can check them), the `.bin` pickles of SD 2.1 unless `pickles=True` (size), the sample
images and LoRA example in SDXL's root (`sd_xl_offset_example-lora_1.0.safetensors`: not a teacher checkpoint),
the SD 2.1 non-EMA root checkpoints unless `nonema=True`, `spiece.model`'s NFKC charsmap (see t5_tokenizer.py),
vocabularies (CLIP: 1514 tokens of the real BPE; T5: 2100 of 32100). Config values are the real ones as known
here (the SD 3.5 medium transformer config and the SDXL / SD 3.5 / FLUX file listings with sizes were checked
against public copies; the hub itself cannot be reached from here to diff the rest).

Size / time (measured on a 2-core CPU, diffusers imported): see `tests/plugins/teacher_repos.py`.
"""

from __future__ import annotations

import contextlib
import json
import types
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from instaflow_core.models.tokenizer import TINY_CLIP_DIR  # vocab.json + merges.txt (4000 merges)
from tests.support import hub_cache, t5_tokenizer
from tests.support.hub_cache import LFS_SUFFIXES, offline_hub, repo_files  # noqa: F401  (re-exported)
from tests.support.sd15_ldm import ddpm_buffers, unet_key_to_ldm, vae_key_to_ldm

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"
FLUX_DEV = "black-forest-labs/FLUX.1-dev"
FLUX_SCHNELL = "black-forest-labs/FLUX.1-schnell"
SD21 = "stabilityai/stable-diffusion-2-1"

CLIP_MERGES = 1000  # BPE merges kept: vocab = 512 + 1000 + 2 = 1514 (real: 49408), as the SD 1.5 fixture
_N_BYTE_TOKENS = 512
CLIP_VOCAB = _N_BYTE_TOKENS + CLIP_MERGES + 2
BOS_ID, EOS_ID = CLIP_VOCAB - 2, CLIP_VOCAB - 1  # <|startoftext|>, <|endoftext|> (real: 49406, 49407)

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"


# ------------------------------------------------------------------------------------------ shared configs
def _clip_text_config(kind: str, arch: str, torch_dtype: str, transformers_version: str) -> dict[str, Any]:
    """A CLIP text tower's config.json. `kind`: clip_l (OpenAI ViT-L/14, 12 x 768, quick_gelu), clip_g (OpenCLIP
    bigG, 32 x 1280, gelu), clip_h (OpenCLIP ViT-H as SD 2.x uses it: 24 layers truncated to 23, 1024, gelu)."""
    cfg: dict[str, Any] = {
        "architectures": [arch],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": 32,  # clip_l: 768
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 64,  # clip_l: 3072
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 4,  # clip_l: 12
        "num_hidden_layers": 2,  # clip_l: 12
        "pad_token_id": 1,
        "projection_dim": 32,  # clip_l: 768
        "torch_dtype": torch_dtype,
        "transformers_version": transformers_version,
        "vocab_size": CLIP_VOCAB,  # 49408
    }
    if kind == "clip_l":
        cfg["_name_or_path"] = "openai/clip-vit-large-patch14"
    elif kind == "clip_g":  # bigG: 1280 wide, 20 heads, 5120 MLP, 32 layers, projection 1280
        cfg.update(
            hidden_act="gelu", hidden_size=64, intermediate_size=128, num_hidden_layers=2, projection_dim=64
        )
    elif kind == "clip_h":  # ViT-H: 1024 wide, 16 heads, 4096 MLP, 24 layers truncated to 23
        cfg.update(
            hidden_act="gelu",
            num_attention_heads=2,
            num_hidden_layers=23,
            projection_dim=512,
            _name_or_path="hf-models/stable-diffusion-v2-768x768/text_encoder",
        )
    else:
        raise ValueError(kind)
    return dict(sorted(cfg.items()))


def _t5_config(torch_dtype: str, transformers_version: str) -> dict[str, Any]:
    """google/t5-v1_1-xxl's encoder config (FLUX text_encoder_2, SD3 text_encoder_3) at width 128, 2 layers."""
    return {
        "_name_or_path": "google/t5-v1_1-xxl",
        "architectures": ["T5EncoderModel"],
        "classifier_dropout": 0.0,
        "d_ff": 256,  # 10240
        "d_kv": 64,
        "d_model": 128,  # 4096
        "decoder_start_token_id": 0,
        "dense_act_fn": "gelu_new",
        "dropout_rate": 0.1,
        "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-06,
        "model_type": "t5",
        "num_decoder_layers": 2,  # 24
        "num_heads": 2,  # 64
        "num_layers": 2,  # 24
        "output_past": True,
        "pad_token_id": 0,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32,
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
        "transformers_version": transformers_version,
        "use_cache": True,
        "vocab_size": t5_tokenizer.padded_vocab_size(),  # 32128
    }


def _vae_config(version: str, **real: Any) -> dict[str, Any]:
    """AutoencoderKL config: 4 levels (latents 8x smaller) at (32, 64, 64, 64) instead of (128, 256, 512, 512)."""
    cfg = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": version,
        "act_fn": "silu",
        "block_out_channels": [32, 64, 64, 64],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 64,  # SDXL / SD3 / FLUX: 1024, SD 2.1: 768
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
    cfg.update(real)
    return dict(sorted(cfg.items()))


_LICENSE_PLACEHOLDER = (
    "Placeholder: the real repo's license text is not part of this random-weight fixture.\n"
)


# ------------------------------------------------------------------------------------------ random weights
def _seed(seed: int, repo_id: str, network: str) -> int:
    """Each network has its own fixed seed, so its weights do not depend on which other files are built."""
    return seed * 1_000_003 + zlib.crc32(f"{repo_id}:{network}".encode()) % 1_000_000


def _model_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    skip = {"architectures", "torch_dtype", "transformers_version", "model_type"}
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in skip}


def random_state_dict(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights of the network a config.json describes (diffusers `_class_name` or transformers
    `architectures`), as the library's own init draws them; the caller's RNG is left untouched."""
    import diffusers
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if "_class_name" in config:
            model = getattr(diffusers, config["_class_name"]).from_config(config)
        else:
            cls = getattr(transformers, config["architectures"][0])
            model = cls(cls.config_class(**_model_kwargs(config)))
        return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def _file_keys(config: dict[str, Any], sd: dict[str, torch.Tensor], *, position_ids: bool) -> dict[str, Any]:
    """Library state dict -> the keys the repo files hold (transformers 4.x names).

    CLIPTextModel: transformers >= 5.6 dropped the `text_model.` level, the files have it (loaders map it back);
    `position_ids` was a persistent buffer before transformers 4.31. T5EncoderModel: the tied
    `encoder.embed_tokens.weight` is not saved (only `shared.weight`), as save_pretrained does.
    """
    arch = config.get("architectures", [""])[0]
    if arch.startswith("CLIPTextModel"):
        sd = {
            k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
            for k, v in sd.items()
        }
        if position_ids:
            sd["text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    if arch == "T5EncoderModel":
        sd = {k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"}
    return sd


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return sd
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def _save(sd: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in _cast(sd, dtype).items()}, str(path), metadata={"format": "pt"})
    return path


def _variant(file_name: str, variant: str) -> str:
    stem, ext = file_name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def save_sharded(
    sd: dict[str, torch.Tensor],
    folder: Path,
    weights_name: str,
    n_shards: int,
    dtype: torch.dtype | None = None,
    variant: str | None = None,
) -> list[Path]:
    """`<stem>-0000i-of-0000n.safetensors` + `<weights_name>.index.json` (`metadata.total_size`, `weight_map`), as
    `save_pretrained(max_shard_size=...)` writes them: keys in state-dict order, cut into shards of similar bytes.
    With a variant: `<stem>.<variant>-0000i-of-0000n.safetensors` + `<weights_name>.index.<variant>.json`."""
    sd = _cast(sd, dtype)
    stem = weights_name.removesuffix(".safetensors") + (f".{variant}" if variant else "")
    sizes = [v.numel() * v.element_size() for v in sd.values()]
    total, per_shard = sum(sizes), sum(sizes) / n_shards
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    running = 0
    for (key, value), size in zip(sd.items(), sizes, strict=True):
        shards[min(int(running // per_shard), n_shards - 1)][key] = value
        running += size
    if any(not shard for shard in shards):
        raise ValueError(f"{n_shards} shards for {len(sd)} tensors: a shard would be empty")
    weight_map, paths = {}, []
    for i, shard in enumerate(shards, start=1):
        name = f"{stem}-{i:05d}-of-{n_shards:05d}.safetensors"
        paths.append(_save(shard, folder / name))
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    index_name = f"{weights_name}.index.json"
    (folder / (_variant(index_name, variant) if variant else index_name)).write_text(
        json.dumps(index, indent=2) + "\n"
    )
    return paths


def load_weights(
    folder: str | Path, weights_name: str, variant: str | None = None
) -> dict[str, torch.Tensor]:
    """One component's tensors from `weights_name` or, when the folder is sharded, from its index + shards."""
    folder = Path(folder)
    single = _variant(weights_name, variant) if variant else weights_name
    if (folder / single).exists():
        return load_file(str(folder / single))
    index_name = f"{weights_name}.index.json"
    index = json.loads((folder / (_variant(index_name, variant) if variant else index_name)).read_text())
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(folder / shard)))
    return out


# ------------------------------------------------------------------------------------------ repo writing
class _Repo:
    """Writes one repo folder: JSON files, tokenizers, component weights (+ variants / shards), root files."""

    def __init__(self, root: str | Path, repo_id: str, seed: int) -> None:
        self.root, self.repo_id, self.seed = Path(root), repo_id, seed
        self.root.mkdir(parents=True, exist_ok=True)

    def json(self, rel: str, obj: dict[str, Any], *, sort_keys: bool = True) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n")

    def configs(self, configs: dict[str, dict[str, Any]]) -> None:
        for rel, cfg in configs.items():
            self.json(rel, cfg, sort_keys=rel != "model_index.json")

    def network(
        self,
        component: str,
        config: dict[str, Any],
        *,
        dtype: torch.dtype | None = None,
        fp16_variant: bool = False,
        shards: int = 1,
        position_ids: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Draw the component's random weights and save them as the repo does; returns them (file keys, fp32)."""
        sd = random_state_dict(config, _seed(self.seed, self.repo_id, component))
        sd = _file_keys(config, sd, position_ids=position_ids)
        name = DIFFUSERS_WEIGHTS if "_class_name" in config else TRANSFORMERS_WEIGHTS
        folder = self.root / component
        if shards > 1:
            save_sharded(sd, folder, name, shards, dtype)
        else:
            _save(sd, folder / name, dtype)
        if fp16_variant and shards > 1:
            save_sharded(sd, folder, name, shards, torch.float16, variant="fp16")
        elif fp16_variant:
            _save(sd, folder / _variant(name, "fp16"), torch.float16)
        return sd

    def clip_tokenizer(
        self,
        component: str,
        *,
        pad: str,
        legacy: bool,
        name_or_path: str | None = None,
        clean_up: bool = True,
    ) -> None:
        """vocab.json + merges.txt (the first CLIP_MERGES real CLIP merges, CLIP's id order) + the two JSON files.

        `legacy`: tokenizer_config.json as transformers 4.2x wrote it (AddedToken dicts: SD 2.1, SDXL); otherwise as
        4.4x writes it (`added_tokens_decoder`: SD3, FLUX). `pad`: "<|endoftext|>" or "!" (OpenCLIP pads with 0).
        `clean_up`: the `clean_up_tokenization_spaces` key (written since transformers 4.27; not in SD 2.1's)."""
        folder = self.root / component
        folder.mkdir(parents=True, exist_ok=True)
        full = json.loads((TINY_CLIP_DIR / "vocab.json").read_text())
        lines = (TINY_CLIP_DIR / "merges.txt").read_text().split("\n")
        tokens = sorted(full, key=full.__getitem__)[: _N_BYTE_TOKENS + CLIP_MERGES]
        tokens += ["<|startoftext|>", "<|endoftext|>"]
        vocab = {t: i for i, t in enumerate(tokens)}
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (folder / "merges.txt").write_text("\n".join(lines[: 1 + CLIP_MERGES]) + "\n")
        flags = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
        bos, eos = {"content": "<|startoftext|>", **flags}, {"content": "<|endoftext|>", **flags}
        pad_entry: Any = pad if pad == "<|endoftext|>" or legacy else {"content": pad, **flags}
        special_map = {"bos_token": bos, "eos_token": eos, "pad_token": pad_entry, "unk_token": eos}
        config: dict[str, Any] = {
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": True,
            "do_lower_case": True,
            "errors": "replace",
            "model_max_length": 77,
            "pad_token": pad,
            "tokenizer_class": "CLIPTokenizer",
        }
        if legacy:
            config.update(
                bos_token={"__type": "AddedToken", **bos},
                eos_token={"__type": "AddedToken", **eos},
                unk_token={"__type": "AddedToken", **eos},
                name_or_path=name_or_path or "openai/clip-vit-large-patch14",
                special_tokens_map_file="./special_tokens_map.json",
            )
        else:
            config.update(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
            config["added_tokens_decoder"] = {
                str(BOS_ID): {**bos, "special": True},
                str(EOS_ID): {**eos, "special": True},
            }
            if pad == "!":
                config["added_tokens_decoder"]["0"] = {"content": "!", **flags, "special": True}
        if not clean_up:
            config.pop("clean_up_tokenization_spaces")
        self.json(f"{component}/tokenizer_config.json", config)
        self.json(f"{component}/special_tokens_map.json", special_map)

    def t5_tokenizer(self, component: str) -> None:
        t5_tokenizer.write_t5_tokenizer(self.root / component)

    def extras(self, *, license_file: bool) -> None:
        """.gitattributes (LFS patterns), README.md, LICENSE.md where the real repo has one."""
        (self.root / ".gitattributes").write_text(
            "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)
        )
        (self.root / "README.md").write_text(
            f"# {self.repo_id} (random-weight test fixture)\n\n"
            "Same layout, file names and config keys as the real repo; reduced widths, random weights.\n"
        )
        if license_file:
            (self.root / "LICENSE.md").write_text(_LICENSE_PLACEHOLDER)


# ------------------------------------------------------------------------------------------ original key formats
def _unet_to_ldm(unet: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel -> `model.diffusion_model.*` (SDXL's `add_embedding` is `label_emb.0`)."""
    out = {}
    for key, value in unet.items():
        if key.startswith("add_embedding.linear_"):
            ldm = (
                f"label_emb.0.{0 if key.startswith('add_embedding.linear_1') else 2}.{key.rsplit('.', 1)[1]}"
            )
        else:
            ldm = unet_key_to_ldm(key, config)
        out["model.diffusion_model." + ldm] = value
    return out


def vae_to_ldm(vae: dict[str, torch.Tensor], config: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL -> LDM / BFL autoencoder keys (`prefix` "first_stage_model." or "" for ae.safetensors);
    the mid-block attention projections become 1x1 convolutions as in the originals."""
    n_levels = len(config["block_out_channels"])
    out = {}
    for key, value in vae.items():
        ldm = vae_key_to_ldm(key, n_levels)
        if ".mid.attn_1." in ldm and ldm.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[prefix + ldm] = value
    return out


def clip_to_ldm(text: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A HF CLIP text tower kept in HF names under `prefix` (SGM's `conditioner.embedders.0.transformer.`)."""
    return {prefix + (k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in text.items()}


def clip_to_open_clip(text: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A HF CLIP text tower -> OpenCLIP's names (`resblocks.i.attn.in_proj_*` = q, k, v stacked; `text_projection`
    = the HF projection transposed), the inverse of diffusers' `convert_open_clip_checkpoint`."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    simple = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    inner = {
        "layer_norm1.": "ln_1.",
        "layer_norm2.": "ln_2.",
        "mlp.fc1.": "mlp.c_fc.",
        "mlp.fc2.": "mlp.c_proj.",
        "self_attn.out_proj.": "attn.out_proj.",
    }
    for key, value in text.items():
        key = key.removeprefix("text_model.")
        if key == "embeddings.position_ids":
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key in simple:
            out[simple[key]] = value
        elif key.startswith("encoder.layers."):
            _, _, idx, rest = key.split(".", 3)
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                proj, kind = rest.split(".")[1:]
                qkv.setdefault(f"transformer.resblocks.{idx}.attn.in_proj_{kind}", {})[proj] = value
                continue
            for hf, oc in inner.items():
                if rest.startswith(hf):
                    out[f"transformer.resblocks.{idx}.{oc}{rest[len(hf) :]}"] = value
                    break
            else:
                raise KeyError(f"unexpected CLIP key {key!r}")
        else:
            raise KeyError(f"unexpected CLIP key {key!r}")
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return {prefix + k: v for k, v in out.items()}


def _swap_scale_shift(weight: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous splits (scale, shift), the originals (shift, scale): an involution."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def sd3_transformer_to_original(
    sd: dict[str, torch.Tensor], config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """diffusers SD3Transformer2DModel -> MMDiT(-X) keys (no prefix), the inverse of diffusers'
    `convert_sd3_transformer_checkpoint_to_diffusers`: fused qkv, `x_block` / `context_block`, `attn2` in the
    dual-attention layers, the last layer's context block pre-only with (shift, scale) adaLN rows."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}
    last = config["num_layers"] - 1

    def move(src: str, dst: str, fn: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        for kind in ("weight", "bias"):
            if f"{src}.{kind}" in sd:
                out[f"{dst}.{kind}"] = fn(sd.pop(f"{src}.{kind}"))

    def fuse(srcs: list[str], dst: str) -> None:
        for kind in ("weight", "bias"):
            out[f"{dst}.{kind}"] = torch.cat([sd.pop(f"{s}.{kind}") for s in srcs], dim=0)

    out["pos_embed"] = sd.pop("pos_embed.pos_embed")
    move("pos_embed.proj", "x_embedder.proj")
    move("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0")
    move("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")
    move("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0")
    move("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2")
    move("context_embedder", "context_embedder")
    for i in range(config["num_layers"]):
        b, x, c = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        fuse([f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"], f"{x}.attn.qkv")
        fuse([f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"], f"{c}.attn.qkv")
        move(f"{b}.attn.norm_q", f"{x}.attn.ln_q")
        move(f"{b}.attn.norm_k", f"{x}.attn.ln_k")
        move(f"{b}.attn.norm_added_q", f"{c}.attn.ln_q")
        move(f"{b}.attn.norm_added_k", f"{c}.attn.ln_k")
        move(f"{b}.attn.to_out.0", f"{x}.attn.proj")
        move(f"{b}.attn.to_add_out", f"{c}.attn.proj")
        if f"{b}.attn2.to_q.weight" in sd:
            fuse([f"{b}.attn2.to_q", f"{b}.attn2.to_k", f"{b}.attn2.to_v"], f"{x}.attn2.qkv")
            move(f"{b}.attn2.norm_q", f"{x}.attn2.ln_q")
            move(f"{b}.attn2.norm_k", f"{x}.attn2.ln_k")
            move(f"{b}.attn2.to_out.0", f"{x}.attn2.proj")
        move(f"{b}.norm1.linear", f"{x}.adaLN_modulation.1")
        move(
            f"{b}.norm1_context.linear",
            f"{c}.adaLN_modulation.1",
            _swap_scale_shift if i == last else lambda t: t,
        )
        move(f"{b}.ff.net.0.proj", f"{x}.mlp.fc1")
        move(f"{b}.ff.net.2", f"{x}.mlp.fc2")
        move(f"{b}.ff_context.net.0.proj", f"{c}.mlp.fc1")
        move(f"{b}.ff_context.net.2", f"{c}.mlp.fc2")
    move("proj_out", "final_layer.linear")
    move("norm_out.linear", "final_layer.adaLN_modulation.1", _swap_scale_shift)
    if sd:
        raise KeyError(f"SD3 keys without an original name: {sorted(sd)[:5]}")
    return out


def flux_transformer_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel -> BFL's flux1-*.safetensors keys (no prefix), the inverse of diffusers'
    `convert_flux_transformer_checkpoint_to_diffusers`: `double_blocks` with fused img/txt qkv, `single_blocks` with
    `linear1` = [q; k; v; mlp_in], q/k RMS norms as `.scale`, `final_layer` adaLN rows (shift, scale)."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def move(src: str, dst: str, fn: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        for kind in ("weight", "bias"):
            if f"{src}.{kind}" in sd:
                out[f"{dst}.{kind}"] = fn(sd.pop(f"{src}.{kind}"))

    def fuse(srcs: list[str], dst: str) -> None:
        for kind in ("weight", "bias"):
            out[f"{dst}.{kind}"] = torch.cat([sd.pop(f"{s}.{kind}") for s in srcs], dim=0)

    def scale(src: str, dst: str) -> None:
        out[f"{dst}.scale"] = sd.pop(f"{src}.weight")

    move("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    move("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    move("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    move("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    move("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
    move("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    move("context_embedder", "txt_in")
    move("x_embedder", "img_in")
    n_double = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    n_single = len({k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")})
    for i in range(n_double):
        b, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        move(f"{b}.norm1.linear", f"{d}.img_mod.lin")
        move(f"{b}.norm1_context.linear", f"{d}.txt_mod.lin")
        fuse([f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"], f"{d}.img_attn.qkv")
        fuse([f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"], f"{d}.txt_attn.qkv")
        scale(f"{b}.attn.norm_q", f"{d}.img_attn.norm.query_norm")
        scale(f"{b}.attn.norm_k", f"{d}.img_attn.norm.key_norm")
        scale(f"{b}.attn.norm_added_q", f"{d}.txt_attn.norm.query_norm")
        scale(f"{b}.attn.norm_added_k", f"{d}.txt_attn.norm.key_norm")
        move(f"{b}.ff.net.0.proj", f"{d}.img_mlp.0")
        move(f"{b}.ff.net.2", f"{d}.img_mlp.2")
        move(f"{b}.ff_context.net.0.proj", f"{d}.txt_mlp.0")
        move(f"{b}.ff_context.net.2", f"{d}.txt_mlp.2")
        move(f"{b}.attn.to_out.0", f"{d}.img_attn.proj")
        move(f"{b}.attn.to_add_out", f"{d}.txt_attn.proj")
    for i in range(n_single):
        b, s = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        move(f"{b}.norm.linear", f"{s}.modulation.lin")
        fuse([f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp"], f"{s}.linear1")
        scale(f"{b}.attn.norm_q", f"{s}.norm.query_norm")
        scale(f"{b}.attn.norm_k", f"{s}.norm.key_norm")
        move(f"{b}.proj_out", f"{s}.linear2")
    move("proj_out", "final_layer.linear")
    move("norm_out.linear", "final_layer.adaLN_modulation.1", _swap_scale_shift)
    if sd:
        raise KeyError(f"FLUX keys without an original name: {sorted(sd)[:5]}")
    return out


@contextlib.contextmanager
def flux_single_file_width(inner_dim: int) -> Iterator[None]:
    """Let diffusers' FLUX single-file loader read a reduced-width BFL checkpoint.

    diffusers 0.42.1's `convert_flux_transformer_checkpoint_to_diffusers` hardcodes FLUX.1's width
    (`inner_dim = 3072`) to split each single block's fused `linear1`, so a 128-wide file cannot load unpatched.
    Inside this context the loader uses a copy of diffusers' own function with that one constant replaced by
    `inner_dim` (everything else is diffusers' code); outside, nothing changes. A no-op if diffusers no longer has
    the constant (then it reads the width from the file and the patch is not needed).
    """
    from diffusers.loaders import single_file_model

    entry = single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    original = entry["checkpoint_mapping_fn"]
    code = original.__code__
    if 3072 not in code.co_consts or inner_dim == 3072:
        yield
        return
    consts = tuple(inner_dim if c == 3072 and type(c) is int else c for c in code.co_consts)
    patched = types.FunctionType(
        code.replace(co_consts=consts), original.__globals__, original.__name__, original.__defaults__
    )
    entry["checkpoint_mapping_fn"] = patched
    try:
        yield
    finally:
        entry["checkpoint_mapping_fn"] = original


# ------------------------------------------------------------------------------------------ SDXL base 1.0
SDXL_SINGLE_FILE = "sd_xl_base_1.0.safetensors"  # the 1.0 VAE (= vae_1_0/)
SDXL_SINGLE_FILE_09VAE = "sd_xl_base_1.0_0.9vae.safetensors"  # the 0.9 VAE (= vae/)


def sdxl_configs() -> dict[str, dict[str, Any]]:
    """The JSON files of stabilityai/stable-diffusion-xl-base-1.0 (diffusers 0.19 / transformers 4.32), reduced."""
    time_dim = 8  # addition_time_embed_dim (256): 6 size/crop ids, each embedded to this width
    te = _clip_text_config("clip_l", "CLIPTextModel", "float16", "4.32.0.dev0")
    te2 = _clip_text_config("clip_g", "CLIPTextModelWithProjection", "float16", "4.32.0.dev0")
    te2.pop("_name_or_path", None)
    unet = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.19.0.dev0",
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": time_dim,
        "attention_head_dim": [1, 2, 2],  # [5, 10, 20]: heads per level (head dim 64 -> 32)
        "block_out_channels": [32, 64, 64],  # [320, 640, 1280]
        "center_input_sample": False,
        "class_embed_type": None,
        "class_embeddings_concat": False,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": te["hidden_size"] + te2["hidden_size"],  # 2048 = 768 + 1280
        "cross_attention_norm": None,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": te2["projection_dim"]
        + 6 * time_dim,  # 2816 = 1280 + 6 * 256
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False,
        "resnet_time_scale_shift": "default",
        "sample_size": 8,  # 128
        "time_cond_proj_dim": None,
        "time_embedding_act_fn": None,
        "time_embedding_dim": None,
        "time_embedding_type": "positional",
        "timestep_post_act": None,
        "transformer_layers_per_block": [1, 1, 2],  # [1, 2, 10]
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": None,
        "use_linear_projection": True,
    }
    vae = _vae_config("0.20.0.dev0", _name_or_path="../sdxl-vae/", force_upcast=True, scaling_factor=0.13025)
    return {
        "model_index.json": {
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": "0.19.0.dev0",
            "force_zeros_for_empty_prompt": True,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
        "scheduler/scheduler_config.json": {
            "_class_name": "EulerDiscreteScheduler",
            "_diffusers_version": "0.19.0.dev0",
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
        },
        "unet/config.json": dict(sorted(unet.items())),
        "vae/config.json": vae,
        "vae_1_0/config.json": vae,
        "text_encoder/config.json": te,
        "text_encoder_2/config.json": te2,
    }


def build_sdxl(root: str | Path, *, seed: int = 0, fp16: bool = True, single_files: bool = True) -> Path:
    """stabilityai/stable-diffusion-xl-base-1.0 into `root`: unet/ vae/ vae_1_0/ text_encoder/ text_encoder_2/
    tokenizer/ tokenizer_2/ scheduler/ (+ `fp16` variants) and the two SGM root checkpoints (fp16)."""
    repo = _Repo(root, SDXL, seed)
    configs = sdxl_configs()
    repo.configs(configs)
    repo.clip_tokenizer("tokenizer", pad="<|endoftext|>", legacy=True)
    repo.clip_tokenizer(
        "tokenizer_2", pad="!", legacy=True, name_or_path="laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
    )
    sds = {
        c: repo.network(c, configs[f"{c}/config.json"], fp16_variant=fp16)
        for c in ("unet", "vae", "vae_1_0", "text_encoder", "text_encoder_2")
    }
    repo.extras(license_file=True)
    if single_files:
        for name, vae in ((SDXL_SINGLE_FILE, "vae_1_0"), (SDXL_SINGLE_FILE_09VAE, "vae")):
            state = _unet_to_ldm(sds["unet"], configs["unet/config.json"])
            state.update(vae_to_ldm(sds[vae], configs["vae/config.json"], "first_stage_model."))
            state.update(clip_to_ldm(sds["text_encoder"], "conditioner.embedders.0.transformer."))
            state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(
                77, dtype=torch.int64
            )[None]  # SGM pinned transformers 4.19: a persistent buffer then
            state.update(clip_to_open_clip(sds["text_encoder_2"], "conditioner.embedders.1.model."))
            state["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6052)
            _save(state, repo.root / name, torch.float16)
    return repo.root


# ------------------------------------------------------------------------------------------ SD 3.5 medium
SD35_SINGLE_FILE = "sd3.5_medium.safetensors"
SD35_TEXT_ENCODER_FILES = {  # text_encoders/<file> -> (component, dtype)
    "clip_g.safetensors": ("text_encoder_2", torch.float16),
    "clip_l.safetensors": ("text_encoder", torch.float16),
    "t5xxl_fp16.safetensors": ("text_encoder_3", torch.float16),
    "t5xxl_fp8_e4m3fn.safetensors": ("text_encoder_3", torch.float8_e4m3fn),
}


def text_encoders_file(name: str, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `text_encoders/` file from its component's tensors, cast from the fp16 the folder stores (HF names). As the
    real files' sizes show: `clip_l` has no `text_projection` (SD3 uses CLIP-L's pooled output unprojected),
    `clip_g` is text_encoder_2 as is, the T5 files also hold the tied `encoder.embed_tokens.weight` (a second copy
    of `shared.weight`, 263 MB in the real fp16 file)."""
    out = _cast(stored, torch.float16)
    if name == "clip_l.safetensors":
        out = {k: v for k, v in out.items() if not k.startswith("text_projection")}
    if name.startswith("t5xxl"):
        out = {**out, "encoder.embed_tokens.weight": out["shared.weight"].clone()}
    return out


def sd35_medium_configs() -> dict[str, dict[str, Any]]:
    """The JSON files of stabilityai/stable-diffusion-3.5-medium (diffusers 0.31 / transformers 4.4x), reduced."""
    te = _clip_text_config("clip_l", "CLIPTextModelWithProjection", "float16", "4.45.0.dev0")
    te2 = _clip_text_config("clip_g", "CLIPTextModelWithProjection", "float16", "4.45.0.dev0")
    te.pop("_name_or_path", None)
    te3 = _t5_config("float16", "4.45.0.dev0")
    te3.pop("_name_or_path", None)
    heads, head_dim = 2, 64  # 24 x 64
    transformer = {
        "_class_name": "SD3Transformer2DModel",
        "_diffusers_version": "0.31.0.dev0",
        "attention_head_dim": head_dim,
        "caption_projection_dim": heads * head_dim,  # 1536
        "dual_attention_layers": [0, 1],  # [0, ..., 12] of 24 layers: the first ones
        "in_channels": 16,
        "joint_attention_dim": te3["d_model"],  # 4096
        "num_attention_heads": heads,
        "num_layers": 4,  # 24
        "out_channels": 16,
        "patch_size": 2,
        "pooled_projection_dim": te["projection_dim"] + te2["projection_dim"],  # 2048 = 768 + 1280
        "pos_embed_max_size": 24,  # 384 (3x the latent side, as 384 = 3 x 128)
        "qk_norm": "rms_norm",
        "sample_size": 8,  # 128
    }
    vae = _vae_config(
        "0.31.0.dev0",
        force_upcast=True,
        latent_channels=16,
        latents_mean=None,
        latents_std=None,
        mid_block_add_attention=True,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_post_quant_conv=False,
        use_quant_conv=False,
    )
    return {
        "model_index.json": {
            "_class_name": "StableDiffusion3Pipeline",
            "_diffusers_version": "0.31.0.dev0",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_3": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "tokenizer_3": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "SD3Transformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
        "scheduler/scheduler_config.json": {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "_diffusers_version": "0.31.0.dev0",
            "num_train_timesteps": 1000,
            "shift": 3.0,
        },
        "transformer/config.json": transformer,
        "vae/config.json": vae,
        "text_encoder/config.json": te,
        "text_encoder_2/config.json": te2,
        "text_encoder_3/config.json": te3,
    }


def build_sd35_medium(
    root: str | Path, *, seed: int = 0, single_file: bool = True, text_encoders: bool = True
) -> Path:
    """stabilityai/stable-diffusion-3.5-medium into `root`: transformer/ vae/ text_encoder{,_2,_3}/ (fp16 +
    `fp16` variants, T5 in 2 shards) tokenizer{,_2,_3}/ scheduler/, the root `sd3.5_medium.safetensors` (MMDiT +
    VAE, no text encoders, as the real 5.1 GB file) and `text_encoders/` (ComfyUI-style: HF names, one file per
    encoder, T5 also as fp8)."""
    repo = _Repo(root, SD35_MEDIUM, seed)
    configs = sd35_medium_configs()
    repo.configs(configs)
    repo.clip_tokenizer("tokenizer", pad="<|endoftext|>", legacy=False)
    repo.clip_tokenizer("tokenizer_2", pad="!", legacy=False)
    repo.t5_tokenizer("tokenizer_3")
    half = torch.bfloat16
    sds = {
        "transformer": repo.network("transformer", configs["transformer/config.json"], dtype=half),
        "vae": repo.network("vae", configs["vae/config.json"], dtype=half),
    }
    for c, n_shards in (("text_encoder", 1), ("text_encoder_2", 1), ("text_encoder_3", 2)):
        cfg = configs[f"{c}/config.json"]  # fp16 files + fp16 variants with the same bytes, as the real repo
        sds[c] = repo.network(c, cfg, dtype=torch.float16, fp16_variant=True, shards=n_shards)
    repo.extras(license_file=True)
    if single_file:
        state = {
            "model.diffusion_model." + k: v
            for k, v in sd3_transformer_to_original(
                sds["transformer"], configs["transformer/config.json"]
            ).items()
        }
        state.update(vae_to_ldm(sds["vae"], configs["vae/config.json"], "first_stage_model."))
        _save(state, repo.root / SD35_SINGLE_FILE, half)
    if text_encoders:
        for name, (component, dtype) in SD35_TEXT_ENCODER_FILES.items():
            _save(text_encoders_file(name, sds[component]), repo.root / "text_encoders" / name, dtype)
    return repo.root


# ------------------------------------------------------------------------------------------ FLUX.1 dev / schnell
FLUX_DEV_SINGLE_FILE = "flux1-dev.safetensors"
FLUX_SCHNELL_SINGLE_FILE = "flux1-schnell.safetensors"
FLUX_AE = "ae.safetensors"


def flux_configs(*, dev: bool) -> dict[str, dict[str, Any]]:
    """The JSON files of black-forest-labs/FLUX.1-{dev,schnell} (diffusers 0.30 / transformers 4.43), reduced."""
    te = _clip_text_config("clip_l", "CLIPTextModel", "bfloat16", "4.43.3")
    te2 = _t5_config("bfloat16", "4.43.3")
    transformer = {
        "_class_name": "FluxTransformer2DModel",
        "_diffusers_version": "0.30.0.dev0",
        "attention_head_dim": 128,  # kept: RoPE axes (16, 56, 56) sum to it
        "guidance_embeds": dev,
        "in_channels": 64,  # 16 latent channels x 2 x 2 packing
        "joint_attention_dim": te2["d_model"],  # 4096
        "num_attention_heads": 1,  # 24
        "num_layers": 2,  # 19 double-stream blocks
        "num_single_layers": 4,  # 38 single-stream blocks
        "patch_size": 1,
        "pooled_projection_dim": te["hidden_size"],  # 768: CLIP-L's pooled output, unprojected
    }
    vae = _vae_config(
        "0.30.0.dev0",
        _name_or_path="../checkpoints/flux-dev" if dev else "../checkpoints/flux-schnell",
        force_upcast=True,
        latent_channels=16,
        latents_mean=None,
        latents_std=None,
        mid_block_add_attention=True,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_post_quant_conv=False,
        use_quant_conv=False,
    )
    scheduler = {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": "0.30.0.dev0",
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 3.0 if dev else 1.0,
        "use_dynamic_shifting": dev,
    }
    return {
        "model_index.json": {
            "_class_name": "FluxPipeline",
            "_diffusers_version": "0.30.0.dev0",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
        "scheduler/scheduler_config.json": scheduler,
        "transformer/config.json": transformer,
        "vae/config.json": vae,
        "text_encoder/config.json": te,
        "text_encoder_2/config.json": te2,
    }


def _build_flux(root: str | Path, repo_id: str, *, dev: bool, seed: int, single_files: bool) -> Path:
    repo = _Repo(root, repo_id, seed)
    configs = flux_configs(dev=dev)
    repo.configs(configs)
    repo.clip_tokenizer("tokenizer", pad="<|endoftext|>", legacy=False)
    repo.t5_tokenizer("tokenizer_2")
    half = torch.bfloat16
    transformer = repo.network("transformer", configs["transformer/config.json"], dtype=half, shards=3)
    vae = repo.network("vae", configs["vae/config.json"], dtype=half)
    repo.network("text_encoder", configs["text_encoder/config.json"], dtype=half)
    repo.network("text_encoder_2", configs["text_encoder_2/config.json"], dtype=half, shards=2)
    repo.extras(
        license_file=dev
    )  # dev: its non-commercial LICENSE.md; schnell: Apache-2.0, named in the README
    if single_files:
        name = FLUX_DEV_SINGLE_FILE if dev else FLUX_SCHNELL_SINGLE_FILE
        _save(flux_transformer_to_original(transformer), repo.root / name, half)
        _save(vae_to_ldm(vae, configs["vae/config.json"], ""), repo.root / FLUX_AE, torch.float32)
    return repo.root


def build_flux_dev(root: str | Path, *, seed: int = 0, single_files: bool = True) -> Path:
    """black-forest-labs/FLUX.1-dev into `root`: transformer/ (3 shards + index, guidance embedding) vae/
    text_encoder/ (CLIP-L) text_encoder_2/ (T5, 2 shards + index) tokenizer/ tokenizer_2/ scheduler/ (dynamic
    shifting), root `flux1-dev.safetensors` (BFL keys, transformer only, bf16) + `ae.safetensors` (fp32)."""
    return _build_flux(root, FLUX_DEV, dev=True, seed=seed, single_files=single_files)


def build_flux_schnell(root: str | Path, *, seed: int = 0, single_files: bool = True) -> Path:
    """black-forest-labs/FLUX.1-schnell: as dev without guidance embedding, static shift 1.0 scheduler, root
    `flux1-schnell.safetensors` + `ae.safetensors`."""
    return _build_flux(root, FLUX_SCHNELL, dev=False, seed=seed, single_files=single_files)


# ------------------------------------------------------------------------------------------ SD 2.1
SD21_SINGLE_FILE = "v2-1_768-ema-pruned.safetensors"
SD21_NONEMA_SINGLE_FILE = "v2-1_768-nonema-pruned.safetensors"


def sd21_configs() -> dict[str, dict[str, Any]]:
    """The JSON files of stabilityai/stable-diffusion-2-1 (diffusers 0.10 / transformers 4.25), reduced."""
    te = _clip_text_config("clip_h", "CLIPTextModel", "float32", "4.25.0.dev0")
    unet = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.10.0.dev0",
        "act_fn": "silu",
        "attention_head_dim": [1, 2, 2, 2],  # [5, 10, 20, 20]: heads per level (head dim 64 -> 32)
        "block_out_channels": [32, 64, 64, 64],  # [320, 640, 1280, 1280]
        "center_input_sample": False,
        "cross_attention_dim": te["hidden_size"],  # 1024
        "down_block_types": [
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "sample_size": 8,  # 96
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "upcast_attention": True,
        "use_linear_projection": True,
    }
    return {
        "model_index.json": {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.10.0.dev0",
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
        "scheduler/scheduler_config.json": {
            "_class_name": "DDIMScheduler",
            "_diffusers_version": "0.8.0",
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
        },
        "unet/config.json": unet,
        "vae/config.json": _vae_config("0.10.0.dev0"),  # no scaling_factor key: the default 0.18215 applies
        "text_encoder/config.json": te,
        "feature_extractor/preprocessor_config.json": {
            "crop_size": 224,
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3,
            "size": 224,
        },
    }


def _sd21_open_clip_extras(repo: _Repo, te_config: dict[str, Any], draw: str) -> dict[str, torch.Tensor]:
    """What the LDM checkpoint's OpenCLIP-H text tower has beyond the diffusers folder: its 24th resblock (SD 2.x
    conditions on the penultimate layer, so diffusers truncates to 23) and `text_projection` / `logit_scale`."""
    full = dict(te_config, num_hidden_layers=te_config["num_hidden_layers"] + 1)
    extra = clip_to_open_clip(
        random_state_dict(full, _seed(repo.seed, repo.repo_id, draw)), "cond_stage_model.model."
    )
    last = f"cond_stage_model.model.transformer.resblocks.{te_config['num_hidden_layers']}."
    width = te_config["hidden_size"]
    generator = torch.Generator().manual_seed(_seed(repo.seed, repo.repo_id, draw + ".projection"))
    out = {k: v for k, v in extra.items() if k.startswith(last)}
    out["cond_stage_model.model.text_projection"] = (
        torch.randn(width, width, generator=generator) * width**-0.5
    )
    out["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
    return out


def build_sd21(
    root: str | Path,
    *,
    seed: int = 0,
    fp16: bool = True,
    single_file: bool = True,
    nonema: bool = False,
    pickles: bool = False,
) -> Path:
    """stabilityai/stable-diffusion-2-1 into `root`: unet/ vae/ text_encoder/ tokenizer/ scheduler/ (DDIM,
    v-prediction) feature_extractor/ (+ `fp16` variants), the root `v2-1_768-ema-pruned.safetensors` (LDM keys,
    OpenCLIP text tower with all 24 resblocks, fp32). `nonema`: also `v2-1_768-nonema-pruned.safetensors` (a second
    UNet draw); `pickles`: the `.bin` duplicates and the `.ckpt` root files the real repo also has."""
    repo = _Repo(root, SD21, seed)
    configs = sd21_configs()
    repo.configs(configs)
    repo.clip_tokenizer(
        "tokenizer",
        pad="!",
        legacy=True,
        name_or_path="hf-models/stable-diffusion-v2-768x768/tokenizer",
        clean_up=False,
    )
    sds = {
        c: repo.network(c, configs[f"{c}/config.json"], fp16_variant=fp16, position_ids=c == "text_encoder")
        for c in ("unet", "vae", "text_encoder")
    }
    repo.extras(license_file=False)
    if pickles:
        for c, sd in sds.items():
            name = "diffusion_pytorch_model" if c != "text_encoder" else "pytorch_model"
            torch.save(sd, repo.root / c / f"{name}.bin")
            if fp16:
                torch.save(_cast(sd, torch.float16), repo.root / c / f"{name}.fp16.bin")
    roots = [(SD21_SINGLE_FILE, sds["unet"])]
    if nonema:
        roots.append(
            (
                SD21_NONEMA_SINGLE_FILE,
                random_state_dict(configs["unet/config.json"], _seed(seed, SD21, "unet.nonema")),
            )
        )
    if single_file:
        sched = configs["scheduler/scheduler_config.json"]
        text_extra = _sd21_open_clip_extras(
            repo, configs["text_encoder/config.json"], "text_encoder.open_clip"
        )
        for name, unet in roots:
            state = _unet_to_ldm(unet, configs["unet/config.json"])
            state.update(vae_to_ldm(sds["vae"], configs["vae/config.json"], "first_stage_model."))
            state.update(clip_to_open_clip(sds["text_encoder"], "cond_stage_model.model."))
            state.update(text_extra)
            state.update(ddpm_buffers(sched["num_train_timesteps"], sched["beta_start"], sched["beta_end"]))
            _save(state, repo.root / name, torch.float32)
            if pickles:
                torch.save({"state_dict": state}, repo.root / name.replace(".safetensors", ".ckpt"))
    return repo.root


# ------------------------------------------------------------------------------------------ registry
REPOS: dict[str, Callable[..., Path]] = {
    SDXL: build_sdxl,
    SD35_MEDIUM: build_sd35_medium,
    FLUX_DEV: build_flux_dev,
    FLUX_SCHNELL: build_flux_schnell,
    SD21: build_sd21,
}


@dataclass(frozen=True)
class RepoFacts:
    """What a caller needs to use a repo without reading its files: the pipeline class `model_index.json` names,
    the smallest image side the architecture accepts (px), and the root single-file checkpoints."""

    pipeline_class: str
    smallest_px: int
    single_files: tuple[str, ...]


FACTS: dict[str, RepoFacts] = {
    SDXL: RepoFacts("StableDiffusionXLPipeline", 32, (SDXL_SINGLE_FILE, SDXL_SINGLE_FILE_09VAE)),
    SD35_MEDIUM: RepoFacts("StableDiffusion3Pipeline", 32, (SD35_SINGLE_FILE,)),
    FLUX_DEV: RepoFacts("FluxPipeline", 32, (FLUX_DEV_SINGLE_FILE, FLUX_AE)),
    FLUX_SCHNELL: RepoFacts("FluxPipeline", 32, (FLUX_SCHNELL_SINGLE_FILE, FLUX_AE)),
    SD21: RepoFacts("StableDiffusionPipeline", 64, (SD21_SINGLE_FILE,)),
}


def folder_name(repo_id: str) -> str:
    """The local folder a repo is built into: the hub name without the owner."""
    return repo_id.split("/", 1)[1]


def build_repo(repo_id: str, parent: str | Path, **kwargs: Any) -> Path:
    """Build `repo_id` into `parent/<name>`; `kwargs` go to its builder (seed, variants, root files)."""
    if repo_id not in REPOS:
        raise KeyError(f"no teacher repo builder for {repo_id!r}; known: {sorted(REPOS)}")
    return REPOS[repo_id](Path(parent) / folder_name(repo_id), **kwargs)


def install_in_hub_cache(folder: str | Path, hf_home: str | Path, repo_id: str, **kwargs: Any) -> Path:
    """A built folder as the hub cache entry of `repo_id` under `hf_home` (hard links; `allow_patterns` /
    `ignore_patterns` install a subset: see `hub_cache.install_in_hub_cache`); returns the snapshot folder."""
    return hub_cache.install_in_hub_cache(folder, hf_home, repo_id, **kwargs)


def build_hub_cache(
    hf_home: str | Path, parent: str | Path, repo_ids: list[str] | None = None
) -> dict[str, Path]:
    """Build `repo_ids` (default: all of REPOS) under `parent` and install each into `hf_home`'s hub cache under its
    hub id; returns hub id -> folder. Use the cache with `offline_hub(hf_home)` (or HF_HOME + HF_HUB_OFFLINE=1)."""
    folders = {}
    for repo_id in repo_ids or list(REPOS):
        folders[repo_id] = build_repo(repo_id, parent)
        install_in_hub_cache(folders[repo_id], hf_home, repo_id)
    return folders


# ------------------------------------------------------------------------------------------ real size
# The real repos' widths and depths: what the reduced configs above cut (their comments name these values).
# `real_size_configs` puts them back, so a model built from the result (`ModelFamily.from_configs`, random
# weights) has the real networks' parameter counts: what benchmarks/footprint.py measures and tests count.
_CLIP_L = dict(
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768,
    vocab_size=49408,
)  # fmt: skip
_CLIP_G = dict(
    hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280,
    vocab_size=49408,
)  # fmt: skip
_CLIP_H = dict(
    hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23, projection_dim=512,
    vocab_size=49408,
)  # fmt: skip
_T5_XXL = dict(d_model=4096, d_ff=10240, num_heads=64, num_layers=24, num_decoder_layers=24, vocab_size=32128)
_VAE_1024 = dict(block_out_channels=[128, 256, 512, 512], sample_size=1024)
_REAL_SIZE: dict[str, dict[str, dict[str, Any]]] = {
    SDXL: {
        "unet/config.json": dict(
            attention_head_dim=[5, 10, 20],
            block_out_channels=[320, 640, 1280],
            addition_time_embed_dim=256,
            cross_attention_dim=2048,
            projection_class_embeddings_input_dim=2816,
            sample_size=128,
            transformer_layers_per_block=[1, 2, 10],
        ),  # fmt: skip
        "vae/config.json": _VAE_1024,
        "vae_1_0/config.json": _VAE_1024,
        "text_encoder/config.json": _CLIP_L,
        "text_encoder_2/config.json": _CLIP_G,
    },
    SD35_MEDIUM: {
        "transformer/config.json": dict(
            caption_projection_dim=1536,
            dual_attention_layers=list(range(13)),
            joint_attention_dim=4096,
            num_attention_heads=24,
            num_layers=24,
            pooled_projection_dim=2048,
            pos_embed_max_size=384,
            sample_size=128,
        ),  # fmt: skip
        "vae/config.json": _VAE_1024,
        "text_encoder/config.json": _CLIP_L,
        "text_encoder_2/config.json": _CLIP_G,
        "text_encoder_3/config.json": _T5_XXL,
    },
    FLUX_DEV: {
        "transformer/config.json": dict(
            joint_attention_dim=4096,
            num_attention_heads=24,
            num_layers=19,
            num_single_layers=38,
            pooled_projection_dim=768,
        ),  # fmt: skip
        "vae/config.json": _VAE_1024,
        "text_encoder/config.json": _CLIP_L,
        "text_encoder_2/config.json": _T5_XXL,
    },
    SD21: {
        "unet/config.json": dict(
            attention_head_dim=[5, 10, 20, 20],
            block_out_channels=[320, 640, 1280, 1280],
            cross_attention_dim=1024,
            sample_size=96,
        ),  # fmt: skip
        "vae/config.json": dict(block_out_channels=[128, 256, 512, 512], sample_size=768),
        "text_encoder/config.json": _CLIP_H,
    },
}
_REAL_SIZE[FLUX_SCHNELL] = _REAL_SIZE[FLUX_DEV]
_CONFIGS: dict[str, Callable[[], dict[str, dict[str, Any]]]] = {
    SDXL: sdxl_configs,
    SD35_MEDIUM: sd35_medium_configs,
    FLUX_DEV: lambda: flux_configs(dev=True),
    FLUX_SCHNELL: lambda: flux_configs(dev=False),
    SD21: sd21_configs,
}


def hub_configs(repo_id: str) -> dict[str, dict[str, Any]]:
    """The JSON files of `repo_id` as the tiny repo holds them (reduced widths and depths)."""
    if repo_id not in _CONFIGS:
        raise KeyError(f"no configs for {repo_id!r}; known: {sorted(_CONFIGS)}")
    return _CONFIGS[repo_id]()


def real_size_configs(repo_id: str) -> dict[str, dict[str, Any]]:
    """The JSON files of `repo_id` (model_index.json, every component's config) at the real repo's widths and
    depths. SD 1.5's hub id gives `tests/support/sd15.py`'s real configs."""
    from tests.support import sd15

    if repo_id == sd15.REPO_ID:
        return sd15.real_configs()
    configs = hub_configs(repo_id)
    for rel, real in _REAL_SIZE[repo_id].items():
        configs[rel] = dict(sorted({**configs[rel], **real}.items()))
    return configs


def write_configs(configs: dict[str, dict[str, Any]], folder: str | Path) -> Path:
    """The JSON files into `folder` (no weights, no tokenizers): what `ModelFamily.from_configs` builds from when
    it skips the tokenizers."""
    folder = Path(folder)
    for rel, cfg in configs.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfg, indent=2, sort_keys=rel != "model_index.json") + "\n")
    return folder
