"""The time convention, guidance, sampling, straightness and losses of instaflow_core.rectified_flow."""

from __future__ import annotations

import math

import pytest
import torch

from instaflow_core import rectified_flow as rf
from instaflow_core.errors import ConfigError


class PairFlow:
    """The exact velocity of the straight path between a fixed pair: v = x1 - x0 everywhere."""

    def __init__(self, x0: torch.Tensor, x1: torch.Tensor) -> None:
        self.v = x1 - x0
        self.calls: list[tuple] = []

    def __call__(self, x, t, cond):
        self.calls.append((x.shape, t.clone(), cond))
        return self.v.expand_as(x).clone()


class Rotation:
    """v(x) = A x with A a 90 degree rotation: circular (curved) trajectories."""

    def __call__(self, x, t, cond):
        return torch.stack([-x[:, 1], x[:, 0]], dim=1)


# ------------------------------------------------------------------------------------------- convention
def test_interpolation_endpoints_and_middle():
    x0, x1 = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.equal(rf.interpolate(x0, x1, torch.zeros(3)), x0)  # t=0 is noise
    assert torch.allclose(rf.interpolate(x0, x1, torch.ones(3)), x1)  # t=1 is data
    t = torch.tensor([0.0, 0.25, 1.0])
    xt = rf.interpolate(x0, x1, t)
    assert torch.allclose(xt[1], 0.25 * x1[1] + 0.75 * x0[1])  # t broadcast per row
    assert torch.allclose(rf.interpolate(x0, x1, 0.5), 0.5 * (x0 + x1))
    assert torch.equal(rf.velocity_target(x0, x1), x1 - x0)


def test_unet_timestep_is_1000_at_noise():
    from instaflow_core.models.sd import unet_timestep  # the SD family's mapping of our t

    assert float(unet_timestep(0.0)) == 1000.0
    assert float(unet_timestep(1.0)) == 0.0
    assert float(unet_timestep(torch.tensor(1))) == 0.0  # integer t: still a float timestep
    tau = unet_timestep(torch.tensor([0.0, 0.25, 1.0]))
    assert tau.dtype.is_floating_point
    assert torch.allclose(tau, torch.tensor([1000.0, 750.0, 0.0]))


def test_exact_velocity_gives_exact_endpoint_in_one_step():
    x0, x1 = torch.randn(5, 3), torch.randn(5, 3)
    flow = PairFlow(x0, x1)
    out = rf.euler_sample(flow, x0, None, steps=1)
    assert torch.allclose(out, x1, atol=1e-6)
    t_seen = flow.calls[0][1]
    assert torch.equal(t_seen, torch.zeros(5))  # the one step is taken at t = 0 (noise)


def test_euler_times_and_trajectory():
    x0, x1 = torch.randn(2, 3), torch.randn(2, 3)
    flow = PairFlow(x0, x1)
    out, traj = rf.euler_sample(flow, x0, "c", steps=4, return_trajectory=True)
    assert [float(c[1][0]) for c in flow.calls] == [0.0, 0.25, 0.5, 0.75]  # t_i = i / N
    assert traj.shape == (5, 2, 3)
    assert torch.equal(traj[0], x0) and torch.equal(traj[-1], out)
    assert torch.allclose(traj[2], rf.interpolate(x0, x1, 0.5), atol=1e-6)
    assert all(c[2] == "c" for c in flow.calls)


@pytest.mark.parametrize("schedule", ["uniform", "logit_normal", "cosmap"])
def test_sample_t_range_and_reproducible(schedule):
    t1 = rf.sample_t(2000, schedule, torch.Generator().manual_seed(3))
    t2 = rf.sample_t(2000, schedule, torch.Generator().manual_seed(3))
    assert t1.shape == (2000,) and torch.equal(t1, t2)
    assert float(t1.min()) >= 0.0 and float(t1.max()) <= 1.0
    assert abs(float(t1.mean()) - 0.5) < 0.03  # all three are symmetric about 1/2
    if schedule != "uniform":  # mass concentrated in the middle
        assert float(((t1 > 0.25) & (t1 < 0.75)).float().mean()) > 0.55


def test_sample_t_unknown_schedule():
    with pytest.raises(ConfigError, match="t_schedule"):
        rf.sample_t(4, "bogus")


# ------------------------------------------------------------------------------------------- guidance
class CountingModel:
    """v = x * scale(cond); records the batch of every forward."""

    def __init__(self):
        self.batches: list[int] = []

    def __call__(self, x, t, cond):
        self.batches.append(x.shape[0])
        return x * (cond.float() + 1.0)[:, None]


def test_guidance_at_most_one_is_cond_only():
    m, x, t = CountingModel(), torch.randn(3, 2), torch.zeros(3)
    cond, uncond = torch.tensor([1, 2, 3]), torch.tensor([0])
    for w in (0.0, 1.0):
        v = rf.guided_velocity(m, x, t, cond, uncond, guidance=w)
        assert torch.allclose(v, x * (cond.float() + 1)[:, None])
    assert m.batches == [3, 3]


def test_guidance_formula_in_one_forward():
    m, x, t = CountingModel(), torch.randn(3, 2), torch.rand(3)
    cond, uncond = torch.tensor([1, 2, 3]), torch.tensor([0])  # uncond of batch 1 is broadcast
    w = 2.5
    v = rf.guided_velocity(m, x, t, cond, uncond, guidance=w)
    v_c, v_u = x * (cond.float() + 1)[:, None], x * 1.0
    assert torch.allclose(v, v_u + w * (v_c - v_u))
    assert m.batches == [6]  # one forward on the doubled batch


def test_guidance_batches_embeddings_and_needs_uncond():
    seen = {}

    def model(x, t, cond):
        seen["cond"], seen["t"] = cond, t
        return torch.zeros_like(x)

    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.1, 0.2])
    cond, uncond = torch.randn(2, 77, 32), torch.randn(1, 77, 32)
    rf.guided_velocity(model, x, t, cond, uncond, guidance=1.5)
    assert seen["cond"].shape == (4, 77, 32)
    assert torch.equal(seen["cond"][0], uncond[0]) and torch.equal(seen["cond"][2:], cond)  # [uncond; cond]
    assert torch.equal(seen["t"], torch.tensor([0.1, 0.2, 0.1, 0.2]))
    with pytest.raises(ValueError, match="uncond"):
        rf.guided_velocity(model, x, t, cond, None, guidance=2.0)


def test_guidance_in_the_sampler():
    m = CountingModel()
    x0 = torch.randn(4, 2)
    rf.euler_sample(
        m, x0, torch.ones(4, dtype=torch.long), 3, guidance=2.0, uncond=torch.zeros(1, dtype=torch.long)
    )
    assert m.batches == [8, 8, 8]


# ------------------------------------------------------------------------------------------- straightness
def test_straightness_straight_flow_is_zero_and_curved_is_not():
    x0, x1 = torch.randn(16, 2), torch.randn(16, 2)
    assert rf.straightness(PairFlow(x0, x1), x0, None, steps=8) < 1e-10
    s = rf.straightness(Rotation(), x0, None, steps=256)
    # one radian of a circle of radius r: chord 2 r sin(1/2) along the tangent at the middle, |v| = r at
    # angle (t - 1/2) to it, so S = r^2 (1 - 4 sin^2(1/2)) per sample, i.e. that times mean(x0^2) per element
    exact = (1 - 4 * math.sin(0.5) ** 2) * float((x0**2).mean())
    assert s == pytest.approx(exact, rel=0.03)


def test_straightness_hand_computed():
    # v(x, t) = 1 for t < 1/2 and 3 after: Euler N=2 from 0 -> Z1 = 2, chord 2, S = ((2-1)^2 + (2-3)^2)/2 = 1
    def model(x, t, cond):
        return torch.where(t[:, None] < 0.5, torch.ones_like(x), 3 * torch.ones_like(x))

    assert math.isclose(rf.straightness(model, torch.zeros(3, 1), None, steps=2), 1.0)


# ------------------------------------------------------------------------------------------- losses
def test_reflow_loss_l2_hand_computed():
    x0, x1 = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 4.0]])
    seen = {}

    def model(xt, t, cond):
        seen["xt"], seen["t"] = xt, t
        return torch.tensor([[1.0, 1.0]])

    loss = rf.reflow_loss(model, x0, x1, None, torch.tensor([0.5]))
    assert torch.allclose(seen["xt"], torch.tensor([[1.0, 2.0]]))  # X_t at t = 1/2
    assert math.isclose(float(loss), ((2 - 1) ** 2 + (4 - 1) ** 2) / 2)  # mean over elements


def test_pseudo_huber_hand_computed():
    pred, target = torch.tensor([[3.0, 0.0, 0.0, 0.0]]), torch.tensor([[0.0, 4.0, 0.0, 0.0]])
    c = 0.5 * math.sqrt(4)  # scaled by sqrt(dim)
    expected = math.sqrt(25 + c * c) - c
    assert math.isclose(
        float(rf.pair_loss(pred, target, "pseudo_huber", huber_c=0.5)), expected, rel_tol=1e-6
    )
    assert float(rf.pair_loss(target, target, "pseudo_huber")) == 0.0
    with pytest.raises(ConfigError):
        rf.pair_loss(pred, target, "nope")


def test_distill_loss_one_step_at_t0():
    x0, x1 = torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0, 1.0]])
    seen = {}

    def model(x, t, cond):
        seen["t"], seen["x"] = t, x
        return torch.tensor([[1.0, 0.0]])

    loss = rf.distill_loss(model, x0, x1, None, "l2")
    assert torch.equal(seen["t"], torch.zeros(1)) and torch.equal(seen["x"], x0)
    assert math.isclose(float(loss), ((3 - 2) ** 2 + 0) / 2)  # pred = x0 + v = (2, 1)


def test_distill_lpips_decodes_both_and_needs_callables():
    x0, x1 = torch.zeros(2, 1), torch.ones(2, 1)

    def model(x, t, cond):
        return torch.full_like(x, 0.5)

    calls = []

    def decode(z):
        calls.append(z.clone())
        return z * 10

    def lpips(a, b):
        return (a - b).abs().flatten(1).mean(1)

    loss = rf.distill_loss(model, x0, x1, None, "lpips", decode=decode, lpips=lpips)
    assert len(calls) == 2 and math.isclose(float(loss), 5.0)
    with pytest.raises(ConfigError, match="lpips"):
        rf.distill_loss(model, x0, x1, None, "lpips")


def test_k_step_distill_has_gradients_through_all_steps():
    lin = torch.nn.Linear(2, 2)

    def model(x, t, cond):
        return lin(x)

    loss = rf.k_step_distill_loss(model, torch.randn(4, 2), torch.randn(4, 2), None, k=3)
    loss.backward()
    assert lin.weight.grad is not None and float(lin.weight.grad.abs().sum()) > 0


def test_noise_is_a_seed_row_by_row():
    """Row i is exactly what a fresh CPU generator seeded with seeds[i] draws, whatever the batch around it."""
    seeds = [0, 1, 2**62 + 5]
    x0 = rf.noise_from_seeds(seeds, (4, 3, 3))
    for i, s in enumerate(seeds):
        assert torch.equal(x0[i], torch.randn((4, 3, 3), generator=torch.Generator().manual_seed(s)))
    assert torch.equal(rf.noise_from_seeds(seeds[1:2], (4, 3, 3))[0], x0[1])
    assert rf.noise_from_seeds([], (4, 3, 3)).shape == (0, 4, 3, 3)
