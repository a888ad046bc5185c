"""`instaflow check` on a FLUX.1 teacher (the flux-dev / flux-schnell presets, the hub-shaped FLUX.1 repos of
tests/support/teacher_repos.py): each rule one line, found from the configs alone before any weights load: an unknown
pipeline class, a missing text encoder or tokenizer, a resolution the VAE and the 2x2 packing cannot take, a sampler
the family does not have, guidance where the teacher has none (FLUX.1-schnell)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from instaflow_core.config import InstaflowConfig, ModelsConfig, StorageConfig, load
from instaflow_core.preflight import checks
from instaflow_core.refs import Stage
from tests.support.teacher_repos import FLUX_DEV, FLUX_SCHNELL

HUB = {"dev": FLUX_DEV, "schnell": FLUX_SCHNELL}


def _cfg(tmp_path: Path, preset: str, teacher: str | Path, *sets: str) -> InstaflowConfig:
    return load(preset, [f"storage.root=file://{tmp_path / 'store'}", f"models.teacher={teacher}", *sets])


def _copy(repo: Path, tmp_path: Path, **index_changes: object) -> Path:
    """A copy of the repo with model_index.json entries changed (None: the key removed)."""
    folder = tmp_path / "teacher"
    shutil.copytree(repo, folder)
    index = json.loads((folder / "model_index.json").read_text())
    for key, value in index_changes.items():
        if value is None:
            index.pop(key, None)
        else:
            index[key] = value
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _teacher(folder: Path | str) -> tuple[list[str], object]:
    return checks.teacher_problems(ModelsConfig(teacher=str(folder)), StorageConfig(root="/tmp/unused"))


def test_flux_folders_and_hub_ids_pass_with_their_presets_settings(
    flux_dev_folder: Path, flux_schnell_folder: Path, teacher_hub: Path, tmp_path: Path
) -> None:
    for variant, repo in (("dev", flux_dev_folder), ("schnell", flux_schnell_folder)):
        for teacher in (repo, HUB[variant]):
            problems, geometry = _teacher(teacher)
            assert problems == [] and geometry.latent_shape(64) == (16, 8, 8)  # type: ignore[union-attr]
            cfg = _cfg(tmp_path, f"flux-{variant}", teacher, "generation.resolution=64")
            assert checks.setting_problems(cfg) == []
            assert checks.resolution_problems(cfg, geometry) == []  # type: ignore[arg-type]
            assert checks.teacher_family(cfg.models, cfg.storage).name == "flux"  # type: ignore[union-attr]
    # the shipped presets name the hub ids
    assert load("flux-dev", ["storage.root=/tmp/x"]).models.teacher == HUB["dev"]
    assert load("flux-schnell", ["storage.root=/tmp/x"]).models.teacher == HUB["schnell"]


def test_an_unknown_pipeline_class_is_one_line(flux_dev_folder: Path, tmp_path: Path) -> None:
    folder = _copy(flux_dev_folder, tmp_path, _class_name="FluxFillPipeline")
    (problem,), geometry = _teacher(folder)
    assert geometry is None and "\n" not in problem
    assert "pipeline class 'FluxFillPipeline' is not supported" in problem
    assert "FluxPipeline" in problem  # the known classes are listed


@pytest.mark.parametrize("component", ["text_encoder_2", "tokenizer", "tokenizer_2", "transformer"])
def test_a_required_component_named_null_is_one_line(
    flux_dev_folder: Path, tmp_path: Path, component: str
) -> None:
    (problem,), geometry = _teacher(_copy(flux_dev_folder, tmp_path, **{component: [None, None]}))
    assert geometry is None and "\n" not in problem
    assert problem == f"models.teacher: model_index.json names no {component} (a flux model needs them)"


def test_a_missing_text_encoder_or_tokenizer_folder_is_one_line(
    flux_schnell_folder: Path, tmp_path: Path
) -> None:
    folder = _copy(flux_schnell_folder, tmp_path)
    shutil.rmtree(folder / "tokenizer_2")
    (problem,), _ = _teacher(folder)
    assert "not a loadable diffusers folder (missing tokenizer_2/)" in problem
    (folder / "text_encoder" / "model.safetensors").unlink()
    (problem,), _ = _teacher(folder)
    assert "missing text_encoder/*.safetensors, tokenizer_2/" in problem and "\n" not in problem


def test_resolutions_the_vae_and_the_packing_cannot_take(flux_dev_folder: Path, tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path,
        "flux-dev",
        flux_dev_folder,
        "generation.resolution=72",
        "distillation.pairs.resolution=64",
        "evaluation.resolution=1000",
    )
    gen, ev = checks.resolution_problems(cfg, _teacher(flux_dev_folder)[1])  # type: ignore[arg-type]
    assert gen == (
        "generation.resolution=72: must be a multiple of 16 px for this model (VAE factor 8 x 2x2 token packing 2);"
        " e.g. 64 (native 64)"
    )
    assert ev.startswith("evaluation.resolution=1000: must be a multiple of 16 px")


def test_a_sampler_the_family_does_not_have(flux_dev_folder: Path, tmp_path: Path) -> None:
    (problem,) = checks.setting_problems(
        _cfg(tmp_path, "flux-dev", flux_dev_folder, "generation.scheduler=dpmsolver++")
    )
    assert problem == (
        "generation.scheduler='dpmsolver++': the flux teacher's sampler takes one of ['flow-euler', 'euler']"
    )


def test_guidance_on_schnell_is_one_line_per_setting_and_any_value_on_dev(
    flux_dev_folder: Path, flux_schnell_folder: Path, teacher_hub: Path, tmp_path: Path
) -> None:
    sets = ("generation.guidance_scale=3.5", "evaluation.rf_guidance=1.5", "evaluation.teacher_guidance=1.0")
    assert checks.setting_problems(_cfg(tmp_path, "flux-dev", flux_dev_folder, *sets)) == []
    for teacher in (flux_schnell_folder, HUB["schnell"]):
        assert checks.setting_problems(_cfg(tmp_path, "flux-schnell", teacher, *sets)) == [
            "generation.guidance_scale=3.5: the flux teacher has no guidance embedding (FLUX.1-schnell): set it to 1",
            "evaluation.rf_guidance=1.5: the flux teacher has no guidance embedding (FLUX.1-schnell): set it to 1",
        ]
    # the dev preset's guidance (3.5 everywhere) on a schnell teacher: every setting named
    problems = checks.setting_problems(_cfg(tmp_path, "flux-dev", flux_schnell_folder))
    assert [p.split("=")[0] for p in problems] == [
        "generation.guidance_scale",
        "distillation.pairs.guidance_scale",
        "reflow.sample_guidance",
        "evaluation.teacher_guidance",
        "evaluation.rf_guidance",
    ]


def test_check_reports_every_problem_before_any_work(flux_schnell_folder: Path, tmp_path: Path) -> None:
    """The preflight as `instaflow check --stage generate` runs it: the family's rules beside the others."""
    from tasks.preflight import run_preflight

    cfg = _cfg(
        tmp_path,
        "flux-schnell",
        flux_schnell_folder,
        "generation.guidance_scale=2",
        "generation.resolution=100",
    )
    report = run_preflight(cfg, [Stage.GENERATE])
    assert report.problems == [
        "generation.guidance_scale=2.0: the flux teacher has no guidance embedding (FLUX.1-schnell): set it to 1",
        "generation.resolution=100: must be a multiple of 16 px for this model (VAE factor 8 x 2x2 token packing 2);"
        " e.g. 96 (native 64)",
    ]
    assert not (tmp_path / "store").exists()
