"""Today's teacher repos (tests/support/teacher_repos.py): each folder has the real repo's files, diffusers loads it
by hub id from the offline cache and samples, and the root single-file checkpoints load through diffusers'
single-file loaders (the folder as config) into exactly the folder's tensors."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.support import t5_tokenizer
from tests.support import teacher_repos as tr
from tests.support.hub_cache import repo_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALL = list(tr.REPOS)
CLIP_TOKENIZER = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
T5_TOKENIZER = ["special_tokens_map.json", "spiece.model", "tokenizer.json", "tokenizer_config.json"]


def _in(folder: str, names: list[str]) -> list[str]:
    return [f"{folder}/{n}" for n in names]


def _weights(folder: str, name: str, *, fp16: bool = False) -> list[str]:
    stem = name.removesuffix(".safetensors")
    return [f"{folder}/config.json", f"{folder}/{name}"] + (
        [f"{folder}/{stem}.fp16.safetensors"] if fp16 else []
    )


def _shards(folder: str, stem: str, n: int, *, fp16: bool = False) -> list[str]:
    names = [f"{folder}/{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    if fp16:  # transformers' names for a sharded variant
        names += [f"{folder}/{stem}.fp16-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        names.append(f"{folder}/{stem}.safetensors.index.fp16.json")
    return [f"{folder}/config.json", f"{folder}/{stem}.safetensors.index.json", *names]


_COMMON = [".gitattributes", "README.md", "model_index.json", "scheduler/scheduler_config.json"]
_FLUX = [
    *_COMMON,
    "ae.safetensors",
    *_weights("text_encoder", "model.safetensors"),
    *_shards("text_encoder_2", "model", 2),
    *_in("tokenizer", CLIP_TOKENIZER),
    *_in("tokenizer_2", T5_TOKENIZER),
    *_shards("transformer", "diffusion_pytorch_model", 3),
    *_weights("vae", "diffusion_pytorch_model.safetensors"),
]
# The files of the real repos that the fixtures reproduce (the docstring of teacher_repos.py lists what they omit).
EXPECTED_FILES = {
    tr.SDXL: [
        *_COMMON,
        "LICENSE.md",
        "sd_xl_base_1.0.safetensors",
        "sd_xl_base_1.0_0.9vae.safetensors",
        *_weights("text_encoder", "model.safetensors", fp16=True),
        *_weights("text_encoder_2", "model.safetensors", fp16=True),
        *_in("tokenizer", CLIP_TOKENIZER),
        *_in("tokenizer_2", CLIP_TOKENIZER),
        *_weights("unet", "diffusion_pytorch_model.safetensors", fp16=True),
        *_weights("vae", "diffusion_pytorch_model.safetensors", fp16=True),
        *_weights("vae_1_0", "diffusion_pytorch_model.safetensors", fp16=True),
    ],
    tr.SD35_MEDIUM: [
        *_COMMON,
        "LICENSE.md",
        "sd3.5_medium.safetensors",
        *_weights("text_encoder", "model.safetensors", fp16=True),
        *_weights("text_encoder_2", "model.safetensors", fp16=True),
        *_shards("text_encoder_3", "model", 2, fp16=True),
        *_in("text_encoders", ["clip_g.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors"]),
        "text_encoders/t5xxl_fp8_e4m3fn.safetensors",
        *_in("tokenizer", CLIP_TOKENIZER),
        *_in("tokenizer_2", CLIP_TOKENIZER),
        *_in("tokenizer_3", T5_TOKENIZER),
        *_weights("transformer", "diffusion_pytorch_model.safetensors"),
        *_weights("vae", "diffusion_pytorch_model.safetensors"),
    ],
    tr.FLUX_DEV: [*_FLUX, "LICENSE.md", "flux1-dev.safetensors"],
    tr.FLUX_SCHNELL: [*_FLUX, "flux1-schnell.safetensors"],
    tr.SD21: [
        *_COMMON,
        "v2-1_768-ema-pruned.safetensors",
        "feature_extractor/preprocessor_config.json",
        *_weights("text_encoder", "model.safetensors", fp16=True),
        *_in("tokenizer", CLIP_TOKENIZER),
        *_weights("unet", "diffusion_pytorch_model.safetensors", fp16=True),
        *_weights("vae", "diffusion_pytorch_model.safetensors", fp16=True),
    ],
}
# latents of a 2-step run at the smallest valid size (FLUX: packed 2x2 patches of 16 channels)
LATENT_SHAPES = {
    tr.SDXL: (1, 4, 4, 4),
    tr.SD35_MEDIUM: (1, 16, 4, 4),
    tr.FLUX_DEV: (1, 4, 64),
    tr.FLUX_SCHNELL: (1, 4, 64),
    tr.SD21: (1, 4, 8, 8),
}


def _json(folder: Path, rel: str) -> dict:
    return json.loads((folder / rel).read_text())


def _dtypes(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


def _same(a: torch.nn.Module, b: torch.nn.Module, cast: torch.dtype | None = None) -> None:
    """Every tensor of `a` equals `b`'s (compared in `cast`, the storage dtype both were written from)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    dtype = cast or torch.float32
    bad = [k for k in sa if not torch.equal(sa[k].to(dtype), sb[k].to(dtype))]
    assert not bad, f"{len(bad)} of {len(sa)} tensors differ, e.g. {bad[:3]}"


# ------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("repo_id", ALL)
def test_files_are_the_real_repos(repo_id: str, teacher_repo: Callable[[str], Path]) -> None:
    folder = teacher_repo(repo_id)
    assert repo_files(folder) == sorted(EXPECTED_FILES[repo_id])

    index = _json(folder, "model_index.json")
    assert index["_class_name"] == tr.FACTS[repo_id].pipeline_class
    for component, spec in index.items():
        if not isinstance(spec, list) or spec[0] is None:
            continue
        library, class_name = spec
        assert hasattr(importlib.import_module(library), class_name), f"{component}: {spec}"
        for cfg_file in (folder / component / "config.json", folder / component / "scheduler_config.json"):
            if cfg_file.exists():
                cfg = json.loads(cfg_file.read_text())
                assert cfg.get("_class_name", class_name) == class_name
                assert class_name in cfg.get("architectures", [class_name])

    for index_file in folder.glob("*/*.index*.json"):  # shards: the index names every tensor of every shard
        weight_map = json.loads(index_file.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        assert len(shards) > 1
        keys: list[str] = []
        for shard in shards:
            with safe_open(str(index_file.parent / shard), "pt") as f:
                keys += list(f.keys())
        assert sorted(keys) == sorted(weight_map)
        assert not (index_file.parent / index_file.name.split(".index")[0]).exists()  # no unsharded copy

    for variant in folder.glob("*/*.fp16*.safetensors"):  # variants: the same tensors, stored as fp16
        full = variant.with_name(variant.name.replace(".fp16", ""))
        with safe_open(str(variant), "pt") as fv, safe_open(str(full), "pt") as ff:
            assert sorted(fv.keys()) == sorted(ff.keys())
        assert _dtypes(variant) <= {"F16", "I64"}
        assert ("F32" in _dtypes(full)) is (repo_id in (tr.SDXL, tr.SD21))  # SD 3.5's main files are fp16 too


def test_structural_features_in_configs(teacher_repo: Callable[[str], Path]) -> None:
    sdxl, sd35 = teacher_repo(tr.SDXL), teacher_repo(tr.SD35_MEDIUM)
    dev, schnell, sd21 = teacher_repo(tr.FLUX_DEV), teacher_repo(tr.FLUX_SCHNELL), teacher_repo(tr.SD21)

    unet = _json(sdxl, "unet/config.json")
    te, te2 = _json(sdxl, "text_encoder/config.json"), _json(sdxl, "text_encoder_2/config.json")
    assert unet["addition_embed_type"] == "text_time"
    assert unet["cross_attention_dim"] == te["hidden_size"] + te2["hidden_size"]
    assert (
        unet["projection_class_embeddings_input_dim"]
        == te2["projection_dim"] + 6 * unet["addition_time_embed_dim"]
    )
    assert _json(sdxl, "model_index.json")["force_zeros_for_empty_prompt"] is True
    vae = _json(sdxl, "vae/config.json")
    assert vae["scaling_factor"] == 0.13025 and vae["force_upcast"] is True
    assert _json(sdxl, "scheduler/scheduler_config.json")["_class_name"] == "EulerDiscreteScheduler"
    assert _json(sdxl, "tokenizer_2/special_tokens_map.json")["pad_token"] == "!"

    mmdit = _json(sd35, "transformer/config.json")
    assert mmdit["dual_attention_layers"] and mmdit["qk_norm"] == "rms_norm" and mmdit["patch_size"] == 2
    clips = [_json(sd35, f"text_encoder{s}/config.json")["projection_dim"] for s in ("", "_2")]
    t5_width = _json(sd35, "text_encoder_3/config.json")["d_model"]
    assert mmdit["pooled_projection_dim"] == sum(clips) < t5_width == mmdit["joint_attention_dim"]
    vae = _json(sd35, "vae/config.json")
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 1.5305, 0.0609)
    assert _json(sd35, "scheduler/scheduler_config.json")["shift"] == 3.0

    for folder, dev_repo in ((dev, True), (schnell, False)):
        assert _json(folder, "transformer/config.json")["guidance_embeds"] is dev_repo
        sched = _json(folder, "scheduler/scheduler_config.json")
        assert sched["use_dynamic_shifting"] is dev_repo and sched["shift"] == (3.0 if dev_repo else 1.0)
        assert (sched["base_shift"], sched["max_shift"]) == (0.5, 1.15)
        assert (sched["base_image_seq_len"], sched["max_image_seq_len"]) == (256, 4096)
        vae = _json(folder, "vae/config.json")
        assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 0.3611, 0.1159)
        assert _dtypes(folder / "transformer/diffusion_pytorch_model-00001-of-00003.safetensors") == {"BF16"}
        assert _dtypes(folder / "ae.safetensors") == {"F32"}

    unet, te = _json(sd21, "unet/config.json"), _json(sd21, "text_encoder/config.json")
    assert _json(sd21, "scheduler/scheduler_config.json")["prediction_type"] == "v_prediction"
    assert unet["use_linear_projection"] is True and isinstance(unet["attention_head_dim"], list)
    assert unet["cross_attention_dim"] == te["hidden_size"]
    assert (te["hidden_act"], te["num_hidden_layers"]) == ("gelu", 23)  # OpenCLIP-H has 24
    with safe_open(str(sd21 / tr.SD21_SINGLE_FILE), "pt") as f:
        blocks = {
            k.split(".")[4] for k in f.keys() if k.startswith("cond_stage_model.model.transformer.resblocks.")
        }
    assert len(blocks) == 24


def test_t5_tokenizer_folders(teacher_repo: Callable[[str], Path]) -> None:
    from transformers import T5TokenizerFast

    texts = ["a photo of a cat", "An astronaut riding a horse, 4k!", "  spaced   out  "]
    for folder in (
        teacher_repo(tr.FLUX_SCHNELL) / "tokenizer_2",
        teacher_repo(tr.SD35_MEDIUM) / "tokenizer_3",
    ):
        tok = T5TokenizerFast.from_pretrained(folder)
        assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
        assert len(tok) == t5_tokenizer.vocab_size() <= t5_tokenizer.padded_vocab_size()
        assert tok.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [len(tok) - 1, len(tok) - 100]
        ids = tok("a photo of a cat").input_ids
        assert ids[-1] == 1 and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"
        assert t5_tokenizer.spiece_model_matches(folder, texts)


# ------------------------------------------------------------------------------------------ hub id, offline
@pytest.mark.parametrize("repo_id", ALL)
def test_loads_by_hub_id_offline_and_samples(repo_id: str, teacher_hub: Path) -> None:
    from diffusers import DiffusionPipeline

    # dtype: the configs name fp16 / bf16 for the text encoders (as the real ones), which transformers 5 honours
    pipe = DiffusionPipeline.from_pretrained(repo_id, dtype=torch.float32)
    assert type(pipe).__name__ == tr.FACTS[repo_id].pipeline_class
    px = tr.FACTS[repo_id].smallest_px
    kwargs = {tr.FLUX_DEV: {"guidance_scale": 3.5}, tr.FLUX_SCHNELL: {"guidance_scale": 0.0}}.get(repo_id, {})
    out = pipe(
        "a photo of a cat",
        height=px,
        width=px,
        num_inference_steps=2,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    assert tuple(out.images.shape) == LATENT_SHAPES[repo_id]
    assert torch.isfinite(out.images).all() and out.images.std() > 0


# ------------------------------------------------------------------------------------------ root single files
def test_sdxl_single_files(sdxl_folder: Path, teacher_hub: Path) -> None:
    """Both SGM checkpoints load as pipelines; the networks equal the folder's fp16 variant (the root files are
    fp16), and each carries its own VAE: `sd_xl_base_1.0` the 1.0 VAE (vae_1_0/), `_0.9vae` the folder's vae/."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, variant="fp16", dtype=torch.float32)
    for name, vae_folder in ((tr.SDXL_SINGLE_FILE_09VAE, "vae"), (tr.SDXL_SINGLE_FILE, "vae_1_0")):
        pipe = StableDiffusionXLPipeline.from_single_file(
            str(sdxl_folder / name), config=str(sdxl_folder), local_files_only=True
        )
        for component in ("unet", "text_encoder", "text_encoder_2"):
            _same(getattr(pipe, component), getattr(ref, component))
        vae = AutoencoderKL.from_pretrained(sdxl_folder, subfolder=vae_folder, variant="fp16")
        _same(pipe.vae, vae)


def test_sd35_single_file_and_text_encoders(sd35_medium_folder: Path, teacher_hub: Path) -> None:
    """`sd3.5_medium.safetensors` holds the MMDiT + VAE only (as the real 5.1 GB file), so diffusers needs the text
    encoders passed in; `text_encoders/` holds the same three encoders (T5 also as fp8)."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    folder = sd35_medium_folder
    ref = StableDiffusion3Pipeline.from_pretrained(folder, dtype=torch.float32)
    pipe = StableDiffusion3Pipeline.from_single_file(
        str(folder / tr.SD35_SINGLE_FILE),
        config=str(folder),
        local_files_only=True,
        text_encoder=ref.text_encoder,
        text_encoder_2=ref.text_encoder_2,
        text_encoder_3=ref.text_encoder_3,
    )
    _same(pipe.transformer, ref.transformer)
    _same(pipe.vae, ref.vae)
    for name, (component, dtype) in tr.SD35_TEXT_ENCODER_FILES.items():
        single = load_file(str(folder / "text_encoders" / name))
        stored = tr.load_weights(folder / component, tr.TRANSFORMERS_WEIGHTS)
        if name == "clip_l.safetensors":  # CLIP-L without its projection, as the real 246 MB file
            stored.pop("text_projection.weight")
        if name.startswith("t5xxl"):  # the tied embedding twice, as the real 9.79 GB file
            stored["encoder.embed_tokens.weight"] = stored["shared.weight"]
        assert sorted(single) == sorted(stored)
        assert all(single[k].dtype == dtype and torch.equal(single[k], stored[k].to(dtype)) for k in single)


@pytest.mark.parametrize("repo_id", [tr.FLUX_DEV, tr.FLUX_SCHNELL])
def test_flux_single_files(repo_id: str, teacher_repo: Callable[[str], Path], teacher_hub: Path) -> None:
    """`flux1-*.safetensors` (BFL keys, transformer only) and `ae.safetensors` load through the model-level
    single-file loaders (the real files hold no text encoders, so the pipeline loader would need them passed).
    `ae.safetensors` is fp32 and the folder's VAE its bf16 copy, as in the real repo."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    folder = teacher_repo(repo_id)
    name = tr.FLUX_DEV_SINGLE_FILE if repo_id == tr.FLUX_DEV else tr.FLUX_SCHNELL_SINGLE_FILE
    ref = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    width = ref.config.num_attention_heads * ref.config.attention_head_dim
    with tr.flux_single_file_width(width):  # diffusers 0.42.1 hardcodes FLUX.1's 3072 (see its docstring)
        model = FluxTransformer2DModel.from_single_file(
            str(folder / name), config=str(folder), subfolder="transformer", local_files_only=True
        )
    _same(model, ref)
    assert model.config.guidance_embeds is (repo_id == tr.FLUX_DEV)
    ae = AutoencoderKL.from_single_file(
        str(folder / tr.FLUX_AE), config=str(folder), subfolder="vae", local_files_only=True
    )
    _same(ae, AutoencoderKL.from_pretrained(folder, subfolder="vae"), cast=torch.bfloat16)


def test_sd21_single_file(sd21_folder: Path, teacher_hub: Path) -> None:
    """The LDM checkpoint (OpenCLIP text keys, 24 resblocks, fp32) loads as a pipeline equal to the folder: diffusers
    drops resblock 23 and `text_projection`; the scheduler and feature extractor come from the folder."""
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(sd21_folder, dtype=torch.float32)
    pipe = StableDiffusionPipeline.from_single_file(
        str(sd21_folder / tr.SD21_SINGLE_FILE), config=str(sd21_folder), local_files_only=True
    )
    for component in ("unet", "vae", "text_encoder"):
        _same(getattr(pipe, component), getattr(ref, component))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.text_encoder.config.num_hidden_layers == 23
