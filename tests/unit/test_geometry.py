"""Model geometry and the resolution settings: latents = resolution / VAE factor, sizes the UNet divides."""

from __future__ import annotations

import pytest

from instaflow_core.config import TinyModelConfig, load
from instaflow_core.errors import ConfigError
from instaflow_core.generation.triplets import PairsJob, SolverSpec, triplet_id
from instaflow_core.models.geometry import Geometry, tiny_geometry

# unet/config.json and vae/config.json of stable-diffusion-v1-5 (the keys the geometry reads)
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
}
SD15_VAE = {"block_out_channels": [128, 256, 512, 512]}


def test_sd15_geometry_and_resolutions() -> None:
    g = Geometry.from_configs(SD15_UNET, SD15_VAE)
    assert g == Geometry(4, (64, 64), 8, 8) and g.native_resolution == 512
    assert g.latent_shape() == (4, 64, 64)
    assert g.latent_shape(256) == (4, 32, 32) and g.latent_shape(64) == (4, 8, 8)
    assert g.latent_shape(768) == (4, 96, 96)
    assert g.problem(512) is None and g.problem(None) is None
    for bad in (500, 520, 32):  # not a multiple of 8 px / latents not divisible by the UNet's 8
        assert "multiple of 64 px" in g.problem(bad, "generation.resolution")
        with pytest.raises(ConfigError, match=f"generation.resolution={bad}"):
            g.latent_shape(bad, "generation.resolution")
    assert g.resolution_of((4, 32, 32)) == 256
    assert g.latent_problem((4, 32, 32)) is None
    assert "channels" in g.latent_problem((8, 32, 32))
    assert "down-sampling by 8" in g.latent_problem((4, 12, 12))


@pytest.mark.parametrize(
    "tiny",
    [
        TinyModelConfig(),
        TinyModelConfig(sample_size=4, unet_channels=[32, 32, 64], vae_channels=[32, 64, 64]),
    ],
)
def test_tiny_geometry_matches_the_built_model(tiny: TinyModelConfig) -> None:
    """The preflight reads the tiny teacher's geometry from its config: it must be what build_tiny makes."""
    from instaflow_core.models.sd import build_tiny

    model = build_tiny(tiny)
    assert tiny_geometry(tiny) == model.geometry()
    assert tiny_geometry(tiny).latent_shape(None) == model.latent_shape()


def test_resolution_settings_reach_the_jobs_and_the_ids() -> None:
    cfg = load(
        "tiny", ["generation.resolution=32", "distillation.pairs.resolution=16", "evaluation.resolution=32"]
    )
    gen, pairs = PairsJob.from_generation(cfg.generation), PairsJob.from_distill_pairs(cfg.distillation.pairs)
    assert gen.pairs.resolution == gen.solver.resolution == 32
    assert pairs.solver.resolution == 16 and cfg.evaluation.resolution == 32
    native = SolverSpec(steps=4, guidance=5.0)
    # the native resolution leaves the ids of existing tables alone; an explicit one makes new ids
    assert "resolution" not in native.settings()
    assert triplet_id("p", 1, "t", native) != triplet_id(
        "p", 1, "t", native.model_copy(update={"resolution": 32})
    )
    with pytest.raises(ConfigError, match="generation.resolution"):
        load("tiny", ["generation.resolution=4"])  # below the minimum of 8 px
