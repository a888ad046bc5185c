"""Two CPU processes (gloo) under `accelerate launch`: sharded data, identical weights, one checkpoint writer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from instaflow_core.training.checkpoint import obj_from_bytes
from tests.support import REPO

WORKER = REPO / "tests" / "support" / "ddp_worker.py"
ROOT = REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_share_the_work(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "PYTHONPATH": str(ROOT),
        "ACCELERATE_CONFIG_FILE": str(tmp_path / "no-accelerate-config.yaml"),  # ignore any user config
    }
    cmd = [
        # --multi_gpu = torchrun; without CUDA, make_accelerator turns it into CPU DDP over gloo
        # (accelerate's own --cpu multi-process mode wants mpirun)
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(free_port()), str(WORKER), str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    r0, r1 = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1))
    # sharded: 8 steps x 8 rows = the 64-row epoch exactly, split between ranks, no row twice
    assert len(r0["seen"]) == len(r1["seen"]) == 32
    assert not set(r0["seen"]) & set(r1["seen"])
    assert sorted(r0["seen"] + r1["seen"]) == list(range(64))
    # same weights on both ranks (rank 1 started from different ones), and they moved
    w0, w1 = (torch.load(tmp_path / f"weights-{r}.pt") for r in (0, 1))
    assert not torch.allclose(w0["init"], w1["init"])
    assert torch.equal(w0["final"], w1["final"]) and torch.equal(w0["ema"], w1["ema"])
    assert not torch.allclose(w0["final"], w0["init"])
    # the logged loss is the mean over both processes: identical records
    assert r0["steps"] == r1["steps"] == 8 and r0["losses"] == r1["losses"]
    # only rank 0 wrote checkpoints, with both ranks' RNG states inside
    assert r0["saves"] == [4, 8] and r1["saves"] == []
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text() == "step-000000008"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-000000004", "step-000000008"]
    assert len(obj_from_bytes((ckpt / "step-000000008" / "rng.pt").read_bytes())) == 2
