"""`instaflow rebuild --preset sdxl` end to end on the SDXL base 1.0-shaped repo (tests/support/teacher_repos.py: fp16
variants and SGM root checkpoints beside the folders, which a saved model must leave out), as a user runs it: the
shipped hub id `stabilityai/stable-diffusion-xl-base-1.0` from an offline Hugging Face cache, every stage
(preflight, curate, generate with the repo's Euler scheduler, reflow, distill, evaluate, register) with small
counts (`--set`: 2 solver steps, 1-2 training steps a stage, 4 evaluation samples, 32 px = 4x4 latents (the
repo's native size is 64 px), the tiny stand-ins for FID / CLIP / LPIPS, float32 on a CPU).

The saved 2-RF and InstaFlow folders are StableDiffusionXLPipeline folders without root checkpoints or fp16
variants, whose scheduler is the project's RectifiedFlowEulerScheduler; the registered model loads in diffusers'
own pipeline and its one-step images are `inference.generate.flow_images`'.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from instaflow_core.config import load
from instaflow_core.models.folder_layout import weights_bytes
from instaflow_core.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread", "prefect_api")]

RES = 32  # px: the smallest size SDXL's x8 VAE and x4 UNet take (the SD 2.1 e2e uses SMALL at 64 px)
SMALL = [
    "models.dtype=float32",  # the preset's float16 is for GPUs
    "curation.holdout_fraction=0.25",
    "generation.num_inference_steps=2",
    "generation.resolution=64",
    "generation.batch_size=8",
    "generation.mixed_precision=no",
    "reflow.stages=[{steps: 2, batch_size: 2, micro_batch_size: 2}]",
    "reflow.sample_steps=2",
    "distillation.stages=[{steps: 1, batch_size: 2, loss: l2}, {steps: 1, batch_size: 2, loss: lpips}]",
    "distillation.lpips_weights=tiny",
    "distillation.pairs.num_inference_steps=2",  # no resolution: the 2-RF's recorded 64 px
    "distillation.pairs.batch_size=8",
    "evaluation.num_samples=4",
    "evaluation.batch_size=4",
    "evaluation.resolution=64",
    "evaluation.image_size=32",
    "evaluation.fid_features=tiny",
    "evaluation.clip_model=tiny",
    "evaluation.teacher_steps=2",
    "evaluation.rf_steps=[1]",
    "evaluation.straightness_steps=2",
    "evaluation.latency_repeats=1",
]
CAPTIONS = [
    f"a photo of a {c} on a {p}"
    for c in ("cat", "dog", "red car", "bird", "tree", "house")
    for p in ("table", "street")
]
TOKENIZER_FILES = ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")
# exactly what StableDiffusionXLPipeline loads (and what a saved 2-RF / InstaFlow folder holds)
SAVED_FILES = sorted(
    [
        "instaflow.json",
        "model_index.json",
        "scheduler/scheduler_config.json",
        *(
            f"{enc}/{f}"
            for enc in ("text_encoder", "text_encoder_2")
            for f in ("config.json", "model.safetensors")
        ),
        *(f"{tok}/{f}" for tok in ("tokenizer", "tokenizer_2") for f in TOKENIZER_FILES),
        *(
            f"{net}/{f}"
            for net in ("unet", "vae")
            for f in ("config.json", "diffusion_pytorch_model.safetensors")
        ),
    ]
)


def _cli(*args: str) -> None:
    from flows.cli.main import app

    rc = app(list(args), standalone_mode=False)
    assert rc in (None, 0), rc


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != ".complete"
    )


def _at(res: int) -> list[str]:
    """SMALL at `res` px (generation, evaluation; the distillation pairs take the 2-RF's recorded size)."""
    return [s.replace("=64", f"={res}") if s.split("=")[0].endswith(".resolution") else s for s in SMALL]


def test_sdxl_rebuild_from_the_hub_id(tmp_path: Path, teacher_hub: Path) -> None:
    from diffusers import DiffusionPipeline

    from instaflow_core.inference.generate import flow_images, load_model_folder
    from instaflow_core.models.flow_scheduler import RectifiedFlowEulerScheduler
    from tests.support.teacher_repos import SDXL

    side = RES // 8
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    root = f"file://{tmp_path / 'store'}"
    tracking = tmp_path / "mlflow" / "mlflow.db"
    assert load("sdxl", ["storage.root=/tmp/x"]).models.teacher == SDXL
    sets = _sets(
        f"storage.root={root}",
        f"curation.sources=[{{path: {captions}, format: txt}}]",
        f"registration.tracking_uri={tracking}",
        *_at(RES),
    )
    out = tmp_path / "summary.json"
    _cli("check", "--preset", "sdxl", *sets)
    _cli("rebuild", "--preset", "sdxl", *sets, "--json", str(out))
    summary = json.loads(out.read_text())

    assert set(summary["stages"].values()) == {"ran"} and len(summary["stages"]) == 7
    assert summary["refs"]["teacher"]["uri"] == SDXL
    assert summary["refs"]["triplets"]["rows"] > 0
    store = Store(root)
    from instaflow_core.store import get_metadata, open_table

    meta = get_metadata(open_table(store, "triplets"))
    assert meta["resolution"] == str(RES) and json.loads(meta["latent_shape"]) == [4, side, side]
    for kind in ("2rf", "instaflow"):
        folder = store.local_copy(summary["refs"][kind]["uri"])
        assert _files(folder) == SAVED_FILES, kind  # no root checkpoint, no fp16 variant
        total = sum((folder / f).stat().st_size for f in SAVED_FILES)
        assert total <= 1.05 * weights_bytes(folder), kind
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "StableDiffusionXLPipeline"
        assert index["scheduler"] == ["instaflow_core.models.flow_scheduler", "RectifiedFlowEulerScheduler"]
        unet_config = json.loads((folder / "unet" / "config.json").read_text())
        assert unet_config["sample_size"] == side  # trained at 32 px (the teacher's native: 8 = 64 px)

    # the registered one-step model: diffusers' own StableDiffusionXLPipeline gives flow_images' images
    import mlflow
    import yaml

    from tasks.tracking.client import mlflow_client

    reg = summary["registered"]
    assert reg["model_name"] == "instaflow-sdxl" and reg["aliases"] == ["candidate"]
    cfg = load("sdxl", [f"registration.tracking_uri={tracking}", "storage.root=/tmp/unused"])
    with mlflow_client(cfg.registration, cfg.storage):
        local = Path(
            mlflow.artifacts.download_artifacts(reg["model_uri"], dst_path=str(tmp_path / "registered"))
        )
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    folder = local / mlmodel["flavors"]["python_function"]["artifacts"]["diffusers"]["path"]
    assert _files(folder) == SAVED_FILES
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert isinstance(pipe.scheduler, RectifiedFlowEulerScheduler)
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(7)
    theirs = pipe(
        "a photo of a cat", num_inference_steps=1, guidance_scale=1.0, generator=gen, output_type="np"
    )
    theirs8 = (theirs.images * 255).round().astype(np.uint8)
    ours = flow_images(load_model_folder(folder, device="cpu"), ["a photo of a cat"], [7], 1)
    diff = int(np.abs(ours.astype(int) - theirs8.astype(int)).max())
    print(f"registered sdxl InstaFlow, one step: diffusers vs flow_images max uint8 diff {diff}")
    assert ours.shape == theirs8.shape == (1, RES, RES, 3) and diff <= 1
