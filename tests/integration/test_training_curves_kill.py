"""Quality curves across a SIGKILL: a reflow flow run (a separate process, tiny preset, FID against the teacher's
images on fixed prompts and seeds) dies right after logging the eval point at step 15, one checkpoint (step 10)
behind it; the rerun resumes from step 10, redoes the point at 15 and the rest, and the MLflow run holds every
point exactly once (0, 5, ..., 40): no duplicate, none missing. The Prefect markdown artifact shows them all.
Under `accelerate launch` (2 processes) the main process's points reach the stage's MLflow run the same way."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from flows.curate import curate_flow
from flows.generate import generate_flow
from flows.reflow import reflow_flow
from instaflow_core.config import InstaflowConfig, StorageConfig, load
from instaflow_core.evaluation.curves import MLFLOW_METRICS, curve_spec
from instaflow_core.refs import Stage
from instaflow_core.store import Store
from instaflow_core.training.job import TrainJob
from tasks.caching import prefect_settings
from tasks.teacher import teacher_model
from tasks.tracking.runs import RUN_FILE
from tests.support import REPO

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS, EVERY, CKPT, KILL_AT = 40, 5, 10, 15
MLFLOW_DIR = Path(tempfile.gettempdir()) / f"instaflow-test-curves-mlflow-{os.getpid()}"
atexit.register(shutil.rmtree, MLFLOW_DIR, True)

CHILD = f"""
import json, os, signal, sys
from flows.reflow import reflow_flow
from instaflow_core.config import InstaflowConfig
from instaflow_core.refs import ModelRef, TableRef
from tasks.caching import prefect_settings
from tasks.tracking import runs

logged = runs.StageTracker.on_eval

def on_eval(self, record):  # die right after the point at step {KILL_AT} reached MLflow
    logged(self, record)
    if record["step"] == {KILL_AT}:
        os.kill(os.getpid(), signal.SIGKILL)

runs.StageTracker.on_eval = on_eval
cfg = InstaflowConfig.model_validate_json(open(sys.argv[1]).read())
refs = json.loads(open(sys.argv[2]).read())
with prefect_settings(cfg.storage, cfg.orchestration):
    reflow_flow(cfg, TableRef(**refs["triplets"]), ModelRef(**refs["teacher"]))
"""


def tiny_cfg(storage: StorageConfig) -> InstaflowConfig:
    sets = [
        "curation.max_prompts=6",
        "curation.holdout_fraction=0.0",
        "generation.images_per_prompt=2",
        "generation.num_inference_steps=2",
        f"reflow.stages=[{{steps: {STEPS}, batch_size: 4, loss: l2}}]",
        f"reflow.checkpoint_every={CKPT}",
        f"reflow.log_every={EVERY}",
        "reflow.warmup_steps=1",
        "reflow.sample_steps=2",
        "reflow.keep_checkpoints=2",
        f"evaluation.during_training.every_steps={{reflow: {EVERY}}}",
        "evaluation.during_training.samples=4",
        "evaluation.during_training.prompts=['a photo of a cat', 'a red car on a street']",
        f"registration.tracking_uri=sqlite:///{MLFLOW_DIR / 'mlflow.db'}",
    ]
    data = load("tiny", sets).model_dump(mode="json")
    data["storage"] = storage.model_dump(mode="json")
    return InstaflowConfig.model_validate(data)


@pytest.fixture(scope="module")
def inputs(prefect_api, tmp_path_factory):
    cfg = tiny_cfg(StorageConfig(root=f"file://{tmp_path_factory.mktemp('curves') / 'store'}"))
    with prefect_settings(cfg.storage, cfg.orchestration):
        prompts = curate_flow(cfg)
        teacher = teacher_model(cfg.models, cfg.storage)
        triplets = generate_flow(cfg, prompts, teacher)
    return cfg, triplets, teacher


def test_sigkill_after_an_eval_point_then_rerun_logs_every_point_once(inputs, tmp_path):
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL

    from tasks.tracking.client import tracking_uri

    cfg, triplets, teacher = inputs
    job = TrainJob.make(
        Stage.REFLOW,
        cfg.reflow,
        cfg.storage,
        triplets,
        teacher,
        curves=curve_spec(cfg, Stage.REFLOW, teacher),
    )
    assert (
        job.key == TrainJob.make(Stage.REFLOW, cfg.reflow, cfg.storage, triplets, teacher).key
    )  # not in the key
    store = Store(cfg.storage)
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
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "cfg.json"), str(tmp_path / "refs.json")],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=600,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    assert job.resume_step() == CKPT  # the kill came after the point at 15, before the step-20 checkpoint
    run_id = json.loads(store.read_bytes(f"{job.ckpt_dir}/{RUN_FILE}"))["run_id"]
    client = MlflowClient(tracking_uri=tracking_uri(cfg.registration, cfg.storage))
    before = [(m.step, m.value) for m in client.get_metric_history(run_id, MLFLOW_METRICS["fid"])]
    assert sorted(s for s, _ in before) == [0, 5, 10, 15]

    with prefect_settings(cfg.storage, cfg.orchestration):
        reflow_flow(cfg, triplets, teacher)
    summary = job.summary()
    assert summary["start_step"] == CKPT and summary["mlflow_run_id"] == run_id
    want = list(range(0, STEPS + 1, EVERY))
    for name in ("fid", "clip_score", "straightness", "eval_s", "cost_share"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, MLFLOW_METRICS[name]))
        assert steps == want, (name, steps)  # each point once: 15 was redone but not logged again
    curves = summary["curves"]
    assert [p["step"] for p in curves["points"]] == want  # the checkpoint's points, continued
    assert curves["protocol"] == "teacher-4" and curves["setting"] == "2rf_1step"
    redone = next(p for p in curves["points"] if p["step"] == KILL_AT)
    assert redone["fid"] == pytest.approx(dict(before)[KILL_AT], rel=1e-4)  # the resumed run is the same run
    assert 0 < curves["cost_share"] < 1

    # the Prefect run shows the curves: the latest markdown artifact lists every point
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as pc:
        arts = pc.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["instaflow-reflow-curves"]))
        )
    assert arts, "no curves artifact"
    latest = max(arts, key=lambda a: a.created)
    rows = [line for line in latest.data.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r.split("|")[1]) for r in rows] == want


def test_points_relayed_from_accelerate_launch(inputs):
    """reflow.num_processes=2: the job runs under `accelerate launch`; the main process evaluates and prints its
    points as INSTAFLOW_EVENT lines, which the task relays to the stage's MLflow run."""
    from mlflow import MlflowClient

    from tasks.tracking.client import tracking_uri

    cfg, triplets, teacher = inputs
    data = cfg.model_dump(mode="json")
    data["reflow"].update(num_processes=2, stages=[{"steps": 4, "batch_size": 4, "loss": "l2"}], log_every=2)
    data["evaluation"]["during_training"]["every_steps"] = {"reflow": 2}
    cfg2 = InstaflowConfig.model_validate(data)
    with prefect_settings(cfg2.storage, cfg2.orchestration):
        reflow_flow(cfg2, triplets, teacher)
    summary = TrainJob.make(Stage.REFLOW, cfg2.reflow, cfg2.storage, triplets, teacher).summary()
    assert [p["step"] for p in summary["curves"]["points"]] == [0, 2, 4]
    client = MlflowClient(tracking_uri=tracking_uri(cfg2.registration, cfg2.storage))
    run_id = summary["mlflow_run_id"]
    for name in ("fid", "clip_score", "straightness"):
        assert sorted(m.step for m in client.get_metric_history(run_id, MLFLOW_METRICS[name])) == [0, 2, 4]
    assert client.get_run(run_id).data.tags["instaflow.curves.setting"] == "2rf_1step"
