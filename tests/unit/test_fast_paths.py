"""The GPU fast paths, checked on the CPU: each switch reaches the module that owns it (the UNet, not a wrapper),
changes speed and nothing else, and the off path is the old behaviour.

Covered: `models/switches.py` (set / read back on the UNet, compile in place), `training.train`'s set-up (the
student's UNet gets checkpointing, classic attention, channels_last and compile; TrainResult says so), fused
AdamW by config, the foreach EMA (and a compiled UNet's EMA copy running its own weights), the pinned
prefetching loader (same data order and the same loss curve as inline reading, resume included), the async
latent writer (in order, exactly once, errors surface, nothing written after a failure) inside the
`ShardWorker`, the teacher solver's options (`make_solver`'s switches, `teacher_latents`' cfg_batched /
out_device), and `inference.fast.speed_up`.
"""

from __future__ import annotations

import copy
import logging
import threading
import time

import lancedb
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from instaflow_core.config import GenerationConfig, TrainConfig, TrainStageConfig
from instaflow_core.errors import ConfigError
from instaflow_core.experiments.gmm import MLPVelocity, make_mixture, noise_data_batches, reflow_loss_fn
from instaflow_core.generation.shards import ShardWorker
from instaflow_core.generation.solvers import make_solver, teacher_latents
from instaflow_core.generation.triplets import PairsJob, SolverSpec, expand_jobs, triplet_schema
from instaflow_core.generation.writer import AsyncLatentWriter
from instaflow_core.inference.fast import speed_up
from instaflow_core.inference.pipeline import InstaFlowPipeline
from instaflow_core.models.switches import drop_compiled, perf_flags, set_switches, switch_on
from instaflow_core.training import train
from instaflow_core.training.ema import EMA
from instaflow_core.training.losses import reflow_batch_loss
from instaflow_core.training.prefetch import PinnedPrefetcher
from instaflow_core.training.setup import build_optimizer, make_adamw
from instaflow_core.training.student import ConditionCache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MIX = make_mixture(dim=2, num_classes=2, modes_per_class=2)
LOSS = reflow_loss_fn(null_class=2, p_uncond=0.2)
PROMPTS, SEEDS = ["a red car", "a cat", "a tree"], [3, 1, 4]


def _conv_channels_last(unet: torch.nn.Module) -> bool:
    return unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------ config
def test_switch_values_and_auto():
    assert (
        switch_on("auto", "cuda")
        and not switch_on("auto", "cpu")
        and not switch_on("auto", torch.device("meta"))
    )
    assert switch_on(True, "cpu") and not switch_on(False, "cuda")
    gen = GenerationConfig(compile="auto", channels_last=True, async_write=False)
    assert (gen.compile, gen.channels_last, gen.async_write, gen.cfg_batched) == ("auto", True, False, True)
    job = PairsJob.from_generation(gen)
    assert (job.compile, job.channels_last, job.async_write, job.cfg_batched) == ("auto", True, False, True)
    stages = [TrainStageConfig(steps=1, batch_size=1)]
    c = TrainConfig(stages=stages)
    assert (c.tf32, c.channels_last, c.compile, c.adamw, c.prefetch, c.sdpa) == (
        "auto",
        "auto",
        False,
        "auto",
        "auto",
        True,
    )
    with pytest.raises(ValueError):
        TrainConfig(stages=stages, channels_last="maybe")
    with pytest.raises(ValueError):
        TrainConfig(stages=stages, adamw="sgd")
    # a speed switch never enters the triplet id (the solver settings do)
    assert PairsJob.from_generation(GenerationConfig(cfg_batched=False)).solver == job.solver


# ------------------------------------------------------------------------------------------ the UNet's own flags
def test_switches_live_on_the_unet_and_keep_its_output(tiny):
    unet = copy.deepcopy(tiny.denoiser)
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([500.0]), torch.randn(2, 77, 32)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=cond).sample
    before = perf_flags(unet)
    assert before == {"sdpa": True, "channels_last": False, "gradient_checkpointing": False, "compile": False}
    got = set_switches(unet, sdpa=False, channels_last=True, gradient_checkpointing=True)
    assert got == {"sdpa": False, "channels_last": True, "gradient_checkpointing": True}
    assert unet.is_gradient_checkpointing and _conv_channels_last(unet)
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=cond).sample, ref, rtol=1e-4, atol=1e-5)
    assert set_switches(unet, sdpa=True, channels_last=False, gradient_checkpointing=False) == {
        "sdpa": True,
        "channels_last": False,
        "gradient_checkpointing": False,
    }
    same = unet
    assert set_switches(unet, compile=True, compile_backend="eager") == {"compile": True}
    assert unet is same and unet.dtype == torch.float32 and unet.config.sample_size == 8  # no wrapper
    assert set(unet.state_dict()) == set(tiny.denoiser.state_dict())  # no _orig_mod. prefix
    assert set_switches(unet, compile=False) == {"compile": False}
    # a module without the switch says so (None) instead of pretending
    assert set_switches(torch.nn.Linear(2, 2), sdpa=False, gradient_checkpointing=True) == {
        "sdpa": None,
        "gradient_checkpointing": None,
    }


def _student_cfg(**kw) -> TrainConfig:
    base = dict(stages=[TrainStageConfig(steps=1, batch_size=2)], lr=1e-4, warmup_steps=0, checkpoint_every=1)
    return TrainConfig(**(base | kw))


def _sd_batches(tiny):
    g = torch.Generator().manual_seed(0)
    return [
        {"x0": torch.randn(2, 4, 8, 8, generator=g), "x1": torch.randn(2, 4, 8, 8, generator=g),
         "prompt": ["a cat", "a dog"], "triplet_id": [f"a{i}", f"b{i}"]}
        for i in range(4)
    ]  # fmt: skip


def test_train_setup_sets_the_switches_on_the_students_unet(tiny, tmp_path, caplog):
    """sd15.yaml's gradient_checkpointing / sdpa=false / channels_last / compile reach `student.unet` (the
    family `Velocity` holds the denoiser under its component name)."""
    comps = copy.deepcopy(tiny)
    comps.denoiser.requires_grad_(True).train()  # what TrainJob.run does with the student's denoiser
    student = comps.velocity()
    assert student.unet is comps.denoiser
    loss = reflow_batch_loss(ConditionCache(comps))
    cfg = _student_cfg(gradient_checkpointing=True, sdpa=False, channels_last=True)
    with caplog.at_level(logging.INFO, logger="instaflow.training"):
        res = train(student, _sd_batches(tiny), loss, cfg, str(tmp_path / "ck"))
    unet = student.unet
    assert unet.is_gradient_checkpointing and _conv_channels_last(unet)
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())
    assert res.switches == {
        "sdpa": False,
        "channels_last": True,
        "gradient_checkpointing": True,
        "compile": False,
        "tf32": False,
    }
    assert (
        "switches on UNet2DConditionModel (cpu): sdpa=False, channels_last=True, gradient_checkpointing=True"
        in (caplog.text)
    )
    assert res.steps == 1 and np.isfinite(res.final_loss)
    # the EMA copy carries the same memory format; the checkpoint and the saved folder take NHWC weights
    assert _conv_channels_last(res.ema_model.unet)
    res.ema_model.unet.save_pretrained(tmp_path / "unet", safe_serialization=True)

    # compile=true on the same checkpoint: set-up compiles the UNet in place (the finished run does not step,
    # so nothing is traced here) and the EMA copy made after it runs its own, eager, weights
    cfg_c = cfg.model_copy(update={"compile": True})
    again = train(student, _sd_batches(tiny), loss, cfg_c, str(tmp_path / "ck"))
    assert again.steps == 1 and perf_flags(student.unet)["compile"] and again.switches["compile"] is True
    assert perf_flags(again.ema_model.unet)["compile"] is False
    set_switches(student.unet, compile=False)


def test_auto_switches_are_off_on_cpu_and_missing_ones_are_reported(tmp_path, caplog):
    model = MLPVelocity(2, 2, hidden=8, depth=1, t_freqs=2)
    cfg = _student_cfg(gradient_checkpointing=True, compile="auto", channels_last="auto", tf32="auto")
    with caplog.at_level(logging.INFO, logger="instaflow.training"):
        res = train(model, noise_data_batches(MIX), LOSS, cfg, str(tmp_path / "a"))
    assert res.switches == {"compile": False, "tf32": False}
    assert "asked for but not applicable to this module: gradient_checkpointing" in caplog.text


# ------------------------------------------------------------------------------------------ optimizer, EMA
def test_adamw_impls_agree_and_auto_is_fused_on_cuda():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    outs = {}
    for impl in ("fused", "foreach", "for-loop", "auto"):
        m = copy.deepcopy(base)
        opt = make_adamw(list(m.parameters()), impl=impl, lr=1e-2, weight_decay=0.01)
        for _ in range(3):
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        outs[impl] = m.weight.detach().clone()
    assert make_adamw(list(base.parameters()), impl="auto").defaults["impl"] == "default"  # CPU: torch's own
    for impl in ("fused", "foreach", "auto"):
        torch.testing.assert_close(outs[impl], outs["for-loop"], rtol=1e-5, atol=1e-6)
    # what training builds: `auto` decides by the training device (the parameters are moved there later)
    cfg = _student_cfg()
    opt = build_optimizer(base, cfg, torch.device("cuda"))
    assert opt.defaults["impl"] == "fused" and opt.defaults["fused"] is True
    assert build_optimizer(base, cfg.model_copy(update={"adamw": "foreach"})).defaults["foreach"] is True
    with pytest.raises(ConfigError, match="adamw"):
        make_adamw(list(base.parameters()), impl="sgd")


def test_ema_is_one_foreach_update_equal_to_the_per_tensor_formula(tiny):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    ema = EMA(model, 0.9)
    ref = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for e, r, p in zip(ema.model.parameters(), ref, model.parameters(), strict=True):
        torch.testing.assert_close(e, 0.9 * r + 0.1 * p.detach())
    # an EMA of a UNet compiled in place must not call the live module's compiled graph
    unet = copy.deepcopy(tiny.denoiser)
    set_switches(unet, compile=True, compile_backend="eager")
    copied = EMA(unet, 0.9).model
    assert perf_flags(copied)["compile"] is False and perf_flags(unet)["compile"] is True
    assert drop_compiled(unet) is unet and perf_flags(unet)["compile"] is False


# ------------------------------------------------------------------------------------------ prefetching loader
def test_prefetcher_yields_all_in_order_and_stops():
    src = [{"x": torch.full((2,), float(i)), "prompt": [f"p{i}"], "n": i} for i in range(25)]
    pf = PinnedPrefetcher(iter(src), "cpu", depth=2)
    got = list(pf)
    assert [b["n"] for b in got] == list(range(25)) and got[7]["prompt"] == ["p7"]
    assert float(got[24]["x"][0]) == 24.0 and pf.taken == 25
    pf.close()

    def failing():
        yield {"x": torch.zeros(1)}
        raise ValueError("bad row")

    pf = PinnedPrefetcher(failing(), "cpu")
    next(pf)
    with pytest.raises(ValueError, match="bad row"):
        next(pf)
    endless = PinnedPrefetcher(({"i": i} for i in iter(int, 1)), "cpu", depth=2)
    next(endless)
    endless.close()  # a producer blocked on a full queue must stop
    assert not endless._thread.is_alive()


def _mlp_cfg(**kw) -> TrainConfig:
    base = dict(
        stages=[
            TrainStageConfig(steps=4, batch_size=8, micro_batch_size=4),
            TrainStageConfig(steps=3, batch_size=12, micro_batch_size=4),
        ],
        lr=1e-2,
        warmup_steps=2,
        ema_decay=0.5,
        checkpoint_every=3,
        log_every=1,
        seed=7,
    )
    return TrainConfig(**(base | kw))


def _net() -> MLPVelocity:
    torch.manual_seed(0)
    return MLPVelocity(2, 2, hidden=16, depth=2, t_freqs=2)


def test_prefetch_gives_the_same_curve_as_inline_reading_and_resumes(tmp_path):
    batches = noise_data_batches(MIX, seed=1)
    inline = train(_net(), batches, LOSS, _mlp_cfg(prefetch=False), str(tmp_path / "a"))
    ahead = train(_net(), batches, LOSS, _mlp_cfg(prefetch=True), str(tmp_path / "b"))
    assert [r["loss"] for r in ahead.history] == [r["loss"] for r in inline.history]  # bit for bit
    assert all(0.0 <= r["data_wait_share"] <= 1.0 for r in ahead.history)
    # killed mid-run with the reader ahead of the loop: the resumed run still ends on the same curve
    calls = {"n": 0}

    def crash(model, batch):
        calls["n"] += 1
        if calls["n"] == 9:
            raise RuntimeError("killed")
        return LOSS(model, batch)

    with pytest.raises(RuntimeError, match="killed"):
        train(_net(), batches, crash, _mlp_cfg(prefetch=True), str(tmp_path / "c"))
    assert not [t for t in threading.enumerate() if t.name == "prefetch" and t.is_alive()]
    resumed = train(_net(), batches, LOSS, _mlp_cfg(prefetch=True), str(tmp_path / "c"))
    assert resumed.history[-1]["loss"] == pytest.approx(inline.history[-1]["loss"], rel=1e-6)


# ------------------------------------------------------------------------------------------ async writer
def test_async_writer_in_order_exactly_once_with_back_pressure():
    seen: list[int] = []
    gate = threading.Event()

    def write(table, rows):
        gate.wait()
        assert threading.current_thread().name.startswith("latent-writer")
        seen.append(rows)

    w = AsyncLatentWriter(write, max_pending=2)
    t = threading.Thread(target=lambda: [w(None, i) for i in range(6)])
    t.start()
    time.sleep(0.3)
    assert w.submitted == 2 and not seen  # the third call waits for a free slot
    gate.set()
    t.join()
    w.close()
    assert seen == list(range(6)) and w.written == 6
    with pytest.raises(RuntimeError, match="closed"):
        w(None, 7)


def test_async_writer_raises_the_failure_and_writes_nothing_after_it():
    seen: list[int] = []

    def write(table, rows):
        if rows == 3:
            raise OSError("disk full")
        seen.append(rows)

    w = AsyncLatentWriter(write, max_pending=2)
    with pytest.raises(OSError, match="disk full"):
        for i in range(20):
            w(None, i)
        w.flush()
    with pytest.raises(OSError, match="disk full"):
        w.close()
    assert seen == [0, 1, 2]


def _fake_solver(calls):
    def solve(prompts, seeds):
        calls.append(len(prompts))
        return np.stack([np.full((4, 2, 2), s % 100, np.float32) for s in seeds])

    return solve


@pytest.mark.parametrize("fail", [False, True])
def test_shard_worker_async_write_commits_what_the_sync_one_does(tmp_path, fail):
    solver = SolverSpec(steps=2, guidance=5.0)
    jobs = expand_jobs([(f"p{i}", f"prompt {i}") for i in range(5)], images_per_prompt=2, base_seed=0,
                       teacher="t", solver=solver)  # fmt: skip
    db = lancedb.connect(str(tmp_path))
    tables = {}
    for mode in ("sync", "async"):
        table = db.create_table(mode, schema=triplet_schema((4, 2, 2)))
        commits: list[int] = []

        def write(t, rows, commits=commits):
            if fail and len(commits) == 1:
                raise OSError("bucket gone")
            time.sleep(0.05)  # a slow store: the next batch is solved meanwhile
            t.merge_insert("triplet_id").when_matched_update_all().when_not_matched_insert_all().execute(rows)
            commits.append(rows.num_rows)

        worker = ShardWorker(table=table, solve=_fake_solver([]), teacher="t", solver=solver, batch_size=4,
                             run_id="r", write=write, async_write=mode == "async")  # fmt: skip
        if fail:
            with pytest.raises(OSError, match="bucket gone"):
                worker.run(jobs, 0, "true")
            assert commits == [4] and table.count_rows() == 4  # the batch after the failure was not written
            continue
        res = worker.run(jobs, 0, "true")
        assert (res.written, commits) == (10, [4, 4, 2])
        tables[mode] = table.to_arrow().sort_by("triplet_id")
    if not fail:
        for col in ("triplet_id", "seed", "x1"):
            assert tables["async"].column(col) == tables["sync"].column(col)


# ------------------------------------------------------------------------------------------ teacher, inference
def _teacher_job(**switches) -> PairsJob:
    gen = GenerationConfig(num_inference_steps=3, guidance_scale=5.0, compile=False, **switches)
    return PairsJob.from_generation(gen)


def test_teacher_solver_fast_path_options(tiny):
    comps = copy.deepcopy(tiny)
    ref = teacher_latents(comps, PROMPTS, SEEDS, steps=3, guidance=5.0)
    two = teacher_latents(comps, PROMPTS, SEEDS, steps=3, guidance=5.0, cfg_batched=False, out_device=None)
    assert two.device.type == "cpu" and two.dtype == torch.float32
    # two forwards: other batch shapes, other float32 summation order, amplified by guidance 5
    assert float((two - ref).norm() / ref.norm()) < 1e-5
    # the job's solver: its settings, its switches set on the denoiser itself, once
    plain = make_solver(_teacher_job(channels_last=False), comps, "cpu")
    assert not _conv_channels_last(comps.denoiser)
    assert torch.equal(plain(PROMPTS, SEEDS), ref)
    solve = make_solver(_teacher_job(channels_last=True), comps, "cpu")
    assert _conv_channels_last(comps.denoiser)
    nhwc = solve(PROMPTS, SEEDS)
    assert float((nhwc - ref).norm() / ref.norm()) < 1e-5
    unbatched = make_solver(_teacher_job(channels_last=False, cfg_batched=False), comps, "cpu")
    assert float((unbatched(PROMPTS, SEEDS) - ref).norm() / ref.norm()) < 1e-5
    # channels_last=False never turns a shared UNet back: the switch is only ever switched on here
    make_solver(_teacher_job(channels_last=False), comps, "cpu")(PROMPTS[:1], SEEDS[:1])
    assert _conv_channels_last(comps.denoiser)


def test_speed_up_sets_the_pipeline_modules(tiny):
    comps = copy.deepcopy(tiny)
    pipe = InstaFlowPipeline.from_model(comps)
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe(["a cat"], output_type="pt", generator=torch.Generator().manual_seed(0)).images

    ref = image()
    flags = speed_up(pipe)  # auto on the CPU: nothing changes
    assert not flags["unet"]["compile"] and not flags["unet"]["channels_last"] and flags["unet"]["sdpa"]
    flags = speed_up(pipe, channels_last=True, compile=True, mode=None, backend="eager")
    assert flags["unet"]["channels_last"] and flags["unet"]["compile"] and flags["vae"]["compile"]
    assert _conv_channels_last(pipe.unet) and perf_flags(pipe.vae.decoder)["compile"]
    flags = speed_up(pipe, channels_last=True, compile=False)
    assert not flags["unet"]["compile"] and not flags["vae"]["compile"]
    torch.testing.assert_close(image(), ref, rtol=1e-4, atol=1e-4)
    assert isinstance(next(iter(pipe.unet.attn_processors.values())), AttnProcessor2_0)
    # a loaded Model takes the same switches on its denoiser and VAE
    model = copy.deepcopy(tiny)
    flags = speed_up(model, channels_last=True, compile=False)
    assert flags["unet"]["channels_last"] and _conv_channels_last(model.denoiser)
    assert flags["vae"]["channels_last"] and not flags["unet"]["compile"]
