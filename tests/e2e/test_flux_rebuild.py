"""`instaflow rebuild --preset flux-dev` and `--preset flux-schnell` end to end on the hub-shaped FLUX.1 repos
(tests/support/teacher_repos.py), as a user runs them.

The real presets with small counts only (`--set`: 2 solver steps, 1-2 training steps a stage, 4 evaluation samples,
64 px = 8x8 latents = 4x4 tokens, the tiny stand-ins for the FID / CLIP / LPIPS networks whose weights do not exist
here, float32 on a CPU): the shipped hub ids from an offline Hugging Face cache, every stage's command-line path
(preflight, Prefect flows, LanceDB, training, MLflow). The saved 2-RF and InstaFlow folders are FluxPipeline
folders without the repos' root checkpoints and without fp16 variants; the registered InstaFlow model is one
diffusers step of `DiffusionPipeline.from_pretrained` (dev at guidance 3.5, the value its students carry), and
`instaflow sample` makes an image from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from instaflow_core.config import load
from instaflow_core.models.folder_layout import weights_bytes
from instaflow_core.store import Store
from tests.support.teacher_repos import FLUX_DEV, FLUX_SCHNELL

HUB = {"dev": FLUX_DEV, "schnell": FLUX_SCHNELL}
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread", "prefect_api")]

SMALL = [
    "models.dtype=float32",  # the presets' bfloat16 is for GPUs
    "curation.holdout_fraction=0.25",
    "generation.num_inference_steps=2",
    "generation.resolution=64",
    "generation.batch_size=8",
    "generation.mixed_precision=no",
    "reflow.stages=[{steps: 2, batch_size: 2, micro_batch_size: 2}]",
    "reflow.mixed_precision=no",
    "reflow.sample_steps=2",
    "distillation.stages=[{steps: 1, batch_size: 2, loss: l2}, {steps: 1, batch_size: 2, loss: lpips}]",
    "distillation.mixed_precision=no",
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
COMPONENTS = {"scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae"}


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


def _check_folders(summary: dict, store: Store) -> None:
    """The saved 2-RF and InstaFlow folders: FluxPipeline folders with the pipeline's files only."""
    for kind in ("2rf", "instaflow"):
        folder = store.local_copy(summary["refs"][kind]["uri"])
        paths = [p for p in folder.rglob("*") if p.is_file() and p.name != ".complete"]  # local_copy's marker
        rel = sorted(p.relative_to(folder).as_posix() for p in paths)
        assert [f for f in rel if "/" not in f] == ["instaflow.json", "model_index.json"], (
            kind
        )  # no flux1-*.safetensors
        assert {f.split("/")[0] for f in rel if "/" in f} == COMPONENTS, kind
        assert not [f for f in rel if ".fp16." in f], kind
        # the weights and the configs / tokenizer files beside them (a few hundred kB of text), nothing else
        assert sum(p.stat().st_size for p in paths) <= weights_bytes(folder) + 250_000, kind
        assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "FluxPipeline"


def _registered_folder(summary: dict, tmp: Path, preset: str) -> Path:
    import mlflow
    import yaml

    from tasks.tracking.client import mlflow_client

    reg = summary["registered"]
    assert reg["model_name"] == f"instaflow-{preset}" and reg["aliases"] == ["candidate"]
    cfg = load(
        preset, [f"registration.tracking_uri={tmp / 'mlflow' / 'mlflow.db'}", "storage.root=/tmp/unused"]
    )
    with mlflow_client(cfg.registration, cfg.storage):
        local = Path(mlflow.artifacts.download_artifacts(reg["model_uri"], dst_path=str(tmp / "registered")))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    return local / mlmodel["flavors"]["python_function"]["artifacts"]["diffusers"]["path"]


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flux_rebuild_from_the_hub_id(
    tmp_path: Path, captions: Path, teacher_hub: Path, variant: str
) -> None:
    from diffusers import DiffusionPipeline, FluxPipeline

    from instaflow_core.generation.solvers import flow_latents
    from instaflow_core.models.flux import pack, unpack
    from instaflow_core.models.loading import load_source
    from instaflow_core.rectified_flow import noise_from_seeds

    preset = f"flux-{variant}"
    assert load(preset, ["storage.root=/tmp/x"]).models.teacher == HUB[variant]
    root = f"file://{tmp_path / 'store'}"
    out = tmp_path / "summary.json"
    sets = _sets(
        f"storage.root={root}",
        f"curation.sources=[{{path: {captions}, format: txt}}]",
        f"registration.tracking_uri={tmp_path / 'mlflow' / 'mlflow.db'}",
        "registration.rf_model_name=null",
        *SMALL,
    )
    _cli("check", "--preset", preset, *sets)
    _cli("rebuild", "--preset", preset, *sets, "--json", str(out))
    summary = json.loads(out.read_text())
    assert set(summary["stages"].values()) == {"ran"} and len(summary["stages"]) == 7
    assert summary["refs"]["teacher"]["uri"] == HUB[variant]
    assert summary["refs"]["triplets"]["rows"] > 0
    store = Store(root)
    from instaflow_core.store import get_metadata, open_table

    meta = get_metadata(open_table(store, "triplets"))
    assert meta["resolution"] == "64" and json.loads(meta["latent_shape"]) == [16, 8, 8]  # unpacked latents
    _check_folders(summary, store)

    # the registered InstaFlow model: one step of diffusers' own FluxPipeline is our one step
    folder = _registered_folder(summary, tmp_path, preset)
    pipe = DiffusionPipeline.from_pretrained(
        folder, dtype=torch.float32
    )  # the text encoders' configs say bf16
    assert isinstance(pipe, FluxPipeline)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = ["a photo of a cat"], [5]
    x0 = noise_from_seeds(seeds, (16, 8, 8))
    with torch.no_grad():
        theirs = pipe(
            prompts, latents=pack(x0), num_inference_steps=1, guidance_scale=3.5 if variant == "dev" else 0.0,
            height=64, width=64, max_sequence_length=512 if variant == "dev" else 256, output_type="latent",
        ).images  # fmt: skip
    ours = flow_latents(load_source(folder), prompts, seeds, steps=1, guidance=1.0, resolution=64)
    diff = (ours - unpack(theirs, 8, 8)).abs().max().item()
    print(f"{preset}: registered InstaFlow, one step vs FluxPipeline: max abs difference {diff:.3g}")
    assert diff < 1e-5

    # `instaflow sample` on the registered folder (its native size: the VAE's 64 px here, 1024 for the real one)
    image = tmp_path / "cat.png"
    _cli("sample", "a photo of a cat", "--model", str(folder), "--preset", preset, "--out", str(image))
    import PIL.Image

    with PIL.Image.open(image) as im:
        assert im.size == (64, 64)
