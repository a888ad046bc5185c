"""The sd15 preset as a user overrides it on the command line."""

from __future__ import annotations

import pytest

from instaflow_core.config import load


@pytest.mark.parametrize("section", ["generation", "reflow", "distillation"])
def test_mixed_precision_no_is_accelerates_word_not_false(section: str) -> None:
    """YAML 1.1 reads `no` as false: `--set reflow.mixed_precision=no` must still mean full precision."""
    cfg = load("sd15", [f"{section}.mixed_precision=no"])
    assert getattr(cfg, section).mixed_precision == "no"
    assert (
        load("sd15", [f"{section}.mixed_precision=bf16"]).model_dump()[section]["mixed_precision"] == "bf16"
    )


def test_sd15_preset_defaults_that_the_real_path_relies_on() -> None:
    cfg = load("sd15")
    assert cfg.models.teacher == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert cfg.models.save_variants is False  # saved models: full-precision safetensors only, unless asked
    assert cfg.generation.resolution is None and cfg.evaluation.resolution is None  # native: 512 px
    assert [st.loss for st in cfg.distillation.stages] == [
        "l2",
        "lpips",
    ] and cfg.distillation.lpips_weights is None
    pilot = load(
        "sd15",
        ["generation.resolution=256", "distillation.pairs.resolution=256", "evaluation.resolution=256"],
    )
    assert (
        pilot.generation.resolution
        == pilot.distillation.pairs.resolution
        == pilot.evaluation.resolution
        == 256
    )
