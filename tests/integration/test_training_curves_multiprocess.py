"""Quality curves on two CPU processes (gloo) under `accelerate launch`: only the main process evaluates, at the
same steps as one process would, while the other waits; under FSDP2 the evaluator gets the EMA gathered into a
plain module (every rank takes part in the gather)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

WORKER = REPO / "tests" / "support" / "curves_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_only_the_main_process_evaluates(tmp_path: Path, mode: str) -> None:
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "PYTHONPATH": str(REPO),
        "ACCELERATE_CONFIG_FILE": str(tmp_path / "no-accelerate-config.yaml"),  # ignore any user config
    }
    cmd = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(free_port()), str(WORKER), str(tmp_path), mode,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"{mode}-rank-{r}.json").read_text()) for r in (0, 1))
    assert r0["sharded"] == r1["sharded"] == (mode == "fsdp")
    assert [p["step"] for p in r0["points"]] == [0, 3, 6, 8] == r0["records"]
    assert r1["points"] == [] and r1["records"] == []  # the other process waited
    assert all(p["plain"] for p in r0["points"])  # under FSDP: the gathered, unsharded EMA
    assert len({p["numel"] for p in r0["points"]}) == 1
    assert r0["points"][-1]["norm"] == pytest.approx(r0["ema_norm"], rel=1e-6)  # the final EMA, last point
