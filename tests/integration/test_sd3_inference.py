"""Using an SD 3.5 model (tests/support/teacher_repos.py) as users do: `instaflow sample` and `interpolate` from a folder, a
LoRA in diffusers' SD3 format fused into the transformer, a weight delta between two SD3 folders, the demo's
teacher and flow models, and the ONNX export's one-line refusal (three text encoders and pooled embeddings need
graphs the exporter does not write)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from instaflow_core.errors import DataError
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


def test_sample_and_interpolate_from_an_sd3_folder(sd3_repo: Path, tmp_path: Path) -> None:
    import PIL.Image

    sets = [
        "--preset",
        "sd35",
        "--set",
        "models.dtype=float32",
        "--set",
        f"storage.root={tmp_path / 'store'}",
    ]
    _cli("sample", CAT, "--model", str(sd3_repo), "--num", "2", "--out", str(tmp_path / "grid.png"), *sets)
    with PIL.Image.open(tmp_path / "grid.png") as im:
        assert im.size[1] >= 64  # native 64 px images
    _cli("sample", CAT, "--model", str(sd3_repo), "--out", str(tmp_path / "one"), "--steps", "2", *sets)
    (png,) = (tmp_path / "one").glob("*.png")
    with PIL.Image.open(png) as im:
        expected = flow_images(load_source(sd3_repo), [CAT], [0], steps=2)[0]
        assert np.abs(np.asarray(im.convert("RGB")).astype(int) - expected.astype(int)).max() <= 1
    _cli(
        "interpolate", CAT, "a red car", "--model", str(sd3_repo), "--frames", "3", "--out", str(tmp_path / "m.gif"),
        *sets,
    )  # fmt: skip
    assert (tmp_path / "m.gif").stat().st_size > 0


def test_an_sd3_lora_is_fused_into_the_transformer(sd3_repo: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model_state_dict

    model = load_source(sd3_repo)
    trained = load_source(sd3_repo).denoiser
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=list(model.family.lora_targets), init_lora_weights=False
    )
    trained.add_adapter(config)
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(trained)
    )
    before = _weights(model)
    apply_options(model, lora=tmp_path / "lora", lora_scale=0.5)
    after = model.denoiser.state_dict()
    assert set(after) == set(before)  # fused: no LoRA layers left
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".add_q_proj." in k for k in changed) and any(".to_q." in k for k in changed)
    assert all(k.endswith(".weight") and ".attn" in k for k in changed)


def test_a_weight_delta_between_sd3_folders(sd3_repo: Path, tmp_path: Path) -> None:
    finetuned = tmp_path / "finetuned"
    shutil.copytree(sd3_repo, finetuned)
    tuned = load_source(finetuned).denoiser
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.1)
    tuned.save_pretrained(finetuned / "transformer")
    model = load_source(sd3_repo)
    before, target = _weights(model), tuned.state_dict()
    apply_options(model, delta=(sd3_repo, finetuned), alpha=0.5)
    for k, v in model.denoiser.state_dict().items():  # parameters move by 0.05, buffers (pos_embed) stay
        assert torch.allclose(v, before[k] + 0.5 * (target[k] - before[k]), atol=1e-5), k
    assert not torch.equal(model.denoiser.proj_out.weight, before["proj_out.weight"])
    with pytest.raises(DataError, match="no unet/ or transformer/"):
        apply_options(model, delta=(tmp_path, finetuned))


def test_the_demo_serves_the_sd3_teacher_and_its_flow(sd3_repo: Path, tmp_path: Path) -> None:
    from flows.cli.demo import flow_model, teacher_model
    from instaflow_core.config import load
    from tasks.tracking.resolve import ResolvedModel

    cfg = load("sd35", [f"storage.root={tmp_path}", f"models.teacher={sd3_repo}", "models.dtype=float32"])
    teacher = teacher_model(cfg)
    assert (teacher.steps, teacher.guidance) == (40, 4.5)  # the preset's: the model card's sampler
    images = teacher.generate([CAT], [0], 2, 4.5)
    model = load_source(sd3_repo)
    assert np.array_equal(images, teacher_images(model, [CAT], [0], 2, 4.5, "flow-euler"))
    flow = flow_model(ResolvedModel(label="sd3", folder=sd3_repo, kind="2rf"), "float32")
    assert np.array_equal(flow.generate([CAT], [0], 1, 1.0), flow_images(model, [CAT], [0], steps=1))


def test_onnx_export_refuses_sd3_in_one_line(sd3_repo: Path, tmp_path: Path) -> None:
    from instaflow_core.inference.onnx_export import export_onnx

    with pytest.raises(DataError) as err:
        export_onnx(load_source(sd3_repo), tmp_path / "onnx")
    assert "\n" not in str(err.value) and "sd3" in str(err.value)
    assert not (tmp_path / "onnx").exists()
    assert (
        json.loads((sd3_repo / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    )
