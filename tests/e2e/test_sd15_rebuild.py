"""`instaflow rebuild --preset sd15` end to end on the SD 1.5-shaped repo (tests/support/sd15.py), as a user runs it.

The real preset with small counts only (`--set`: 2 solver steps, 2 training steps a stage, 4 evaluation samples,
64 px = 8x8 latents, the tiny stand-ins for the FID / CLIP networks whose weights do not exist here, LPIPS as
the tiny stand-in in the second distillation stage, float32 on a CPU): the shipped hub id from an offline
Hugging Face cache on SeaweedFS S3, a local folder on file://, and a single .safetensors file through
generation. Every stage's command-line path runs: preflight, Prefect flows, LanceDB, training, MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from instaflow_core.config import load
from instaflow_core.models.folder_layout import weights_bytes
from instaflow_core.store import Store
from tests.integration.test_sd15_models import SAVED_FILES
from tests.support import sd15

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread", "prefect_api")]

SMALL = [
    "models.dtype=float32",  # the preset's float16 is for GPUs: on a CPU it is ~15x slower
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


@pytest.fixture(scope="module")
def captions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("captions") / "captions.txt"
    path.write_text("\n".join(CAPTIONS) + "\n")
    return path


def _cli(*args: str) -> None:
    """The `instaflow` command in this process (one Prefect test API and one import of the stack for all)."""
    from flows.cli.main import app

    rc = app(list(args), standalone_mode=False)
    assert rc in (None, 0), rc


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _run_sd15(tmp: Path, captions: Path, storage: list[str], teacher: list[str]) -> dict:
    out = tmp / "summary.json"
    sets = _sets(
        *storage,
        *teacher,
        f"curation.sources=[{{path: {captions}, format: txt}}]",
        f"registration.tracking_uri={tmp / 'mlflow' / 'mlflow.db'}",
        *SMALL,
    )
    _cli("check", "--preset", "sd15", *sets)
    _cli("rebuild", "--preset", "sd15", *sets, "--json", str(out))
    return json.loads(out.read_text())


def _check_summary(summary: dict, tmp: Path, store: Store) -> None:
    assert set(summary["stages"].values()) == {"ran"} and len(summary["stages"]) == 7
    assert summary["refs"]["triplets"]["rows"] > 0
    # the saved 2-RF and InstaFlow folders: the pipeline's files only, about the size of the weights
    for kind in ("2rf", "instaflow"):
        folder = store.local_copy(summary["refs"][kind]["uri"])
        paths = [p for p in folder.rglob("*") if p.is_file() and p.name != ".complete"]  # local_copy's marker
        assert sorted(p.relative_to(folder).as_posix() for p in paths) == SAVED_FILES, kind
        total = sum(p.stat().st_size for p in paths)
        assert total <= 1.05 * weights_bytes(folder), kind
        assert (
            json.loads((folder / "unet" / "config.json").read_text())["sample_size"] == 8
        )  # trained at 64 px
    # the registered model (the MLflow pyfunc's artifact folder) loads in our pipeline and in diffusers' own
    import mlflow
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    from instaflow_core.inference.pipeline import InstaFlowPipeline
    from tasks.tracking.client import mlflow_client

    reg = summary["registered"]
    assert reg["model_name"] == "instaflow-sd15" and reg["aliases"] == [
        "candidate"
    ]  # the preset: no auto-promote
    cfg = load(
        "sd15", [f"registration.tracking_uri={tmp / 'mlflow' / 'mlflow.db'}", "storage.root=/tmp/unused"]
    )
    with mlflow_client(cfg.registration, cfg.storage):
        local = Path(mlflow.artifacts.download_artifacts(reg["model_uri"], dst_path=str(tmp / "registered")))
    import yaml

    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    folder = local / mlmodel["flavors"]["python_function"]["artifacts"]["diffusers"]["path"]
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == SAVED_FILES
    ours, theirs = InstaFlowPipeline.from_pretrained(folder), DiffusionPipeline.from_pretrained(folder)
    assert isinstance(theirs, StableDiffusionPipeline) and theirs.safety_checker is None
    assert theirs.unet.config.block_out_channels == [32, 64, 64, 64]
    ours.set_progress_bar_config(disable=True)
    image = ours("a photo of a cat", generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_sd15_rebuild_from_the_hub_id_on_s3(
    tmp_path: Path, captions: Path, sd15_hub: str, s3_storage_cfg
) -> None:
    """The shipped default teacher `stable-diffusion-v1-5/stable-diffusion-v1-5`, from the offline cache, every
    stage on SeaweedFS S3 (reflow used to fail here: the hub id was read as a relative path)."""
    s3 = s3_storage_cfg
    storage = [
        f"storage.root={s3.root}",
        f"storage.s3_endpoint={s3.s3_endpoint}",
        f"storage.access_key_env={s3.access_key_env}",
        f"storage.secret_key_env={s3.secret_key_env}",
        "registration.rf_model_name=null",  # the folder run registers the 2-RF too
    ]
    assert load("sd15", ["storage.root=/tmp/x"]).models.teacher == sd15_hub
    summary = _run_sd15(tmp_path, captions, storage, [])
    assert summary["refs"]["teacher"]["uri"] == sd15_hub
    _check_summary(summary, tmp_path, Store(s3))


def test_sd15_rebuild_from_a_folder_on_file(tmp_path: Path, captions: Path, sd15_folder: Path) -> None:
    root = f"file://{tmp_path / 'store'}"
    summary = _run_sd15(tmp_path, captions, [f"storage.root={root}"], [f"models.teacher={sd15_folder}"])
    store = Store(root)
    _check_summary(summary, tmp_path, store)
    # the triplets table records the resolution it was made at, and holds 8x8 latents
    from instaflow_core.store import get_metadata, open_table

    meta = get_metadata(open_table(store, "triplets"))
    assert meta["resolution"] == "64" and json.loads(meta["latent_shape"]) == [4, 8, 8]


def test_sd15_single_file_teacher_through_generation(
    tmp_path: Path, captions: Path, sd15_single_file: Path, sd15_hub: str
) -> None:
    """`models.teacher=<file>.safetensors`: its config inferred from the cached SD 1.5 repo, converted into a
    diffusers folder in the store once, then curated and generated from by the stage commands."""
    sets = _sets(
        f"storage.root=file://{tmp_path / 'store'}",
        f"models.teacher={sd15_single_file}",
        f"curation.sources=[{{path: {captions}, format: txt}}]",
        f"registration.tracking_uri={tmp_path / 'mlflow.db'}",
        *SMALL,
    )
    _cli("curate", "--preset", "sd15", *sets)
    _cli("generate", "--preset", "sd15", *sets)
    from tasks.lineage import latest_ref

    triplets = latest_ref(
        load("sd15", ["storage.root=file://" + str(tmp_path / "store")]).storage, "triplets"
    )
    assert triplets.rows > 0
    models = list((tmp_path / "store" / "models").iterdir())
    assert len(models) == 1 and (models[0] / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (models[0] / sd15.SINGLE_FILE).exists()
