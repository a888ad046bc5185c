"""The SD 1.5 layout (tests/support/sd15.py: the real repo's files, configs and key formats at reduced width):
loading as a folder, a hub id and a single file, what saved model folders hold, generation at a set
resolution, and the preflight's teacher checks on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from instaflow_core.config import ModelsConfig, StorageConfig
from instaflow_core.errors import DataError
from instaflow_core.models.family import get_family, read_index
from instaflow_core.models.folder_layout import weights_bytes
from instaflow_core.models.loading import load_source
from instaflow_core.models.sources import VARIANT_IGNORE, hub_patterns, hub_snapshot, pipeline_components
from instaflow_core.preflight import checks
from tests.support import sd15

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# exactly what a one-step pipeline needs (and what a saved 2-RF / InstaFlow folder holds)
SAVED_FILES = sorted(
    [
        "model_index.json",
        "instaflow.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "scheduler/scheduler_config.json",
    ]
)


def _patterns(folder: Path, configs_only: bool = False) -> list[str]:
    """What `hub_snapshot` fetches of the repo: the components its model_index.json names."""
    components = pipeline_components(read_index(folder))
    assert components == ["scheduler", "text_encoder", "tokenizer", "unet", "vae"]  # no safety checker
    return hub_patterns(components, configs_only=configs_only)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(v, sb[k]) for k, v in sa.items())


def test_folder_hub_id_and_single_file_load_the_same_sd15_networks(sd15_folder: Path, sd15_hub: str) -> None:
    folder = load_source(sd15_folder)
    assert folder.family is get_family("sd")
    assert folder.denoiser.config.block_out_channels == [32, 64, 64, 64]
    assert folder.denoiser.config.cross_attention_dim == 768
    assert folder.family.vae_factors(folder.vae) == (0.18215, 0.0)
    hub = load_source(sd15_hub)
    single = load_source(sd15_folder / sd15.SINGLE_FILE)  # config inferred: the SD 1.5 repo, from the cache
    assert hub.family is single.family is folder.family
    for part in ("unet", "vae", "text_encoder"):
        assert _same_weights(folder[part], hub[part]), part
        assert _same_weights(folder[part], single[part]), part


def test_hub_patterns_skip_variants_root_checkpoints_and_the_safety_checker(sd15_folder: Path) -> None:
    from huggingface_hub.utils import filter_repo_objects

    files = sd15.repo_files(sd15_folder)
    picked = list(
        filter_repo_objects(files, allow_patterns=_patterns(sd15_folder), ignore_patterns=VARIANT_IGNORE)
    )
    assert len(picked) == 12 and [p for p in picked if "/" not in p] == ["model_index.json"]
    assert not [p for p in picked if ".fp16." in p or "non_ema" in p or p.startswith(("safety", "feature"))]


def test_single_file_loads_from_a_cache_the_component_patterns_filled(
    sd15_folder: Path, sd15_single_file: Path, tmp_path: Path
) -> None:
    """A cache filled as `huggingface-cli download --include <the component patterns>` (no safety checker, no
    feature extractor, its tree listing recorded) must serve a single file's configs: the config lookup asks
    for the five components only, and the loader does not want a feature extractor."""
    hf_home = tmp_path / "hf"
    sd15.install_in_hub_cache(
        sd15_folder, hf_home, allow_patterns=_patterns(sd15_folder), ignore_patterns=VARIANT_IGNORE
    )
    reference = load_source(sd15_folder)
    with sd15.offline_hub(hf_home):
        assert checks.single_file_problems(sd15_single_file, ModelsConfig())[0] == []
        single = load_source(sd15_single_file)
        snapshot = hub_snapshot(sd15.REPO_ID)  # a config folder without feature_extractor/
        assert not (snapshot / "feature_extractor").exists()
        explicit = load_source(sd15_single_file, config=str(snapshot))
    assert _same_weights(single.denoiser, reference.denoiser) and _same_weights(explicit.vae, reference.vae)


@pytest.mark.parametrize("base", ["folder", "hub snapshot"])
def test_saved_stage_folder_holds_what_a_one_step_pipeline_needs(
    base: str, sd15_folder: Path, sd15_hub: str, tmp_path: Path
) -> None:
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    from instaflow_core.inference.pipeline import InstaFlowPipeline

    source = sd15_folder if base == "folder" else hub_snapshot(sd15_hub)  # snapshot files are symlinks
    comps = load_source(source)
    out = comps.family.save_student(source, comps.denoiser, tmp_path / "2rf", {"kind": "2rf"}, sample_size=32)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == SAVED_FILES
    assert not [p for p in out.rglob("*") if p.is_symlink()]
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert weights_bytes(out) <= total <= 1.05 * weights_bytes(out), (total, weights_bytes(out))
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    assert index["safety_checker"] == index["feature_extractor"] == [None, None]
    assert json.loads((out / "unet" / "config.json").read_text())["sample_size"] == 32  # trained at 256 px
    ours = InstaFlowPipeline.from_pretrained(out)
    theirs = DiffusionPipeline.from_pretrained(out)
    assert isinstance(theirs, StableDiffusionPipeline) and theirs.safety_checker is None
    assert _same_weights(ours.unet, comps.denoiser) and _same_weights(theirs.vae, comps.vae)
    assert load_source(out).family is comps.family  # the project's loader reads it back as an SD model
    ours.set_progress_bar_config(disable=True)
    image = ours("a photo of a cat", output_type="np").images
    assert image.shape == (1, 256, 256, 3)  # the recorded sample size is the default resolution


def test_saved_stage_folder_with_variants(sd15_folder: Path, tmp_path: Path) -> None:
    comps = load_source(sd15_folder)
    out = comps.family.save_student(sd15_folder, comps.denoiser, tmp_path / "m", variants=True)
    fp16 = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.fp16.safetensors"))
    assert fp16 == [
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    half = load_source(out, dtype="float16")
    assert half.denoiser.dtype == torch.float16
    assert not list(out.rglob("*non_ema*")) and not (out / sd15.SINGLE_FILE).exists()


def test_generation_and_sampling_at_a_set_resolution(sd15_folder: Path) -> None:
    """64 px on SD 1.5's geometry = 8x8 latents (the CI size); 96 px is not a multiple of 64: refused."""
    from instaflow_core.errors import ConfigError
    from instaflow_core.evaluation.sampling import Sampler, SamplerSpec
    from instaflow_core.generation.solvers import teacher_latents

    comps = load_source(sd15_folder)
    assert comps.latent_shape() == (4, 64, 64) and comps.latent_shape(64) == (4, 8, 8)
    x1 = teacher_latents(comps, ["a cat", "a dog"], [1, 2], steps=2, guidance=5.0, resolution=64)
    assert x1.shape == (2, 4, 8, 8) and torch.isfinite(x1).all()
    images = Sampler(comps, SamplerSpec("rf", "2rf", "euler", 1, 1.0), resolution=64)(["a cat"], [1])
    assert images.shape == (1, 64, 64, 3)
    with pytest.raises(ConfigError, match="multiple of 64 px"):
        teacher_latents(comps, ["a cat"], [1], steps=1, resolution=96)


def test_single_file_teacher_becomes_a_folder_in_the_store(
    sd15_folder: Path, sd15_single_file: Path, sd15_hub: str, tmp_path: Path
) -> None:
    from instaflow_core.models.loading import load_model
    from tasks.teacher import teacher_model

    storage = StorageConfig(root=f"file://{tmp_path}/store")
    models = ModelsConfig(teacher=str(sd15_single_file))
    ref = teacher_model.fn(models, storage)
    folder = Path(ref.uri.removeprefix("file://"))
    assert ref.uri.startswith(storage.root) and (folder / "unet" / "config.json").is_file()
    assert ref.source == str(sd15_single_file)
    meta = json.loads((folder / "instaflow.json").read_text())
    assert meta["source"] == str(sd15_single_file.resolve()) and meta["kind"] == "teacher"
    assert _same_weights(load_model(ref, storage, models).denoiser, load_source(sd15_folder).denoiser)
    mtime = (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert teacher_model.fn(models, storage) == ref  # converted once
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == mtime


def test_preflight_teacher_checks_on_the_sd15_layout(
    sd15_folder: Path, sd15_hub: str, tmp_path: Path
) -> None:
    storage = StorageConfig(root=str(tmp_path / "store"))
    for teacher in (sd15_hub, str(sd15_folder), str(sd15_folder / sd15.SINGLE_FILE)):
        problems, geometry = checks.teacher_problems(ModelsConfig(teacher=teacher), storage)
        assert problems == [] and geometry.native_resolution == 512 and geometry.vae_factor == 8, teacher
    # configs in the cache but not the weights (an interrupted download, with its tree listing): named
    hf_home = tmp_path / "hf"
    sd15.install_in_hub_cache(sd15_folder, hf_home, allow_patterns=_patterns(sd15_folder, configs_only=True))
    with sd15.offline_hub(hf_home):
        (problem,), _ = checks.teacher_problems(ModelsConfig(teacher=sd15.REPO_ID), storage)
        assert "not in the local Hugging Face cache" in problem
        with pytest.raises(DataError, match="not in the local Hugging Face cache"):
            load_source(sd15.REPO_ID)
