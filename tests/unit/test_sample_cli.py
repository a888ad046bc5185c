"""`instaflow sample` / `interpolate` on model folders: the images are the pipeline's, the options reach it.

Every model, LoRA, fine-tuned UNet and ControlNet here is built in the test (tiny, random init, fixed seed) and
saved in the layouts the real ones use: a diffusers folder, a diffusers LoRA folder and a Kohya .safetensors, a
UNet folder, a ControlNet folder. The references are computed in-process through the same core functions (or,
for the plain image, through the evaluation's path `generate_images`, and diffusers' `InstaFlowPipeline`), so
each test fails if the option is dropped, misapplied or applied at the wrong scale.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from typer.testing import CliRunner

from flows.cli.main import app
from instaflow_core.config import TinyModelConfig
from instaflow_core.errors import InstaflowError
from instaflow_core.evaluation.sampling import SamplerSpec, generate_images
from instaflow_core.inference.generate import (
    apply_options,
    flow_images,
    interpolation_frames,
    load_model_folder,
)
from instaflow_core.models.sd import build_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "a red car on a street"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The base model, a fine-tuned copy (another UNet, same text encoder and VAE), LoRAs and a ControlNet."""
    from diffusers import ControlNetModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from instaflow_core.inference.pipeline import InstaFlowPipeline

    root = tmp_path_factory.mktemp("sample")
    base = build_tiny(TinyModelConfig())
    out = {"base": base.save(root / "base")}
    finetuned = build_tiny(TinyModelConfig())
    finetuned.denoiser = build_tiny(TinyModelConfig(seed=7)).denoiser
    out["finetuned"] = finetuned.save(root / "finetuned")

    lora_unet = build_tiny(TinyModelConfig()).denoiser
    torch.manual_seed(0)
    lora_unet.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
        )
    )
    # x3 on both factors: a LoRA strong enough that its effect survives the tiny VAE's decode
    state = {k: 3 * v.detach().clone() for k, v in get_peft_model_state_dict(lora_unet).items()}
    InstaFlowPipeline.save_lora_weights(
        root / "lora", unet_lora_layers=convert_state_dict_to_diffusers(state)
    )
    out["lora"] = root / "lora"
    kohya: dict[str, torch.Tensor] = {}
    for key, value in state.items():  # PEFT keys -> Kohya sd-scripts keys
        module, kind = key.rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(kohya, str(root / "kohya.safetensors"))
    out["kohya"] = root / "kohya.safetensors"

    torch.manual_seed(1)
    controlnet = ControlNetModel.from_unet(base.denoiser, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():  # zero convs start at zero (no effect): make them matter
        for p in controlnet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.2)
    controlnet.save_pretrained(root / "controlnet")
    out["controlnet"] = root / "controlnet"
    edges = (np.random.default_rng(0).random((16, 16, 3)) > 0.5).astype(np.uint8) * 255
    PIL.Image.fromarray(edges).save(root / "edges.png")
    out["edges"] = root / "edges.png"
    out["model"] = base  # type: ignore[assignment]
    return out


def _sample(*args: str) -> object:
    return CliRunner().invoke(app, ["sample", *args])


def _png(path: Path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB"))


def _ok(res: object) -> None:
    assert res.exit_code == 0, (res.output, res.exception)  # type: ignore[attr-defined]


def test_sample_grid_and_folder_are_the_evaluation_images(folders: dict, tmp_path: Path) -> None:
    res = _sample(
        PROMPT, "--model", str(folders["base"]), "--num", "4", "--seed", "3", "--out", str(tmp_path / "g.png")
    )
    _ok(res)
    assert "4 image(s) 16x16, 1 step(s)" in res.output
    grid = _png(tmp_path / "g.png")
    assert grid.shape == (32, 32, 3)  # 2 x 2 tiles of 16 px
    ref = _evaluation_images(folders["model"], [3, 4, 5, 6], steps=1)
    tiles = np.stack([grid[:16, :16], grid[:16, 16:], grid[16:, :16], grid[16:, 16:]])
    assert np.abs(tiles.astype(int) - ref.astype(int)).max() <= 1
    assert (
        np.abs(tiles.astype(int) - _pipeline_images(folders["model"], [3, 4, 5, 6], 1).astype(int)).max() <= 1
    )

    _ok(
        _sample(
            PROMPT,
            "-m",
            str(folders["base"]),
            "-n",
            "2",
            "-k",
            "3",
            "-g",
            "2.5",
            "-o",
            str(tmp_path / "each"),
        )
    )
    files = sorted((tmp_path / "each").glob("*.png"))
    assert [f.name for f in files] == ["000-seed0.png", "001-seed1.png"]
    ref = _evaluation_images(folders["model"], [0, 1], steps=3, guidance=2.5)
    assert np.abs(ref.astype(int) - _pipeline_images(folders["model"], [0, 1], 3, 2.5).astype(int)).max() <= 1
    assert np.abs(np.stack([_png(f) for f in files]).astype(int) - ref.astype(int)).max() <= 1
    assert not np.array_equal(_png(files[0]), tiles[0])  # other steps and guidance: another image


def _evaluation_images(model: object, seeds: list[int], steps: int, guidance: float = 1.0) -> np.ndarray:
    """The evaluation's path: `generate_images` of a rectified-flow sampler setting."""
    spec = SamplerSpec(name=f"2rf@{steps}", model_kind="2rf", solver="euler", steps=steps, guidance=guidance)
    return generate_images(model, spec, [PROMPT] * len(seeds), seeds)  # type: ignore[arg-type]


def _pipeline_images(model: object, seeds: list[int], steps: int, guidance: float = 1.0) -> np.ndarray:
    """diffusers' InstaFlowPipeline over the same modules, X0 from the same seeds."""
    from instaflow_core.inference.pipeline import InstaFlowPipeline
    from instaflow_core.rectified_flow import noise_from_seeds

    pipe = InstaFlowPipeline.from_model(model)  # type: ignore[arg-type]
    pipe.set_progress_bar_config(disable=True)
    images = pipe([PROMPT] * len(seeds), num_inference_steps=steps, guidance_scale=guidance,
                  latents=noise_from_seeds(seeds, (4, 8, 8)), output_type="np").images  # fmt: skip
    return (np.asarray(images) * 255).round().astype(np.uint8)


def _in_process(folder: Path, **options: object) -> np.ndarray:
    model = apply_options(load_model_folder(folder, device="cpu"), **options)
    return flow_images(model, [PROMPT], [0])[0]


@pytest.mark.parametrize("kind", ["lora", "kohya"])
def test_lora_option(folders: dict, tmp_path: Path, kind: str) -> None:
    plain = _in_process(folders["base"])
    for scale in ("1.0", "0.5"):
        out = tmp_path / f"{kind}-{scale}.png"
        _ok(
            _sample(
                PROMPT,
                "-m",
                str(folders["base"]),
                "--lora",
                str(folders[kind]),
                "--lora-scale",
                scale,
                "-o",
                str(out),
            )
        )
        expected = _in_process(folders["base"], lora=folders[kind], lora_scale=float(scale))
        assert np.array_equal(_png(out), expected)
        assert np.abs(expected.astype(int) - plain.astype(int)).max() > 8  # the LoRA changes the image
    assert not np.array_equal(_png(tmp_path / f"{kind}-1.0.png"), _png(tmp_path / f"{kind}-0.5.png"))


def test_delta_option_adds_finetuned_minus_base(folders: dict, tmp_path: Path) -> None:
    base, ft = str(folders["base"]), str(folders["finetuned"])
    _ok(_sample(PROMPT, "-m", base, "--delta", base, ft, "--alpha", "1", "-o", str(tmp_path / "d1.png")))
    _ok(_sample(PROMPT, "-m", ft, "-o", str(tmp_path / "ft.png")))
    # base + 1 * (finetuned - base) is the fine-tuned UNet: the same image (to fp32 rounding of the sum)
    assert np.abs(_png(tmp_path / "d1.png").astype(int) - _png(tmp_path / "ft.png").astype(int)).max() <= 1
    _ok(_sample(PROMPT, "-m", base, "--delta", base, ft, "--alpha", "0.5", "-o", str(tmp_path / "d05.png")))
    half = _in_process(folders["base"], delta=(folders["base"], folders["finetuned"]), alpha=0.5)
    assert np.array_equal(_png(tmp_path / "d05.png"), half)
    assert np.abs(half.astype(int) - _in_process(folders["base"]).astype(int)).max() > 8
    assert np.abs(half.astype(int) - _png(tmp_path / "ft.png").astype(int)).max() > 8


def test_controlnet_option(folders: dict, tmp_path: Path) -> None:
    out = tmp_path / "cn.png"
    _ok(_sample(PROMPT, "-m", str(folders["base"]), "--controlnet", str(folders["controlnet"]),
                "--control-image", str(folders["edges"]), "--control-scale", "0.8", "-o", str(out)))  # fmt: skip
    model = load_model_folder(folders["base"], device="cpu", controlnet=folders["controlnet"])
    control = PIL.Image.open(folders["edges"]).convert("RGB")
    expected = flow_images(model, [PROMPT], [0], control_image=control, control_scale=0.8)[0]
    assert np.array_equal(_png(out), expected)
    assert np.abs(expected.astype(int) - _in_process(folders["base"]).astype(int)).max() > 8


def test_interpolation_ends_on_both_prompts(folders: dict, tmp_path: Path) -> None:
    model = load_model_folder(folders["base"], device="cpu")
    frames = interpolation_frames(model, ("a red car", "a blue boat"), (0, 5), frames=5)
    assert frames.shape == (5, 16, 16, 3) and frames.dtype == np.uint8
    assert np.abs(frames[0].astype(int) - flow_images(model, ["a red car"], [0])[0]).max() <= 1
    assert np.abs(frames[-1].astype(int) - flow_images(model, ["a blue boat"], [5])[0]).max() <= 1
    assert len({f.tobytes() for f in frames}) == 5  # every frame in between is its own image

    from imageio import v2 as imageio

    for suffix in (".gif", ".mp4"):
        out = tmp_path / f"morph{suffix}"
        res = CliRunner().invoke(app, ["interpolate", "a red car", "a blue boat", "-m", str(folders["base"]),
                                       "--frames", "6", "--min-side", "64", "-o", str(out)])  # fmt: skip
        _ok(res)
        if suffix == ".gif":
            with PIL.Image.open(out) as im:
                assert im.n_frames == 6 and im.size == (64, 64)
        else:
            reader = imageio.get_reader(out)
            back = [f for f in reader]
            reader.close()
            assert len(back) == 6 and back[0].shape == (64, 64, 3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["  ", "-o", "x.png"], "the prompt is empty"),
        ([PROMPT, "-o", "x.jpg"], "give a .png file"),
        ([PROMPT, "-n", "0", "-o", "x.png"], "--num must be at least 1"),
        ([PROMPT, "-m", "./no/such/folder", "-o", "x.png"], "no model folder at ./no/such/folder"),
        ([PROMPT, "--controlnet", "cn", "-o", "x.png"], "--controlnet and --control-image go together"),
        ([PROMPT, "-k", "0", "-o", "x.png"], "--steps must be at least 1"),
        ([PROMPT, "-g", "0.5", "-o", "x.png"], "--guidance must be at least 1"),
        ([PROMPT, "--lora", "missing.safetensors", "-o", "x.png"], "--lora missing.safetensors: not found"),
    ],
)
def test_user_mistakes_are_one_line_errors(
    folders: dict, tmp_path: Path, args: list[str], message: str
) -> None:
    if "-m" not in args:
        args = [*args, "-m", str(folders["base"])]
    res = CliRunner().invoke(app, ["sample", *args])
    assert res.exit_code != 0 and isinstance(res.exception, InstaflowError), res.output
    assert message in str(res.exception) and "\n" not in str(res.exception)


def test_mismatched_delta_and_frames_are_refused(folders: dict, tmp_path: Path) -> None:
    other = build_tiny(TinyModelConfig(unet_channels=[16, 32, 32])).denoiser
    other.save_pretrained(tmp_path / "other-unet")
    res = _sample(PROMPT, "-m", str(folders["base"]), "--delta", str(folders["base"]), str(tmp_path / "other-unet"),
                  "-o", str(tmp_path / "x.png"))  # fmt: skip
    assert isinstance(res.exception, InstaflowError) and "does not match the UNet" in str(res.exception)
    res = CliRunner().invoke(
        app, ["interpolate", "a", "b", "-m", str(folders["base"]), "--frames", "1", "-o", "x.gif"]
    )
    assert isinstance(res.exception, InstaflowError) and "--frames must be at least 2" in str(res.exception)
    assert not (tmp_path / "x.png").exists()


def test_console_script_prints_one_line(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("instaflow")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]
    r = subprocess.run([*cmd, "sample", "a cat", "--model", "nowhere/at/all", "--out", "x.png"],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "COLUMNS": "120"})  # fmt: skip
    lines = [x for x in r.stderr.splitlines() if x.strip() and "WARN" not in x]
    assert r.returncode == 1 and lines == ["error: no model folder at nowhere/at/all"], r.stderr
