"""SIGKILL a reflow flow run (a separate process) after its first checkpoint, rerun it: it resumes.

The rerun must start from the checkpoint (start step > 0), finish at the configured step count, and carry the
killed run's loss history on: the log records of the checkpoint continue without gaps, and the MLflow run that
the killed process opened receives the rest of the curve.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flows.reflow import reflow_flow
from instaflow_core.config import StorageConfig
from instaflow_core.refs import Stage
from instaflow_core.store import Store
from instaflow_core.training.job import TrainJob
from tasks.caching import prefect_settings
from tasks.tracking.runs import RUN_FILE
from tests.integration.test_reflow_flow import make_inputs, mlflow_run, tiny_cfg
from tests.support import REPO

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 40
EVERY = 5

CHILD = """
import json, sys
from flows.reflow import reflow_flow
from instaflow_core.config import InstaflowConfig
from instaflow_core.refs import ModelRef, TableRef
from tasks.caching import prefect_settings

cfg = InstaflowConfig.model_validate_json(open(sys.argv[1]).read())
refs = json.loads(open(sys.argv[2]).read())
with prefect_settings(cfg.storage, cfg.orchestration):
    reflow_flow(cfg, TableRef(**refs["triplets"]), ModelRef(**refs["teacher"]))
"""


def test_sigkill_mid_training_then_rerun_resumes(prefect_api, tmp_path):
    from prefect.settings import PREFECT_API_URL

    storage = StorageConfig(root=f"file://{tmp_path / 'store'}")
    cfg = tiny_cfg(
        storage,
        [
            f"reflow.stages=[{{steps: {STEPS}, batch_size: 4, loss: l2}}]",
            f"reflow.checkpoint_every={EVERY}",
            f"reflow.log_every={EVERY}",
            "reflow.keep_checkpoints=2",
        ],
    )
    _prompts, triplets, teacher = make_inputs(cfg)
    job = TrainJob.make(Stage.REFLOW, cfg.reflow, cfg.storage, triplets, teacher)
    store = Store(cfg.storage)
    latest = store.local_path(f"{job.ckpt_dir}/latest")

    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    (tmp_path / "refs.json").write_text(
        json.dumps({"triplets": triplets.model_dump(), "teacher": teacher.model_dump()})
    )
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "cfg.json"), str(tmp_path / "refs.json")],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while not latest.exists():
            assert child.poll() is None, (
                f"the reflow process ended early: {child.stderr.read().decode()[-2000:]}"
            )
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    killed_at = int(latest.read_text().strip().rsplit("-", 1)[-1])
    assert 0 < killed_at < STEPS, "the kill must land mid-training"
    run_id = json.loads(store.read_bytes(f"{job.ckpt_dir}/{RUN_FILE}"))["run_id"]
    assert job.summary() is None  # the killed run never finished

    # the rerun (same inputs, same key): resumes from a checkpoint, not from step 0
    with prefect_settings(cfg.storage, cfg.orchestration):
        rf = reflow_flow(cfg, triplets, teacher)
    summary = job.summary()
    assert store.resolve(rf.uri) == job.out_uri
    assert summary["start_step"] == killed_at > 0
    assert summary["steps"] == STEPS
    steps = [r["step"] for r in summary["history"]]
    assert steps == list(range(EVERY, STEPS + 1, EVERY))  # the checkpoint's history, continued without a gap
    assert all(r["loss"] == r["loss"] for r in summary["history"])  # finite (NaN != NaN)

    # the same MLflow run holds the curve from before the kill and after it
    client, run = mlflow_run(cfg, summary["mlflow_run_id"])
    assert summary["mlflow_run_id"] == run_id and run.info.status == "FINISHED"
    logged = {m.step for m in client.get_metric_history(run_id, "loss")}
    assert {s for s in steps if s <= killed_at} <= logged  # written by the killed process
    assert {s for s in steps if s > summary["start_step"]} <= logged  # written by the rerun
    assert run.data.tags["instaflow.resumed_from_step"] == str(summary["start_step"])
