"""A Stable Diffusion 1.5-shaped repo with random weights, laid out like `stable-diffusion-v1-5/stable-diffusion-v1-5`.

Same files, names, config keys, block structure and key formats as the real hub repo, at reduced width (118 MB with
every variant and the single file, 40 MB without; ~3 s to build on a CPU once diffusers is imported), in three layouts:

1. `build_sd15_folder(root)`: the repo as a local folder: model_index.json, unet/ vae/ text_encoder/ tokenizer/
   scheduler/ safety_checker/ feature_extractor/, fp16 + non_ema variants beside the full-precision files, optional
   pickled `.bin` duplicates, and the root single-file checkpoint `v1-5-pruned-emaonly.safetensors` (original LDM
   key format) + `v1-inference.yaml`.
2. `install_in_hub_cache(folder, hf_home)`: the same files as a Hugging Face cache entry
   (`hub/models--stable-diffusion-v1-5--stable-diffusion-v1-5/{blobs,refs,snapshots,trees}`), so that the hub id
   resolves offline (`HF_HUB_OFFLINE=1`, `local_files_only=True`).
3. `write_single_file(folder, path)`: the LDM checkpoint alone, converted from the folder's weights.

Kept faithful to the real files on purpose (these are the paths the project must survive): configs as written by
diffusers 0.6 / transformers 4.22 (no `scaling_factor` in vae/config.json, `eos_token_id: 2` in the text encoder),
the VAE mid-block attention under its deprecated names (`query`/`key`/`value`/`proj_attn`), the text encoder under
`text_model.*` with a `position_ids` buffer, the safety checker under `vision_model.vision_model.*`, and the
tokenizer as vocab.json + merges.txt with `AddedToken` dicts in tokenizer_config.json. No network, deterministic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from instaflow_core.models.tokenizer import TINY_CLIP_DIR  # vocab.json + merges.txt (4000 merges)
from tests.support import hub_cache
from tests.support.hub_cache import LFS_SUFFIXES, offline_hub, repo_files  # noqa: F401  (re-exported)
from tests.support.sd15_ldm import ddpm_buffers, diffusers_to_ldm, inference_yaml

REPO_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SINGLE_FILE = "v1-5-pruned-emaonly.safetensors"
ORIGINAL_CONFIG = "v1-inference.yaml"
_N_BYTE_TOKENS = 512
_WEIGHTS = {  # component -> (full-precision file name, pickle file name)
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
    "safety_checker": ("model.safetensors", "pytorch_model.bin"),
}


@dataclass(frozen=True)
class Sd15Shape:
    """The reduced widths. Everything else (block types, depths, 768-d text, 77 tokens, 8 heads) is SD 1.5's."""

    unet_channels: tuple[int, ...] = (32, 64, 64, 64)  # SD 1.5: (320, 640, 1280, 1280)
    vae_channels: tuple[int, ...] = (32, 64, 64, 64)  # SD 1.5: (128, 256, 512, 512)
    text_layers: int = 1  # SD 1.5: 12 (CLIP ViT-L/14 text tower)
    text_intermediate: int = 64  # SD 1.5: 3072
    vocab_merges: int = 1000  # BPE merges kept; vocab = 512 + merges + 2 (SD 1.5: 48894 -> 49408)
    safety_hidden: int = 32  # SD 1.5's safety checker: CLIP ViT-L/14 vision tower (1024)


# The JSON files of the real repo with SD 1.5's own values (written by diffusers 0.6 / transformers 4.22; the safety
# checker's CLIPConfig trimmed to the keys that matter). `sd15_configs` applies the reduced widths on top.
_REAL_CONFIGS = """{
"model_index.json": {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
  "feature_extractor": ["transformers", "CLIPImageProcessor"],
  "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"], "scheduler": ["diffusers", "PNDMScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]},
"unet/config.json": {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
  "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
  "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]},
"vae/config.json": {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
  "sample_size": 512,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]},
"text_encoder/config.json": {"_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
  "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu",
  "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
  "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
  "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768,
  "torch_dtype": "float32", "transformers_version": "4.22.0.dev0", "vocab_size": 49408},
"tokenizer/tokenizer_config.json": {"add_prefix_space": false,
  "bos_token": {"__type": "AddedToken", "content": "<|startoftext|>", "lstrip": false, "normalized": true,
                "rstrip": false, "single_word": false},
  "do_lower_case": true,
  "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": false, "normalized": true,
                "rstrip": false, "single_word": false},
  "errors": "replace", "model_max_length": 77, "name_or_path": "openai/clip-vit-large-patch14",
  "pad_token": "<|endoftext|>", "special_tokens_map_file": "./special_tokens_map.json",
  "tokenizer_class": "CLIPTokenizer",
  "unk_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": false, "normalized": true,
                "rstrip": false, "single_word": false}},
"tokenizer/special_tokens_map.json": {
  "bos_token": {"content": "<|startoftext|>", "lstrip": false, "normalized": true, "rstrip": false,
                "single_word": false},
  "eos_token": {"content": "<|endoftext|>", "lstrip": false, "normalized": true, "rstrip": false,
                "single_word": false},
  "pad_token": "<|endoftext|>",
  "unk_token": {"content": "<|endoftext|>", "lstrip": false, "normalized": true, "rstrip": false,
                "single_word": false}},
"scheduler/scheduler_config.json": {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
  "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
  "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null,
  "clip_sample": false},
"safety_checker/config.json": {"_name_or_path": "CompVis/stable-diffusion-safety-checker",
  "architectures": ["StableDiffusionSafetyChecker"], "initializer_factor": 1.0, "logit_scale_init_value": 2.6592,
  "model_type": "clip", "projection_dim": 768,
  "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                  "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408, "bos_token_id": 0,
                  "eos_token_id": 2, "pad_token_id": 1, "model_type": "clip_text_model"},
  "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                    "num_hidden_layers": 24, "image_size": 224, "patch_size": 14, "model_type": "clip_vision_model"},
  "torch_dtype": "float32", "transformers_version": "4.22.0.dev0"},
"feature_extractor/preprocessor_config.json": {"crop_size": 224, "do_center_crop": true, "do_convert_rgb": true,
  "do_normalize": true, "do_resize": true, "feature_extractor_type": "CLIPFeatureExtractor",
  "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
  "resample": 3, "size": 224}
}"""


def real_configs() -> dict[str, dict[str, Any]]:
    """Every JSON file of the real repo at SD 1.5's own widths (what benchmarks/footprint.py builds)."""
    return json.loads(_REAL_CONFIGS)


def sd15_configs(shape: Sd15Shape = Sd15Shape()) -> dict[str, dict[str, Any]]:
    """Every JSON file of the repo, keyed by its path: the real files with the widths of `shape`.

    vae/config.json has no `scaling_factor`, as the real file: diffusers' default 0.18215 applies.
    """
    cfg = json.loads(_REAL_CONFIGS)
    n_vocab = _N_BYTE_TOKENS + shape.vocab_merges + 2
    if len(shape.unet_channels) != 4 or len(shape.vae_channels) != 4:
        raise ValueError("SD 1.5 has 4 UNet levels and 4 VAE levels (latents 8x smaller than images)")
    cfg["unet/config.json"]["block_out_channels"] = list(shape.unet_channels)
    cfg["vae/config.json"]["block_out_channels"] = list(shape.vae_channels)
    cfg["text_encoder/config.json"].update(
        intermediate_size=shape.text_intermediate, num_hidden_layers=shape.text_layers, vocab_size=n_vocab
    )
    small = {"hidden_size": shape.safety_hidden, "intermediate_size": 2 * shape.safety_hidden}
    small.update(num_attention_heads=4, num_hidden_layers=1)
    sc = cfg["safety_checker/config.json"]
    sc["projection_dim"] = shape.safety_hidden
    sc["text_config"].update(small, vocab_size=n_vocab)
    sc["vision_config"].update(small)
    return cfg


# ------------------------------------------------------------------------------------------ random weights
_SEED_OFFSETS = {"unet": 0, "vae": 1, "text_encoder": 2, "safety_checker": 3, "unet.non_ema": 4}


def _random_state_dicts(
    configs: dict[str, dict[str, Any]], seed: int, names: list[str]
) -> dict[str, dict[str, torch.Tensor]]:
    """Seeded random weights per network (`unet.non_ema`: a second UNet draw standing in for the non-EMA weights).

    Each network has its own fixed seed, so its weights do not depend on which other files are built.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel

    def hf_config(path: str) -> dict[str, Any]:
        return {k: v for k, v in configs[path].items() if not k.startswith("_") and k != "architectures"}

    builders = {
        "unet": lambda: UNet2DConditionModel.from_config(configs["unet/config.json"]),
        "vae": lambda: AutoencoderKL.from_config(configs["vae/config.json"]),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**hf_config("text_encoder/config.json"))),
        "safety_checker": lambda: StableDiffusionSafetyChecker(
            CLIPConfig(**hf_config("safety_checker/config.json"))
        ),
    }
    out: dict[str, dict[str, torch.Tensor]] = {}
    with torch.random.fork_rng(devices=[]):  # never disturb the caller's RNG stream
        for name in names:
            torch.manual_seed(seed * 1000 + _SEED_OFFSETS[name])
            model = builders[name.partition(".")[0]]()
            out[name] = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return out


def _repo_key_format(name: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Current library key names -> the names the real SD 1.5 repo files use (loaders convert them back)."""
    if name == "vae":
        old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
        renamed = {}
        for key, value in sd.items():
            if ".mid_block.attentions." in key:
                for new, legacy in old.items():
                    key = key.replace(new, legacy)
            renamed[key] = value
        return renamed
    if name == "text_encoder":  # transformers >= 5.6 drops the `text_model.` level; the repo file has it
        renamed = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}
        renamed["text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
        return renamed
    if (
        name == "safety_checker"
    ):  # the same flattening for its CLIPVisionModel: the file has vision_model twice

        def nest(key: str) -> str:
            flat = key.startswith("vision_model.") and not key.startswith("vision_model.vision_model.")
            return f"vision_model.{key}" if flat else key

        return {nest(k): v for k, v in sd.items()}
    return sd


def _save(sd: dict[str, torch.Tensor], path: Path, *, pickle: bool, half: bool) -> None:
    if half:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if pickle:
        torch.save(sd, path)
    else:
        save_file(sd, str(path), metadata={"format": "pt"})


def _variant(file_name: str, variant: str) -> str:
    stem, ext = file_name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


# ---------------------------------------------------------------------------------------------- layouts
def build_sd15_folder(
    root: str | Path,
    *,
    seed: int = 0,
    shape: Sd15Shape = Sd15Shape(),
    fp16: bool = True,
    non_ema: bool = True,
    pickles: bool = False,
    single_file: bool = True,
) -> Path:
    """Write the SD 1.5-shaped repo into `root` (created); returns `root`.

    `fp16`: `*.fp16.safetensors` beside each network's weights; `non_ema`: `unet/*.non_ema.safetensors` (a
    different random draw, so a test can tell it from the EMA weights); `pickles`: the `.bin` duplicates of every
    weight file and `v1-5-pruned-emaonly.ckpt` (the real repo has them; they double the size); `single_file`: the root
    LDM checkpoint + `v1-inference.yaml`.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    configs = sd15_configs(shape)
    for rel, cfg in configs.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(cfg, indent=2, sort_keys=rel != "model_index.json") + "\n")
    _write_tokenizer(root / "tokenizer", shape.vocab_merges)
    names = ["unet", "vae", "text_encoder", "safety_checker"] + (["unet.non_ema"] if non_ema else [])
    for name, sd in _random_state_dicts(configs, seed, names).items():
        component, _, variant = name.partition(".")
        sd = _repo_key_format(component, sd)
        kinds = [(variant, False)] if variant else [("", False)] + ([("fp16", True)] if fp16 else [])
        for var, half in kinds:
            for pickle in (False, True) if pickles else (False,):
                base = _WEIGHTS[component][int(pickle)]
                _save(sd, root / component / (_variant(base, var) if var else base), pickle=pickle, half=half)
    (root / ".gitattributes").write_text(
        "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)
    )
    (root / "README.md").write_text(
        f"# {REPO_ID} (random-weight test fixture)\n\nSame layout as the real repo, reduced width, random weights.\n"
    )
    if single_file:
        write_single_file(root, root / SINGLE_FILE)
        write_original_config(root, root / ORIGINAL_CONFIG)
        if pickles:
            torch.save(
                {"state_dict": load_file(str(root / SINGLE_FILE))},
                root / SINGLE_FILE.replace(".safetensors", ".ckpt"),
            )
    return root


def _write_tokenizer(folder: Path, n_merges: int) -> None:
    """vocab.json + merges.txt: the byte tokens, the first `n_merges` CLIP merges, the two specials (CLIP's ids)."""
    full = json.loads((TINY_CLIP_DIR / "vocab.json").read_text())
    lines = (TINY_CLIP_DIR / "merges.txt").read_text().split("\n")
    if n_merges > len(lines) - 1:
        raise ValueError(f"vocab_merges={n_merges}: the bundled tiny CLIP BPE has {len(lines) - 1} merges")
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tokens = sorted(full, key=full.__getitem__)[: _N_BYTE_TOKENS + n_merges] + specials
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("\n".join(lines[: 1 + n_merges]) + "\n")


def write_single_file(folder: str | Path, path: str | Path) -> Path:
    """The folder's UNet + VAE + text encoder as one original-format (LDM) checkpoint, fp32, like the real file."""
    folder, path = Path(folder), Path(path)

    def read(component: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        sd = load_file(str(folder / component / _WEIGHTS[component][0]))
        cfg_file = folder / component / "config.json"
        return sd, json.loads(cfg_file.read_text())

    (unet, unet_cfg), (vae, vae_cfg), (text, _) = read("unet"), read("vae"), read("text_encoder")
    state = diffusers_to_ldm(unet, unet_cfg, vae, vae_cfg, text)
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    state.update(ddpm_buffers(sched["num_train_timesteps"], sched["beta_start"], sched["beta_end"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path


def write_original_config(folder: str | Path, path: str | Path) -> Path:
    """`v1-inference.yaml` for the folder's widths (the original LDM config `original_config=` reads)."""
    folder, path = Path(folder), Path(path)
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    path.write_text(inference_yaml(unet_cfg, vae_cfg, vae_cfg.get("scaling_factor", 0.18215)))
    return path


def install_in_hub_cache(
    folder: str | Path, hf_home: str | Path, repo_id: str = REPO_ID, **kwargs: Any
) -> Path:
    """The fixture as the hub cache entry of `repo_id` under `hf_home`; see `hub_cache.install_in_hub_cache`."""
    return hub_cache.install_in_hub_cache(folder, hf_home, repo_id, **kwargs)
