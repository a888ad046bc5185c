"""The "beyond the paper" training options, per stage: U-shaped timesteps (2-RF++), caption dropout, init
from scratch, and the paper's claims as checks on evaluation rows."""

from __future__ import annotations

import pytest
import torch

from instaflow_core.config import TrainConfig
from instaflow_core.errors import ConfigError
from instaflow_core.evaluation.paper_table import labelled_grid, paper_checks, paper_table
from instaflow_core.rectified_flow import sample_t
from instaflow_core.training.losses import drop_captions


def test_u_shaped_timesteps_put_mass_at_both_ends():
    t = sample_t(200_000, "u_shaped", torch.Generator().manual_seed(0))
    hist = torch.histc(t, bins=10, min=0, max=1) / len(t)
    assert 0 <= t.min() and t.max() <= 1
    assert hist[0] > 2.5 * hist[4] and hist[9] > 2.5 * hist[5]  # U-shaped
    assert abs(float(t.mean()) - 0.5) < 0.01  # symmetric
    # the density exp(4t) + exp(4(1-t)), normalised: the first bin's mass, computed in closed form
    a = 4.0
    z = 2 * (torch.e**a - 1) / a
    first = ((torch.e ** (0.1 * a) - 1) / a + (torch.e**a - torch.e ** (0.9 * a)) / a) / z
    assert abs(float(hist[0]) - float(first)) < 0.005
    assert torch.equal(t, sample_t(200_000, "u_shaped", torch.Generator().manual_seed(0)))  # seeded
    with pytest.raises(ConfigError, match="u_shaped"):
        sample_t(4, "beta")


def test_every_stage_can_pick_its_recipe():
    cfg = TrainConfig(
        stages=[{"steps": 1, "batch_size": 1}],
        t_schedule="u_shaped",
        caption_dropout=0.1,
        init_from="scratch",
    )
    assert cfg.t_schedule == "u_shaped" and cfg.caption_dropout == 0.1 and cfg.init_from == "scratch"
    with pytest.raises(ValueError):
        TrainConfig(stages=[{"steps": 1, "batch_size": 1}], caption_dropout=1.0)


def test_caption_dropout_is_seeded_and_about_the_share():
    prompts = [f"digit {i % 10}" for i in range(10_000)]
    a = drop_captions(prompts, 0.1, torch.Generator().manual_seed(3))
    b = drop_captions(prompts, 0.1, torch.Generator().manual_seed(3))
    assert a == b and abs(a.count("") / len(a) - 0.1) < 0.01
    assert all(x in ("", p) for x, p in zip(a, prompts, strict=True))
    g = torch.Generator().manual_seed(3)
    assert drop_captions(prompts, 0.0, g) is prompts and torch.equal(
        g.get_state(), torch.Generator().manual_seed(3).get_state()
    )


def test_init_from_scratch_keeps_the_architecture_not_the_weights():
    from instaflow_core.experiments.digits.model import FAMILY, DigitsVelocityNet

    net = DigitsVelocityNet(hidden_size=32, cond_dim=16)
    with torch.no_grad():
        net.proj_in.weight.fill_(0.5)
    a, b = FAMILY.fresh_denoiser(net, 1), FAMILY.fresh_denoiser(net, 1)
    assert type(a) is DigitsVelocityNet and dict(a.config) == dict(net.config)
    assert not torch.equal(a.proj_in.weight, net.proj_in.weight)
    assert torch.equal(a.proj_in.weight, b.proj_in.weight)  # seeded


def _row(name: str, steps: int, fd: float, straight: float | None = None) -> dict:
    kind = name.split("_")[0]
    return {"name": name, "steps": steps, "fid": fd, "clip_score": 0.99, "straightness": straight, "model_kind": kind,
            "networks": {"fid_metric": "FD (digits classifier)", "clip_metric": "prompt alignment"}}  # fmt: skip


def test_the_paper_table_and_its_claims():
    rows = [
        _row("1rf_1step", 1, 3.9, 0.08), _row("1rf_25step", 25, 0.6, 0.08),
        _row("2rf_1step", 1, 0.9, 0.01), _row("2rf_25step", 25, 0.7, 0.01),
        _row("instaflow_1step", 1, 1.1), _row("control_1step", 1, 2.0),
    ]  # fmt: skip
    table = paper_table(rows, {"floor": 0.4})
    assert [r["model"] for r in table][0] == "1-RF (teacher)" and table[-1][
        "model"
    ] == "real train images (floor)"
    assert "FD (digits classifier)" in table[0] and "FID" not in table[0]
    assert table[0]["straightness"] == 0.08 and table[1]["straightness"] is None  # once per flow
    checks = paper_checks(rows)
    assert [c["holds"] for c in checks] == [True, True, True, True]
    worse = paper_checks([*rows[:-1], _row("control_1step", 1, 1.0)])
    assert worse[-1]["holds"] is False


def test_the_labelled_grid_has_a_row_per_model():
    rows = [torch.zeros(10, 8, 8, 3, dtype=torch.uint8).numpy() for _ in range(4)]
    img = labelled_grid(
        rows, ["teacher 25-step", "1-RF 1-step", "2-RF 1-step", "InstaFlow 1-step"], list("0123456789")
    )
    assert img.dtype.name == "uint8" and img.shape[2] == 3
    assert img.shape[0] > 4 * 48 and img.shape[1] > 10 * 48
