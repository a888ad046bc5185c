"""Using a FLUX.1 model (tests/support/teacher_repos.py) as users do: `instaflow sample` and `interpolate` from a
folder, a LoRA in diffusers' FLUX format fused into the transformer, a weight delta between two FLUX folders whose
transformers are sharded (as the real repos), and the demo's teacher (embedded guidance) and flow models."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from instaflow_core.errors import ConfigError
from instaflow_core.inference.generate import apply_options, flow_images, teacher_images
from instaflow_core.models.loading import load_source

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAT = "a photo of a cat"


def _cli(*args: str) -> None:
    from flows.cli.main import app

    rc = app(list(args), standalone_mode=False)
    assert rc in (None, 0), rc


def _weights(model) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {k: v.clone() for k, v in model.denoiser.state_dict().items()}


def test_sample_and_interpolate_from_a_flux_folder(flux_dev_folder: Path, tmp_path: Path) -> None:
    import PIL.Image

    sets = [
        "--preset",
        "flux-dev",
        "--set",
        "models.dtype=float32",
        "--set",
        f"storage.root={tmp_path / 's'}",
    ]
    _cli(
        "sample", CAT, "--model", str(flux_dev_folder), "--out", str(tmp_path / "one"), "--steps", "2", *sets
    )
    (png,) = (tmp_path / "one").glob("*.png")
    with PIL.Image.open(png) as im:
        assert im.size == (64, 64)  # native: the VAE's 64 px
        expected = flow_images(load_source(flux_dev_folder), [CAT], [0], steps=2)[0]
        assert np.abs(np.asarray(im.convert("RGB")).astype(int) - expected.astype(int)).max() <= 1
    _cli("sample", CAT, "--model", str(flux_dev_folder), "--steps", "1", "--guidance", "5", "--out",
         str(tmp_path / "g5.png"), *sets)  # fmt: skip
    with PIL.Image.open(tmp_path / "g5.png") as im:  # guidance 5 is the embedded value: another image
        assert np.abs(np.asarray(im.convert("RGB")).astype(int) - expected.astype(int)).max() > 0
    _cli(
        "interpolate", CAT, "a red car", "--model", str(flux_dev_folder), "--frames", "3", "--out",
        str(tmp_path / "m.gif"), *sets,
    )  # fmt: skip
    assert (tmp_path / "m.gif").stat().st_size > 0


def test_a_flux_lora_is_fused_into_the_transformer(flux_dev_folder: Path, tmp_path: Path) -> None:
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    model = load_source(flux_dev_folder)
    trained = load_source(flux_dev_folder).denoiser
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=list(model.family.lora_targets), init_lora_weights=False
    )
    trained.add_adapter(config)
    FluxPipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(trained)
    )
    before = _weights(model)
    apply_options(model, lora=tmp_path / "lora", lora_scale=0.5)
    after = model.denoiser.state_dict()
    assert set(after) == set(before)  # fused: no LoRA layers left
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".add_q_proj." in k for k in changed) and any(".to_q." in k for k in changed)
    assert any(k.startswith("single_transformer_blocks.") for k in changed)
    assert all(k.endswith(".weight") and ".attn." in k for k in changed)


def test_a_weight_delta_between_sharded_flux_folders(flux_schnell_folder: Path, tmp_path: Path) -> None:
    """The repos' transformer/ is sharded (an index and 3 files, as the real 23.8 GB one): the delta reads every
    shard of both."""
    assert (flux_schnell_folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    finetuned = tmp_path / "finetuned"
    shutil.copytree(flux_schnell_folder, finetuned)
    tuned = load_source(finetuned).denoiser
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.1)
    shutil.rmtree(finetuned / "transformer")
    tuned.save_pretrained(finetuned / "transformer", max_shard_size=200_000)  # sharded as well
    assert len(list((finetuned / "transformer").glob("*.safetensors"))) > 1
    model = load_source(flux_schnell_folder)
    before, target = _weights(model), tuned.state_dict()
    apply_options(model, delta=(flux_schnell_folder, finetuned), alpha=0.5)
    for k, v in model.denoiser.state_dict().items():
        assert torch.allclose(v, before[k] + 0.5 * (target[k] - before[k]), atol=1e-5), k


def test_the_demo_serves_the_flux_teacher_and_its_flow(
    flux_dev_folder: Path, flux_schnell_folder: Path, tmp_path: Path
) -> None:
    from flows.cli.demo import flow_model, teacher_model
    from instaflow_core.config import load
    from tasks.tracking.resolve import ResolvedModel

    cfg = load(
        "flux-dev", [f"storage.root={tmp_path}", f"models.teacher={flux_dev_folder}", "models.dtype=float32"]
    )
    teacher = teacher_model(cfg)
    assert (teacher.steps, teacher.guidance) == (50, 3.5)  # the preset's: the model card's sampler
    images = teacher.generate([CAT], [0], 2, 3.5)
    model = load_source(flux_dev_folder)
    assert np.array_equal(images, teacher_images(model, [CAT], [0], 2, 3.5, "flow-euler"))
    flow = flow_model(ResolvedModel(label="flux", folder=flux_dev_folder, kind="2rf"), "float32")
    assert np.array_equal(flow.generate([CAT], [0], 1, 1.0), flow_images(model, [CAT], [0], steps=1))
    # schnell's teacher in the demo at a guidance above 1: one line, as the preflight says
    cfg = load("flux-schnell", [f"storage.root={tmp_path}", f"models.teacher={flux_schnell_folder}"])
    with pytest.raises(ConfigError, match="no guidance embedding"):
        teacher_model(cfg).generate([CAT], [0], 1, 2.0)
