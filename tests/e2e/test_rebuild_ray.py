"""`instaflow rebuild --preset tiny --set orchestration.task_runner=ray`, as a user types it: end to end on a
local Ray instance the command starts itself (no address given), with Prefect's embedded API (no server).

The generation shards, the distillation pairs and the evaluation sampling run as Ray tasks; the workers report
to the command's own embedded Prefect API (none starts its own), and the run leaves no Ray process behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.e2e.test_rebuild import ALL, FAST

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one worker holds Ray


def _cli() -> list[str]:
    exe = shutil.which("instaflow", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "flows.cli"]


def _ray_pids(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if marker in ln and "ps -ww" not in ln]


def test_rebuild_on_a_local_ray_instance(tmp_path: Path) -> None:
    root = tmp_path / "store"
    summary_path = tmp_path / "summary.json"
    sets = ["orchestration.task_runner=ray", f"storage.root=file://{root}", *FAST]
    cmd = [*_cli(), "rebuild", "--preset", "tiny", "--json", str(summary_path)]
    cmd += [a for s in sets for a in ("--set", s)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    # Ray's session files go under $TMPDIR/ray: a private one (short: Ray's unix sockets live there), so the
    # leftover check below sees only this run and no other Ray user's cluster is joined
    ray_tmp = Path(tempfile.mkdtemp(prefix="ifr-", dir="/tmp"))
    env |= {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1", "TMPDIR": str(ray_tmp)}
    env["PREFECT_LOGGING_LEVEL"] = "INFO"  # the log lines checked below
    # Ray folds a line that another worker already printed into "[repeated Nx across cluster]" without the
    # second task's name: the lines of evaluate-reference-stats could vanish into evaluate-model's (a CI failure)
    env["RAY_DEDUP_LOGS"] = "0"
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    summary = json.loads(summary_path.read_text())
    assert {s for s, state in summary["stages"].items() if state == "ran"} == ALL
    assert summary["refs"]["triplets"]["rows"] == 24
    assert summary["registered"]["version"] == "1"
    names = set(summary["evaluation"]["metrics"])
    assert {"teacher_4step", "2rf_1step", "2rf_4step", "instaflow_1step"} <= names, names

    assert "Started a local Ray instance" in log
    # shard and evaluation tasks ran in Ray workers (their log lines carry the worker's task name and pid)
    for task in ("generate-shard", "evaluate-model", "evaluate-reference-stats"):
        assert f"({task} pid=" in log, task
    # the workers used the command's embedded API (flows/cli/server.py starts it quietly, Prefect logs its stop):
    # a worker that started its own would log Prefect's "Starting temporary server"
    assert log.count("Starting temporary server") == 0 and log.count("Stopping temporary server") == 1, log[
        -4000:
    ]
    assert _ray_pids(str(ray_tmp)) == []  # the local instance went down with the command
    shutil.rmtree(ray_tmp, ignore_errors=True)
