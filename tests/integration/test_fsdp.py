"""FSDP2 on two CPU processes (gloo) under `accelerate launch`: a tiny FLUX transformer sharded per block,
checkpoints of full tensors in the usual layout, an EMA that averages the full weights, an exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from instaflow_core.training.checkpoint import obj_from_bytes
from tests.integration.test_multiprocess import free_port
from tests.support import REPO
from tests.support import fsdp_worker as worker

WORKER = REPO / "tests" / "support" / "fsdp_worker.py"
STEPS = 8
CKPT_FILES = {"model.safetensors", "ema.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def launch(
    out: Path, *args: str, launcher: tuple[str, ...] = ("--multi_gpu",)
) -> subprocess.CompletedProcess:
    """`accelerate launch` the worker on 2 processes, as tasks/training.py::_launch starts a stage."""
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "PYTHONPATH": str(REPO),
        "ACCELERATE_CONFIG_FILE": str(out / "no-accelerate-config.yaml"),  # ignore any user config
    }
    cmd = [
        str(accelerate), "launch", *launcher, "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(free_port()), str(WORKER), str(out), *args,
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)


def step_files(root: Path, step: int) -> Path:
    return root / f"step-{step:09d}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Launch 1: the uninterrupted run, then a run SIGKILLed inside step KILL_STEP. Launch 2: its resume."""
    out = tmp_path_factory.mktemp("fsdp")
    killed = launch(out, "ref-then-kill")
    assert "SIGKILL" in killed.stdout + killed.stderr, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert (out / "ref-rank0.json").exists(), killed.stdout[-3000:] + killed.stderr[-3000:]
    # killed after the checkpoint of the step before, and before finishing
    assert (out / "run" / "latest").read_text() == f"step-{worker.KILL_STEP - 1:09d}"
    assert not (out / "run-rank0.json").exists()
    resumed = launch(out, "resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return out


def test_fsdp_kill_and_resume_is_exact(runs):
    ref0, ref1, got0, got1 = (
        json.loads((runs / f"{name}-rank{r}.json").read_text()) for name in ("ref", "run") for r in (0, 1)
    )
    # sharded per transformer block (found in the wrapped transformer's _no_split_modules) and at the root
    assert ref0["units"] == [
        "FSDPFluxSingleTransformerBlock", "FSDPFluxSingleTransformerBlock",
        "FSDPFluxTransformerBlock", "FSDPFluxTransformerBlock", "FSDPFluxVelocity",
    ]  # fmt: skip
    assert ref0["dtensors"] and ref0["local"] < ref0["full"] and ref0["local"] + ref1["local"] == ref0["full"]

    # the same curve, bit for bit: steps 1-3 from the checkpoint's history, 4-8 trained again after the kill
    assert got0["steps"] == ref0["steps"] == STEPS
    assert [r["step"] for r in got0["history"]] == list(range(1, STEPS + 1))
    for ref, got in zip(ref0["history"], got0["history"], strict=True):
        assert (got["loss"], got["grad_norm"], got["lr"]) == (ref["loss"], ref["grad_norm"], ref["lr"]), ref
    assert [r["loss"] for r in got1["history"]] == [r["loss"] for r in got0["history"]]  # reduced: same

    # and the same final weights, EMA and optimizer state
    run = runs / "run"
    for name in ("model.safetensors", "ema.safetensors"):
        ref_t = load_file(step_files(runs / "ref", STEPS) / name)
        got_t = load_file(step_files(run, STEPS) / name)
        assert ref_t.keys() == got_t.keys()
        assert all(torch.equal(ref_t[k], got_t[k]) for k in ref_t), name
    ref_opt, got_opt = (
        obj_from_bytes((step_files(root, STEPS) / "optimizer.pt").read_bytes())
        for root in (runs / "ref", run)
    )
    assert ref_opt["param_groups"] == got_opt["param_groups"]
    assert ref_opt["state"].keys() == got_opt["state"].keys()
    for i, entry in ref_opt["state"].items():
        assert all(torch.equal(v, got_opt["state"][i][k]) for k, v in entry.items())
    # the EMA handed back (main process only: the worker asserts None on rank 1) is the full average
    exported = load_file(runs / "run-ema.safetensors")
    last_ema = load_file(step_files(run, STEPS) / "ema.safetensors")
    assert exported.keys() == last_ema.keys() and all(torch.equal(exported[k], last_ema[k]) for k in exported)


def test_fsdp_checkpoints_are_full_tensors_and_the_ema_averages_full_weights(runs):
    ref = runs / "ref"
    plain = worker.FluxVelocity(seed=10)  # rank 0's initial weights (rank 1 started from seed 11)
    want = {k: v.clone() for k, v in plain.state_dict().items()}  # (loaded over below)

    # every step's folder holds the files a single process writes, with full (not per-rank) tensors
    for step in range(1, STEPS + 1):
        assert {p.name for p in step_files(ref, step).iterdir()} == CKPT_FILES
    last = step_files(ref, STEPS)
    model = load_file(last / "model.safetensors")
    assert model.keys() == want.keys()
    assert all(model[k].shape == want[k].shape for k in want)
    state = json.loads((last / "state.json").read_text())
    assert state["world_size"] == 2 and state["fsdp"] is True and state["step"] == STEPS
    assert len(obj_from_bytes((last / "rng.pt").read_bytes())) == 2
    # loadable without FSDP: the model, and the optimizer state in optimizer.state_dict()'s index layout
    plain.load_state_dict(model)
    opt = torch.optim.AdamW(plain.parameters(), lr=1.0)
    opt.load_state_dict(obj_from_bytes((last / "optimizer.pt").read_bytes()))
    assert len(opt.state) == len(list(plain.parameters()))
    assert opt.state[plain.transformer.x_embedder.weight]["exp_avg"].shape == (plain.transformer.inner_dim, 4)

    # the EMA averages the FULL weights: ema_k = lerp(ema_{k-1}, model_k, 1 - decay) at every step, from rank
    # 0's initial weights (the state dict holds parameters only: no buffers to copy)
    decay = worker.config().ema_decay
    ema = dict(want)
    for step in range(1, STEPS + 1):
        live = load_file(step_files(ref, step) / "model.safetensors")
        saved = load_file(step_files(ref, step) / "ema.safetensors")
        for k in ema:
            ema[k] = torch.lerp(ema[k], live[k], 1.0 - decay)
            torch.testing.assert_close(saved[k], ema[k], rtol=0, atol=1e-7, msg=f"step {step} {k}")


def test_fsdp_section_is_off_by_default_and_maps_to_the_plugin():
    """No processes: the defaults dump and hash as before the section existed; the plugin follows it."""
    from instaflow_core.config import load, stable_hash
    from instaflow_core.errors import ConfigError
    from instaflow_core.training.setup import fsdp_plugin

    cfg = load("tiny")
    assert "fsdp" not in cfg.reflow.model_dump(mode="json")
    assert "fsdp" not in yaml.safe_load(cfg.to_yaml())["reflow"]
    assert fsdp_plugin(cfg.reflow) is None
    on = load("tiny", ["reflow.num_processes=2", "reflow.fsdp.enabled=true", "reflow.mixed_precision=bf16"])
    assert on.reflow.model_dump(mode="json")["fsdp"]["enabled"] is True  # travels in the job's section
    off = on.reflow.model_copy(update={"fsdp": cfg.reflow.fsdp})
    assert stable_hash(on.reflow.model_dump(mode="json")) != stable_hash(off.model_dump(mode="json"))
    plugin = fsdp_plugin(on.reflow)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.mixed_precision_policy.param_dtype == torch.bfloat16
    assert plugin.mixed_precision_policy.reduce_dtype == torch.float32
    assert type(plugin.cpu_offload).__name__ == "OffloadPolicy"  # no offload
    sized = fsdp_plugin(
        on.reflow.model_copy(update={"fsdp": on.reflow.fsdp.model_copy(update={"wrap": "size"})})
    )
    assert sized.min_num_params == 50_000_000
    with pytest.raises(ConfigError, match="num_processes >= 2"):
        load("tiny", ["reflow.fsdp.enabled=true"])
    with pytest.raises(ConfigError, match="use_8bit_adam"):
        load("tiny", ["reflow.num_processes=2", "reflow.fsdp.enabled=true", "reflow.use_8bit_adam=true"])
