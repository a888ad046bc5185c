"""`instaflow rebuild --preset sd35` end to end on the SD 3.5 Medium-shaped repo (tests/support/teacher_repos.py), as a user
runs it: the shipped hub id `stabilityai/stable-diffusion-3.5-medium` from an offline Hugging Face cache, the store
on SeaweedFS S3, every stage (preflight, curate, generate, reflow, distill pairs, distill, evaluate, register).

The real preset with small counts only (`--set`): 2 sampler steps (the preset's flow-euler, shift 3.0, CFG 4.5),
1-2 training steps a stage (the preset's bf16 autocast on the CPU), 4 evaluation samples, 64 px = 8x8 latents = 4x4
patches, the tiny stand-ins for the FID / CLIP / LPIPS networks whose weights do not exist here, float32 weights.
The saved 2-RF and InstaFlow folders are StableDiffusion3Pipeline folders without root checkpoints or fp16
variants, and the registered one runs one step in diffusers' own pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from instaflow_core.config import load
from instaflow_core.models.folder_layout import weights_bytes
from instaflow_core.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread", "prefect_api")]

SMALL = [
    "models.dtype=float32",  # the preset's bfloat16 is for GPUs
    "curation.holdout_fraction=0.25",
    "generation.num_inference_steps=2",
    "generation.resolution=64",
    "generation.batch_size=8",
    "generation.mixed_precision=no",  # accelerate's word; YAML reads it as false
    "reflow.stages=[{steps: 2, batch_size: 2, micro_batch_size: 2}]",  # bf16 autocast, as the preset
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
# a saved student: what StableDiffusion3Pipeline loads, full precision only, and the stage's meta file
SAVED_DIRS = {
    "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3",
    "transformer", "vae",
}  # fmt: skip


def _cli(*args: str) -> None:
    from flows.cli.main import app

    rc = app(list(args), standalone_mode=False)
    assert rc in (None, 0), rc


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _check_folder(folder: Path) -> None:
    files = sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != ".complete"
    )
    assert [f for f in files if "/" not in f] == ["instaflow.json", "model_index.json"]
    assert {f.split("/")[0] for f in files if "/" in f} == SAVED_DIRS
    assert not [f for f in files if ".fp16." in f or f.endswith(".bin")]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert (
        json.loads((folder / "transformer" / "config.json").read_text())["sample_size"] == 8
    )  # trained at 64 px
    # about the size of the full-precision weights: configs and tokenizer files beside them, nothing else
    assert sum((folder / f).stat().st_size for f in files) <= 1.05 * weights_bytes(folder)


def test_sd35_rebuild_from_the_hub_id_on_s3(tmp_path: Path, sd3_hub: str, s3_storage_cfg) -> None:  # noqa: ANN001
    s3 = s3_storage_cfg
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    assert load("sd35", ["storage.root=/tmp/x"]).models.teacher == sd3_hub
    sets = _sets(
        f"storage.root={s3.root}",
        f"storage.s3_endpoint={s3.s3_endpoint}",
        f"storage.access_key_env={s3.access_key_env}",
        f"storage.secret_key_env={s3.secret_key_env}",
        "registration.rf_model_name=null",
        f"curation.sources=[{{path: {captions}, format: txt}}]",
        f"registration.tracking_uri={tmp_path / 'mlflow' / 'mlflow.db'}",
        *SMALL,
    )
    _cli("check", "--preset", "sd35", *sets)
    out = tmp_path / "summary.json"
    _cli("rebuild", "--preset", "sd35", *sets, "--json", str(out))
    summary = json.loads(out.read_text())

    assert set(summary["stages"].values()) == {"ran"} and len(summary["stages"]) == 7
    assert summary["refs"]["teacher"]["uri"] == sd3_hub
    assert summary["refs"]["triplets"]["rows"] > 0
    store = Store(s3)
    from instaflow_core.store import get_metadata, open_table

    meta = get_metadata(open_table(store, "triplets"))
    assert meta["resolution"] == "64" and json.loads(meta["latent_shape"]) == [16, 8, 8]
    for kind in ("2rf", "instaflow"):
        _check_folder(store.local_copy(summary["refs"][kind]["uri"]))

    # the registered InstaFlow model: its folder is one step of diffusers' own StableDiffusion3Pipeline
    import mlflow
    import yaml
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

    from tasks.tracking.client import mlflow_client

    reg = summary["registered"]
    assert reg["model_name"] == "instaflow-sd35" and reg["aliases"] == ["candidate"]
    cfg = load(
        "sd35", [f"registration.tracking_uri={tmp_path / 'mlflow' / 'mlflow.db'}", "storage.root=/tmp/unused"]
    )
    with mlflow_client(cfg.registration, cfg.storage):
        local = Path(
            mlflow.artifacts.download_artifacts(reg["model_uri"], dst_path=str(tmp_path / "registered"))
        )
        pyfunc = mlflow.pyfunc.load_model(str(local))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    folder = local / mlmodel["flavors"]["python_function"]["artifacts"]["diffusers"]["path"]
    _check_folder(folder)
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    pipe.set_progress_bar_config(disable=True)
    from instaflow_core.rectified_flow import noise_from_seeds

    theirs = pipe(
        "a photo of a cat", latents=noise_from_seeds([0], (16, 8, 8)), num_inference_steps=1, guidance_scale=1.0,
        height=64, width=64, output_type="np",
    ).images  # fmt: skip
    ours = pyfunc.predict({"prompt": ["a photo of a cat"], "seed": [0]})
    assert ours.shape == (1, 64, 64, 3) and theirs.shape == (1, 64, 64, 3)
    assert abs(ours.astype(int) - (theirs * 255).round().astype(int)).max() <= 1
    assert torch.get_num_threads() == 1
