"""`instaflow check` on an SD 3.5 teacher (the sd35 preset, the SD 3.5 Medium-shaped repo of tests/support/teacher_repos.py):
each rule one line, found from the configs alone before any weights load: an unknown pipeline class, a missing
text encoder or tokenizer (and T5 without its tokenizer), a resolution the VAE and the transformer's patching
cannot take or its position embeddings do not cover, a sampler the family does not have, guidance where a
family has none."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from instaflow_core.config import InstaflowConfig, ModelsConfig, StorageConfig, load
from instaflow_core.models.sd3 import SD3Family
from instaflow_core.preflight import checks
from instaflow_core.refs import Stage


def _cfg(tmp_path: Path, teacher: str | Path, *sets: str) -> InstaflowConfig:
    return load("sd35", [f"storage.root=file://{tmp_path / 'store'}", f"models.teacher={teacher}", *sets])


def _copy(sd3_repo: Path, tmp_path: Path, **index_changes: object) -> Path:
    """A copy of the repo with model_index.json entries changed (None: the key removed)."""
    folder = tmp_path / "teacher"
    shutil.copytree(
        sd3_repo, folder, copy_function=os.link
    )  # hard links: nothing below edits a file in place
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").unlink()
    for key, value in index_changes.items():
        if value is None:
            index.pop(key, None)
        else:
            index[key] = value
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _teacher(folder: Path | str) -> tuple[list[str], object]:
    return checks.teacher_problems(ModelsConfig(teacher=str(folder)), StorageConfig(root="/tmp/unused"))


def test_an_sd35_folder_and_hub_id_pass_with_the_presets_settings(
    sd3_repo: Path, sd3_hub: str, tmp_path: Path
) -> None:
    for teacher in (sd3_repo, sd3_hub):
        problems, geometry = _teacher(teacher)
        assert problems == [] and geometry.latent_shape(64) == (16, 8, 8)  # type: ignore[union-attr]
    cfg = _cfg(tmp_path, sd3_repo, "generation.resolution=64", "evaluation.resolution=128")
    assert checks.setting_problems(cfg) == []
    assert checks.resolution_problems(cfg, _teacher(sd3_repo)[1]) == []  # type: ignore[arg-type]
    assert checks.teacher_family(cfg.models, cfg.storage).name == "sd3"  # type: ignore[union-attr]


def test_an_unknown_pipeline_class_is_one_line(sd3_repo: Path, tmp_path: Path) -> None:
    folder = _copy(sd3_repo, tmp_path, _class_name="StableDiffusion3ControlNetPipeline")
    (problem,), geometry = _teacher(folder)
    assert geometry is None
    assert "pipeline class 'StableDiffusion3ControlNetPipeline' is not supported" in problem
    assert "StableDiffusion3Pipeline" in problem  # the known classes are listed


@pytest.mark.parametrize("component", ["text_encoder_2", "tokenizer", "transformer"])
def test_a_required_component_named_null_is_one_line(sd3_repo: Path, tmp_path: Path, component: str) -> None:
    (problem,), geometry = _teacher(_copy(sd3_repo, tmp_path, **{component: [None, None]}))
    assert geometry is None and "\n" not in problem
    assert problem == f"models.teacher: model_index.json names no {component} (a sd3 model needs them)"


def test_a_missing_tokenizer_folder_and_t5_without_its_tokenizer(sd3_repo: Path, tmp_path: Path) -> None:
    folder = _copy(sd3_repo, tmp_path)
    shutil.rmtree(folder / "tokenizer_2")
    (problem,), _ = _teacher(folder)
    assert "not a loadable diffusers folder (missing tokenizer_2/)" in problem
    shutil.rmtree(folder)
    (problem,), _ = _teacher(_copy(sd3_repo, tmp_path, tokenizer_3=[None, None]))
    assert problem.endswith("names text_encoder_3 but not tokenizer_3 (T5 needs both, or neither)")
    # both null is a folder without T5: fine (zeros in T5's place, as diffusers)
    shutil.rmtree(tmp_path / "teacher")
    assert _teacher(_copy(sd3_repo, tmp_path, text_encoder_3=None, tokenizer_3=[None, None]))[0] == []


def test_resolutions_the_patching_or_the_position_embeddings_cannot_take(
    sd3_repo: Path, tmp_path: Path
) -> None:
    cfg = _cfg(
        tmp_path,
        sd3_repo,
        "generation.resolution=72",
        "distillation.pairs.resolution=64",
        "evaluation.resolution=512",
    )
    gen, ev = checks.resolution_problems(cfg, _teacher(sd3_repo)[1])  # type: ignore[arg-type]
    assert gen.startswith("generation.resolution=72: must be a multiple of 16 px")
    assert "VAE factor 8 x transformer patching 2" in gen
    assert ev.startswith("evaluation.resolution=512: larger than this model takes (384 px at most")


def test_a_sampler_the_family_does_not_have(sd3_repo: Path, sd21_folder: Path, tmp_path: Path) -> None:
    (problem,) = checks.setting_problems(_cfg(tmp_path, sd3_repo, "generation.scheduler=dpmsolver++"))
    assert problem == (
        "generation.scheduler='dpmsolver++': the sd3 teacher's sampler takes one of ['flow-euler', 'euler']"
    )
    # and the other way round: the sd35 preset's sampler on an SD 2.x teacher
    (problem,) = checks.setting_problems(_cfg(tmp_path, sd21_folder))
    assert problem.startswith("generation.scheduler='flow-euler': the sd teacher's sampler takes one of")


def test_guidance_where_the_family_has_none(sd3_repo: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, sd3_repo, "generation.guidance_scale=7.0", "evaluation.teacher_guidance=1.0")
    assert SD3Family().setting_problems(cfg) == []  # classifier-free guidance: any scale

    class Unguided(SD3Family):  # a family without guidance (as FLUX.1-schnell)
        guidance = "none"

    assert Unguided().setting_problems(cfg) == [
        "generation.guidance_scale=7.0: the sd3 teacher has no guidance (set it to 1)"
    ]


def test_check_reports_every_problem_before_any_work(sd3_repo: Path, tmp_path: Path) -> None:
    """The preflight as `instaflow check --stage generate` runs it: the family's rules beside the others."""
    from tasks.preflight import run_preflight

    cfg = _cfg(tmp_path, sd3_repo, "generation.scheduler=ddim", "generation.resolution=60")
    report = run_preflight(cfg, [Stage.GENERATE])
    assert report.problems == [
        "generation.scheduler='ddim': the sd3 teacher's sampler takes one of ['flow-euler', 'euler']",
        "generation.resolution=60: must be a multiple of 16 px for this model (VAE factor 8 x transformer "
        "patching 2); e.g. 48 (native 64)",
    ]
    assert not (tmp_path / "store").exists()
