"""`instaflow rebuild --preset sd21` end to end on the SD 2.1-shaped repo (tests/support/teacher_repos.py: a
v-prediction DDIM scheduler config, OpenCLIP-H's 23 layers, fp16 variants and an LDM root checkpoint beside the
folders), as a user runs it: the shipped hub id
`stabilityai/stable-diffusion-2-1` from an offline Hugging Face cache, every stage with small counts (the SDXL
e2e's settings: tests/e2e/test_sdxl_rebuild.py), the teacher sampled by DPM-Solver++ built on its v-prediction
schedule (the SD family).

The saved 2-RF and InstaFlow folders are StableDiffusionPipeline folders (the base's scheduler, the safety checker
null) without fp16 variants; the registered model loads in diffusers' own pipeline and in `InstaFlowPipeline`,
whose one-step images are `inference.generate.flow_images`'.
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
from tests.e2e.test_sdxl_rebuild import CAPTIONS, SMALL, TOKENIZER_FILES, _cli, _files, _sets

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread", "prefect_api")]

# exactly what StableDiffusionPipeline loads (and what a saved 2-RF / InstaFlow folder holds)
SAVED_FILES = sorted(
    [
        "instaflow.json",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        *(f"tokenizer/{f}" for f in TOKENIZER_FILES),
        *(
            f"{net}/{f}"
            for net in ("unet", "vae")
            for f in ("config.json", "diffusion_pytorch_model.safetensors")
        ),
    ]
)


def test_sd21_rebuild_from_the_hub_id(tmp_path: Path, teacher_hub: Path) -> None:
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    from instaflow_core.inference.generate import flow_images, load_model_folder
    from instaflow_core.inference.pipeline import InstaFlowPipeline
    from tests.support.teacher_repos import SD21

    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    root = f"file://{tmp_path / 'store'}"
    tracking = tmp_path / "mlflow" / "mlflow.db"
    assert load("sd21", ["storage.root=/tmp/x"]).models.teacher == SD21
    sets = _sets(
        f"storage.root={root}",
        f"curation.sources=[{{path: {captions}, format: txt}}]",
        f"registration.tracking_uri={tracking}",
        *SMALL,
    )
    out = tmp_path / "summary.json"
    _cli("check", "--preset", "sd21", *sets)
    _cli("rebuild", "--preset", "sd21", *sets, "--json", str(out))
    summary = json.loads(out.read_text())

    assert set(summary["stages"].values()) == {"ran"} and len(summary["stages"]) == 7
    assert summary["refs"]["teacher"]["uri"] == SD21
    assert summary["refs"]["triplets"]["rows"] > 0
    store = Store(root)
    for kind in ("2rf", "instaflow"):
        folder = store.local_copy(summary["refs"][kind]["uri"])
        assert _files(folder) == SAVED_FILES, kind  # no fp16 variant, no safety checker
        total = sum((folder / f).stat().st_size for f in SAVED_FILES)
        assert total <= 1.05 * weights_bytes(folder), kind
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "StableDiffusionPipeline" and index["scheduler"] == [
            "diffusers",
            "DDIMScheduler",
        ]
        assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())[
            "prediction_type"
        ] == ("v_prediction")  # the base's scheduler, as every SD-family student folder
        assert (
            json.loads((folder / "unet" / "config.json").read_text())["sample_size"] == 8
        )  # trained at 64 px

    import mlflow
    import yaml

    from tasks.tracking.client import mlflow_client

    reg = summary["registered"]
    assert reg["model_name"] == "instaflow-sd21" and reg["aliases"] == ["candidate"]
    cfg = load("sd21", [f"registration.tracking_uri={tracking}", "storage.root=/tmp/unused"])
    with mlflow_client(cfg.registration, cfg.storage):
        local = Path(
            mlflow.artifacts.download_artifacts(reg["model_uri"], dst_path=str(tmp_path / "registered"))
        )
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    folder = local / mlmodel["flavors"]["python_function"]["artifacts"]["diffusers"]["path"]
    assert _files(folder) == SAVED_FILES
    theirs = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    assert isinstance(theirs, StableDiffusionPipeline) and theirs.safety_checker is None
    ours = InstaFlowPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    image = ours("a photo of a cat", generator=torch.Generator().manual_seed(7), output_type="np").images
    images = flow_images(load_model_folder(folder, device="cpu"), ["a photo of a cat"], [7], 1)
    diff = int(np.abs(images.astype(int) - (image * 255).round().astype(int)).max())
    print(f"registered sd21 InstaFlow, one step: InstaFlowPipeline vs flow_images max uint8 diff {diff}")
    assert images.shape == (1, 64, 64, 3) and diff <= 1
