"""Quality during training, in the loop: the evaluator runs at step 0, every `every_steps` and at the end, on the
EMA weights; its points are checkpointed and resume without gaps or duplicates; it changes no weight; its cost
is timed. The config section: per-stage steps, off by default and out of the hashes while off."""

from __future__ import annotations

import pytest
import torch

from instaflow_core.config import DuringTrainingConfig, EvaluationConfig, TrainConfig, TrainStageConfig, load
from instaflow_core.errors import ConfigError
from instaflow_core.experiments.gmm import MLPVelocity, make_mixture, noise_data_batches, reflow_loss_fn
from instaflow_core.training import train

MIX = make_mixture(dim=2, num_classes=2, modes_per_class=2)
LOSS = reflow_loss_fn(null_class=2, p_uncond=0.2)  # draws from the global RNG: evaluating must not shift it


def net(seed: int = 0) -> MLPVelocity:
    torch.manual_seed(seed)
    return MLPVelocity(2, 2, hidden=16, depth=2, t_freqs=2)


def cfg(**kw) -> TrainConfig:
    base = dict(
        stages=[TrainStageConfig(steps=7, batch_size=8, micro_batch_size=4)],
        lr=1e-2,
        warmup_steps=2,
        ema_decay=0.5,
        checkpoint_every=4,
        log_every=1,
        seed=3,
    )
    base.update(kw)
    return TrainConfig(**base)


class Probe:
    """An evaluator: the EMA's weight norm (a number that moves), drawing from every global RNG on purpose."""

    def __init__(self, every: int) -> None:
        self.every_steps = every
        self.calls: list[int] = []

    def __call__(self, step: int, ema_module: torch.nn.Module) -> dict:
        self.calls.append(step)
        torch.rand(100)  # what a sampler drawing from the global RNG would do
        assert not ema_module.training and not torch.is_grad_enabled()
        norm = torch.cat([p.flatten() for p in ema_module.parameters()]).norm()
        return {"fid": float(norm), "clip_score": 0.5}


def weights(m: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_points_at_zero_every_n_and_the_end_and_no_weight_changes(tmp_path):
    plain = net()
    ref = train(plain, noise_data_batches(MIX, seed=1), LOSS, cfg(), str(tmp_path / "plain"))
    probe, seen = Probe(every=3), []
    model = net()
    res = train(
        model, noise_data_batches(MIX, seed=1), LOSS, cfg(), str(tmp_path / "eval"),
        evaluator=probe, on_eval=seen.append,
    )  # fmt: skip
    assert probe.calls == [0, 3, 6, 7]  # the start, every 3 steps, the last step
    assert [r["step"] for r in seen] == [0, 3, 6, 7] == [p["step"] for p in res.curve["points"]]
    assert torch.equal(weights(model), weights(plain)), "evaluating changed the training"
    assert [h["loss"] for h in res.history] == [h["loss"] for h in ref.history]
    for r in seen:
        assert {"fid", "clip_score", "eval_s", "cost_share"} <= set(r) and 0 <= r["cost_share"] <= 1
    assert res.curve["eval_s"] > 0 and res.curve["train_s"] > 0
    final_share = res.curve["eval_s"] / (res.curve["eval_s"] + res.curve["train_s"])
    assert seen[-1]["cost_share"] >= final_share  # the last checkpoint's write is training time after it
    # the EMA, not the live weights, is what gets evaluated (decay 0.5: they differ after a step)
    assert seen[-1]["fid"] == pytest.approx(float(weights(res.ema_model).norm()), rel=1e-6)
    off = train(
        net(), noise_data_batches(MIX, seed=1), LOSS, cfg(), str(tmp_path / "off"), evaluator=Probe(0)
    )
    assert off.curve["points"] == []  # every_steps 0: off


class Crash(Exception):
    pass


def test_a_killed_run_resumes_its_curve_without_gaps_or_duplicates(tmp_path):
    """Crash after the step-4 checkpoint (in step 6's loss): the rerun resumes at 4 and redoes exactly the
    points the checkpoint lacks; the checkpointed points and timing carry on."""
    whole = train(
        net(), noise_data_batches(MIX, seed=1), LOSS, cfg(), str(tmp_path / "whole"), evaluator=Probe(2)
    )
    calls = {"n": 0}

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == 11:  # 2 micro-batches a step: step 6's first
            raise Crash("killed")
        return LOSS(model, batch)

    first, ckpt = [], str(tmp_path / "killed")
    with pytest.raises(Crash):
        train(
            net(),
            noise_data_batches(MIX, seed=1),
            crashing,
            cfg(),
            ckpt,
            evaluator=Probe(2),
            on_eval=first.append,
        )
    assert [r["step"] for r in first] == [0, 2, 4]
    again, probe = [], Probe(2)
    res = train(
        net(), noise_data_batches(MIX, seed=1), LOSS, cfg(), ckpt, evaluator=probe, on_eval=again.append
    )
    assert probe.calls == [6, 7]  # 0, 2, 4 are in the step-4 checkpoint: not redone, not missing
    steps = [p["step"] for p in res.curve["points"]]
    assert steps == [0, 2, 4, 6, 7] == [p["step"] for p in whole.curve["points"]]
    assert [p["fid"] for p in res.curve["points"]] == pytest.approx([p["fid"] for p in whole.curve["points"]])
    assert res.curve["eval_s"] > sum(r["eval_s"] for r in again)  # the killed run's evaluations count too


def test_the_section_is_off_by_default_and_per_stage():
    tiny = load("tiny")
    assert tiny.evaluation.during_training.every("reflow") == 0
    assert "during_training" not in tiny.evaluation.model_dump()  # existing evaluation hashes unchanged
    on = load("tiny", ["evaluation.during_training.every_steps={reflow: 10, distillation: 2}"])
    dt = on.evaluation.during_training
    assert (dt.every("pretraining"), dt.every("reflow"), dt.every("distillation")) == (0, 10, 2)
    assert DuringTrainingConfig(every_steps=5).every("distillation") == 5
    assert "during_training" in on.evaluation.model_dump()
    assert EvaluationConfig.model_validate(on.evaluation.model_dump()) == on.evaluation
    with pytest.raises(ConfigError) as err:
        load("tiny", ["evaluation.during_training.every_steps={reflw: 10}"])
    assert "\n" not in str(err.value) and "reflw" in str(err.value)
    digits = load("digits").evaluation.during_training
    assert min(digits.every(s) for s in ("pretraining", "reflow", "distillation")) > 0
