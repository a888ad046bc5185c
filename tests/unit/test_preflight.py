"""The preflight checks one by one (instaflow_core/preflight/checks.py, tasks/preflight.py): each finds its
problem as one line, writes nothing, and the whole set on the tiny preset passes in seconds."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from instaflow_core.config import (
    CurationConfig,
    DistillationConfig,
    EvaluationConfig,
    ModelsConfig,
    RegistrationConfig,
    StorageConfig,
    load,
)
from instaflow_core.errors import ConfigError
from instaflow_core.models.geometry import tiny_geometry
from instaflow_core.preflight import checks
from instaflow_core.preflight.checks import PreflightError
from instaflow_core.refs import Stage
from tasks.preflight import ORDER, checks_for, run_preflight, tracking_problems


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_tiny_preset_passes_every_check_in_seconds_and_writes_nothing(tmp_path: Path) -> None:
    cfg = load("tiny", [f"storage.root=file://{tmp_path}/store/deeper"])
    t0 = time.perf_counter()
    report = run_preflight(cfg)
    assert report.ok, report.problems
    assert time.perf_counter() - t0 < 5.0
    assert [r.name for r in report.results] == list(ORDER)
    assert _tree(tmp_path) == []  # not even the store folder or the sqlite file


def test_stage_commands_check_what_they_need() -> None:
    assert checks_for([Stage.DISTILL]) == ["storage", "resolution", "memory", "lpips", "tracking"]
    assert checks_for([Stage.REFLOW]) == ["storage", "teacher", "memory", "tracking"]
    assert checks_for([Stage.CURATE]) == ["storage", "sources", "teacher"]
    assert checks_for([Stage.REGISTER]) == ["storage", "registry", "tracking"]
    assert set(checks_for(None)) == {s for st in Stage for s in checks_for([st])}


def test_all_problems_at_once_one_line_each(tmp_path: Path) -> None:
    cfg = load(
        "tiny",
        [
            f"storage.root=file://{tmp_path}/store",
            f"models.teacher={tmp_path}/no-such-teacher",
            "distillation.stages=[{steps: 2, batch_size: 2, loss: lpips}]",
            f"evaluation.coco_captions={tmp_path}/captions_val2017.json",
        ],
    )
    report = run_preflight(cfg)
    problems = report.problems
    assert len(problems) == 3, problems
    assert any("no-such-teacher" in p for p in problems)
    assert any("lpips_weights is not set" in p for p in problems)
    assert any("captions_val2017.json not found" in p for p in problems)
    with pytest.raises(
        ConfigError, match="'a/b' is not a registered model name"
    ):  # refused as the config loads
        load("tiny", [f"storage.root=file://{tmp_path}/store", "registration.model_name=a/b"])
    with pytest.raises(PreflightError) as info:
        report.raise_if_failed()
    lines = str(info.value).splitlines()
    assert lines[0].startswith("3 problems found") and len(lines) == 4
    assert _tree(tmp_path) == []


# ---------------------------------------------------------------------------------------------- storage
def test_local_storage_root_is_checked_without_creating_it(tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b" / "c"
    assert checks.storage_problems(StorageConfig(root=f"file://{deep}")) == []
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    problems = checks.storage_problems(StorageConfig(root=str(tmp_path / "file" / "store")))
    assert len(problems) == 1 and "is a file" in problems[0]


def test_unreachable_s3_is_one_line_in_seconds() -> None:
    cfg = StorageConfig(root="s3://bucket/x", s3_endpoint="http://127.0.0.1:9", access_key_env="K_UNSET_1")
    t0 = time.perf_counter()
    problems = checks.storage_problems(cfg)
    assert len(problems) == 1 and "K_UNSET_1" in problems[0]  # no keys: said before any connection
    assert time.perf_counter() - t0 < 5.0


# --------------------------------------------------------------------------------------------- tracking
def test_tracking_sqlite_folder_creatable_and_server_reachable(tmp_path: Path) -> None:
    cfg = load(
        "tiny", [f"storage.root={tmp_path}/store", f"registration.tracking_uri={tmp_path}/ml/x/mlflow.db"]
    )
    assert tracking_problems(cfg) == [] and not (tmp_path / "ml").exists()
    (tmp_path / "ml").write_text("a file where the folder should be")
    assert "is a file" in tracking_problems(cfg)[0]
    down = load("tiny", ["registration.tracking_uri=http://127.0.0.1:9"])
    t0 = time.perf_counter()
    (problem,) = tracking_problems(down)
    assert "127.0.0.1:9 is not reachable" in problem and time.perf_counter() - t0 < 5.0


# ---------------------------------------------------------------------------------------------- registry
@pytest.mark.parametrize(
    "name", ["instaflow-sd15", "a/b", "a:b", "", "  ", ".", "..x", "x.y", " spaced ", "ok_1"]
)
def test_model_names_follow_mlflow_own_rule(name: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
        mlflow_ok = True
    except MlflowException:
        mlflow_ok = False
    assert (checks.model_name_problem(name, "registration.model_name") is None) == mlflow_ok


def test_registry_problems() -> None:
    assert checks.registry_problems(RegistrationConfig()) == []
    # the config refuses such names as it loads; the check also covers a config built without validation
    problems = checks.registry_problems(
        RegistrationConfig.model_construct(model_name="a/b", rf_model_name="c:d")
    )
    assert len(problems) == 2 and "'/'" in problems[0] and "':'" in problems[1]
    same = checks.registry_problems(RegistrationConfig(model_name="m", rf_model_name="m"))
    assert "same as registration.model_name" in same[0]


# ---------------------------------------------------------------------------------------------- weights
def test_lpips_weights_checked_only_when_a_stage_uses_lpips(tmp_path: Path) -> None:
    l2 = {"steps": 2, "batch_size": 2, "loss": "l2"}
    lp = {**l2, "loss": "lpips"}
    assert checks.lpips_problems(DistillationConfig(stages=[l2])) == []
    (missing,) = checks.lpips_problems(DistillationConfig(stages=[l2, lp]))
    assert "distillation.stages.1 uses loss lpips" in missing
    assert checks.lpips_problems(DistillationConfig(stages=[lp], lpips_weights="tiny")) == []
    problems = checks.lpips_problems(DistillationConfig(stages=[lp], lpips_weights=str(tmp_path / "vgg.pth")))
    assert "file not found" in problems[0]
    from instaflow_core.training.lpips import TINY

    assert TINY == checks.TINY


def test_evaluation_networks_and_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    storage = StorageConfig(root=str(tmp_path / "store"))
    lfo = ModelsConfig()
    assert checks.evaluation_problems(EvaluationConfig(fid_features="tiny"), lfo, storage) == []
    sd15 = load("sd15", ["storage.root=/tmp/x"]).evaluation  # inception without weights, a hub CLIP
    problems = checks.evaluation_problems(sd15, lfo, storage)
    assert any("inception_weights is not set" in p for p in problems)
    assert any("laion/CLIP-ViT-g-14-laion2B-s12B-b42K" in p and "not in the local" in p for p in problems)
    coco = EvaluationConfig(fid_features="tiny", coco_images=str(tmp_path / "val2017"))
    problems = checks.evaluation_problems(coco, lfo, storage)
    assert len(problems) == 2 and "coco_captions is not" in problems[0] and "val2017 not found" in problems[1]
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    assert (
        checks.evaluation_problems(
            EvaluationConfig(fid_features="clip", clip_model=str(clip_dir)), lfo, storage
        )
        == []
    )
    from instaflow_core.evaluation.feature_nets import DEFAULT_DINOV2

    assert DEFAULT_DINOV2 == checks.DINOV2


# ------------------------------------------------------------------------------------------------ data
def test_caption_sources(tmp_path: Path) -> None:
    storage = StorageConfig(root=str(tmp_path / "store"))
    good = tmp_path / "caps.txt"
    good.write_text("a photo of a cat\n")
    (tmp_path / "caps.weird").write_text("x\n")
    cfg = CurationConfig(
        sources=[
            {"path": str(good)},
            {"path": str(tmp_path / "missing.parquet")},
            {"path": str(tmp_path / "*.jsonl")},
            {"path": str(tmp_path / "caps.weird")},
        ]
    )
    problems = checks.source_problems(cfg, storage)
    assert len(problems) == 3, problems
    assert "sources.1" in problems[0] and "not found" in problems[0]
    assert "sources.2" in problems[1] and "matches no files" in problems[1]
    assert "sources.3" in problems[2] and "cannot tell the format" in problems[2]
    assert "is empty" in checks.source_problems(CurationConfig(), storage)[0]


# --------------------------------------------------------------------------------------------- teacher
def test_teacher_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = StorageConfig(root=str(tmp_path / "store"))
    tiny = ModelsConfig()
    assert checks.teacher_problems(tiny, storage) == ([], tiny_geometry(tiny.tiny))
    (problem,), geometry = checks.teacher_problems(ModelsConfig(teacher=str(tmp_path / "nope")), storage)
    assert "no such folder or file" in problem and geometry is None
    half = tmp_path / "half"
    (half / "unet").mkdir(parents=True)
    (half / "unet" / "config.json").write_text(json.dumps({"sample_size": 64}))
    (half / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")  # a variant is not enough
    (problem,), _ = checks.teacher_problems(ModelsConfig(teacher=str(half)), storage)
    assert "missing model_index.json" in problem  # which components there are: the index says
    sd = {"diffusers": ["unet", "vae"], "transformers": ["text_encoder", "tokenizer"]}
    index = {
        "_class_name": "StableDiffusionPipeline",
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
    }
    classes = {
        "unet": "UNet2DConditionModel",
        "vae": "AutoencoderKL",
        "text_encoder": "CLIPTextModel",
        "tokenizer": "CLIPTokenizer",
    }
    index |= {c: [lib, classes[c]] for lib, comps in sd.items() for c in comps}
    (half / "model_index.json").write_text(json.dumps(index))
    (problem,), _ = checks.teacher_problems(ModelsConfig(teacher=str(half)), storage)
    assert "unet/*.safetensors" in problem and "vae/" in problem and "scheduler/" in problem
    assert "safety_checker" not in problem  # a null component is not missing
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    (problem,), _ = checks.teacher_problems(ModelsConfig(teacher="owner/model"), storage)
    assert "'owner/model' is not in the local Hugging Face cache" in problem
    (problem,), _ = checks.teacher_problems(ModelsConfig(teacher=str(tmp_path / "x.ckpt")), storage)
    assert "no such folder or file" in problem
    (tmp_path / "x.ckpt").write_bytes(b"")
    (problem,), _ = checks.teacher_problems(ModelsConfig(teacher=str(tmp_path / "x.ckpt")), storage)
    assert "allow_pickle" in problem
    (tmp_path / "x.safetensors").write_bytes(b"not a safetensors file")
    (problem,), _ = checks.teacher_problems(ModelsConfig(teacher=str(tmp_path / "x.safetensors")), storage)
    assert "unreadable checkpoint" in problem


def test_resolutions_against_the_teacher(tmp_path: Path) -> None:
    cfg = load("tiny", ["generation.resolution=24", "evaluation.resolution=32"])
    geometry = tiny_geometry(cfg.models.tiny)  # VAE x2, UNet x2: multiples of 4 px
    assert checks.resolution_problems(cfg, geometry) == []
    cfg = load("tiny", ["generation.resolution=18", "distillation.pairs.resolution=30"])
    problems = checks.resolution_problems(cfg, geometry)
    assert [p.split("=")[0] for p in problems] == ["generation.resolution", "distillation.pairs.resolution"]
    assert checks.resolution_problems(cfg, None) == []  # no geometry: the teacher check said why
