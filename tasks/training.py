"""Prefect tasks of the training stages: reflow (2-Rectified Flow) and one-step distillation (InstaFlow).

Each task is one core call (`instaflow_core.stage_models.run_train_job`, which trains through
`instaflow_core.training.train` and writes the final diffusers folder) plus its I/O: an MLflow run with the
per-step metrics, a Prefect progress artifact, the sample grid. The stage's identity is

    key = hash(data table ref, base model ref, stage section hash)

It names the checkpoint folder `<store>/checkpoints/<stage>-<key>/` (so a rerun with the same inputs resumes
from the last checkpoint, even after a kill) and the model folder `<store>/models/<kind>-<key>/`; the task's
Prefect cache key is built from the same references and section (tracking settings left out), so an
unchanged rebuild does not train again. The checkpoint key leaves the code version out on purpose: a code edit
(or `--refresh reflow`) re-runs the task, which then resumes at the finished checkpoint and only re-saves the
folder instead of throwing away the GPU time; delete `<store>/checkpoints/<stage>-<key>/` (or change the
section, e.g. its seed) to train from scratch.

`num_processes > 1` in the section: the task writes the job as JSON and runs
`accelerate launch --num_processes N [launcher_args] -m flows.train_entry job.json` (infra/ACCELERATE.md);
the main process streams its log records back on stdout and this task logs them to MLflow as they come.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task

from instaflow_core.config import DistillConfig, RegistryConfig, StorageConfig, TrainConfig, stable_hash
from instaflow_core.errors import ConfigError, DataError, InstaflowError, StorageError, TrainingError
from instaflow_core.refs import ModelRef, TableRef
from instaflow_core.stage_models import EVENT_PREFIX, TrainJob, check_job_inputs, run_train_job
from instaflow_core.store import Store
from tasks.common import Progress, code_version, git_sha, stage_cache_key

logger = logging.getLogger("instaflow.tasks.training")

PARENT_RUN_ENV = "INSTAFLOW_MLFLOW_PARENT_RUN"  # the rebuild's MLflow run, when the caller passes none
RUN_FILE = "mlflow_run.json"  # in the checkpoint folder: a resumed stage continues its MLflow run
SUMMARY_FILE = "summary.json"  # in the checkpoint folder: what the finished stage produced
KIND = {"reflow": "2rf", "distill": "instaflow"}
_REPO = Path(__file__).resolve().parent.parent
_ERRORS: dict[str, type[InstaflowError]] = {
    c.__name__: c for c in (InstaflowError, ConfigError, DataError, StorageError, TrainingError)
}
# Where to report is no reason to retrain: the registry settings stay out of the cache key (the MLflow
# parent run is left out of every task's key by stage_cache_key).
_NOT_IN_KEY = ("registry",)


# ------------------------------------------------------------------------------------------ identity
def stage_key(stage: str, data: TableRef, base: ModelRef, section: TrainConfig) -> str:
    """hash(data ref, base model ref, section hash): the identity of a training stage's result."""
    section_hash = stable_hash(section.model_dump(mode="json"))
    return stable_hash({"stage": stage, "data": data.key(), "base": base.key(), "section": section_hash})


def make_job(
    stage: str, section: TrainConfig, storage: StorageConfig, data: TableRef, base: ModelRef
) -> TrainJob:
    """The stage's job: where its checkpoints, model folder and sample grid go in the store."""
    key = stage_key(stage, data, base, section)
    store = Store(storage)
    kind = KIND[stage]
    return TrainJob(
        stage=stage,
        key=key,
        section=section.model_dump(mode="json"),
        storage=storage,
        data=data,
        base=base,
        ckpt_dir=store.uri("checkpoints", f"{stage}-{key}"),
        out_uri=store.uri("models", f"{kind}-{key}"),
        samples_uri=store.uri("samples", f"{kind}-{key}.png"),
    )


def training_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """`stage_cache_key` over the references and the stage section, without the registry settings."""
    return stage_cache_key(context, {k: v for k, v in parameters.items() if k not in _NOT_IN_KEY})


# ------------------------------------------------------------------------------------------ MLflow
class StageTracker:
    """The stage's MLflow run (nested under a parent when given) and its Prefect progress artifact.

    The run id is remembered in the checkpoint folder: a stage resumed after a kill logs into the same run,
    so its loss curve continues where the checkpoint left it.
    """

    def __init__(self, job: TrainJob, registry: RegistryConfig, parent_run_id: str | None) -> None:
        from mlflow import MlflowClient

        from tasks.registry import _parent_ok, ensure_experiment, tracking_uri

        self.job, self.store = job, Store(job.storage)
        self.uri = tracking_uri(registry, job.storage)
        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = ensure_experiment(self.client, registry.experiment)
        self.total = sum(st.steps for st in job.train_cfg().stages)
        self.run_id = self._reuse() or self._create(_parent_ok(self.client, parent_run_id))
        self.progress = Progress(f"{job.stage} {job.key[:8]}: optimizer steps")

    def _run_file(self) -> str:
        return f"{self.job.ckpt_dir}/{RUN_FILE}"

    def _reuse(self) -> str | None:
        uri = self._run_file()
        if not self.store.exists(uri):
            return None
        saved = json.loads(self.store.read_bytes(uri))
        if saved.get("tracking_uri") != self.uri:
            return None
        try:
            run = self.client.get_run(saved["run_id"])
        except Exception:  # noqa: BLE001 - the tracking db was reset: start a new run
            return None
        if run.info.lifecycle_stage != "active":
            return None
        self.client.update_run(run.info.run_id, status="RUNNING")
        _log().info("resuming: continuing MLflow run %s", run.info.run_id)
        return run.info.run_id

    def _create(self, parent: str | None) -> str:
        from mlflow.entities import Param

        job = self.job
        tags = {
            "mlflow.runName": f"{job.stage}-{job.key[:8]}",
            "instaflow.stage": job.stage,
            "instaflow.key": job.key,
            "instaflow.data": job.data.key(),
            "instaflow.base": job.base.key(),
            "instaflow.checkpoints": job.ckpt_dir,
            "instaflow.model_uri": job.out_uri,
            "instaflow.code_version": code_version(),
            "instaflow.git": git_sha(),
        }
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, tags=tags)
        flat = _flatten(job.section)
        params = [Param(k, str(v)[:500]) for k, v in sorted(flat.items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run.info.run_id, params=params[i : i + 100])
        self.store.write_bytes(
            self._run_file(), json.dumps({"tracking_uri": self.uri, "run_id": run.info.run_id}).encode()
        )
        return run.info.run_id

    def on_log(self, record: dict) -> None:
        """A loop record -> MLflow metrics at its step, and the progress artifact."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(record["step"])
        metrics = [
            Metric(k, float(record[k]), now, step)
            for k in ("loss", "lr", "grad_norm", "samples_per_s", "data_wait_share", "stage")
            if record.get(k) is not None
        ]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.progress.update(step / max(self.total, 1))
        _log().info(
            "%s step %d/%d loss %.5g lr %.3g grad_norm %.3g %.1f samples/s data wait %.0f%%",
            self.job.stage, step, self.total, record["loss"], record["lr"], record["grad_norm"],
            record["samples_per_s"], 100 * record["data_wait_share"],
        )  # fmt: skip

    def finish(self, summary: dict[str, Any]) -> None:
        """The sample grid and the summary as artifacts, final numbers as tags, status FINISHED."""
        with tempfile.TemporaryDirectory(prefix="instaflow-mlflow-") as tmp:
            if summary.get("samples_uri") and self.store.exists(summary["samples_uri"]):
                png = Path(tmp) / f"samples_{summary.get('sample_steps', 1)}step.png"
                png.write_bytes(self.store.read_bytes(summary["samples_uri"]))
                self.client.log_artifact(self.run_id, str(png), "samples")
            info = Path(tmp) / "summary.json"
            info.write_text(json.dumps(_public_summary(summary), indent=1, default=str))
            self.client.log_artifact(self.run_id, str(info))
        self.client.set_tag(self.run_id, "instaflow.steps", str(summary["steps"]))
        self.client.set_tag(self.run_id, "instaflow.resumed_from_step", str(summary["start_step"]))
        self.progress.update(1.0)
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self) -> None:
        try:
            self.client.set_terminated(self.run_id, "FAILED")
        except Exception:  # noqa: BLE001 - never mask the training error
            logger.warning("could not mark MLflow run %s failed", self.run_id)


def _log() -> Any:
    """The Prefect run logger inside a run (shown in the UI and the CLI), the module logger outside."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - no active run
        return logger


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): obj}


def _public_summary(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k != "history"} | {
        "log_records": len(summary.get("history", []))
    }


# ------------------------------------------------------------------------------------------ running
def _launch(job: TrainJob, cfg: TrainConfig, on_log: Callable[[dict], None]) -> dict[str, Any]:
    """`accelerate launch` the job on cfg.num_processes processes; relay the main process's records."""
    args = [os.path.expandvars(a) for a in cfg.launcher_args]  # e.g. "${NODE_RANK}" set by the scheduler
    modes = ("--multi_gpu", "--use_fsdp", "--use_deepspeed", "--config_file", "--cpu", "--tpu")
    if not any(a.split("=")[0] in modes for a in args):
        args.insert(0, "--multi_gpu")  # torchrun under the hood; gloo on CPU-only machines
    summary: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    tail: list[str] = []
    with tempfile.TemporaryDirectory(prefix="instaflow-job-") as tmp:
        path = Path(tmp) / "job.json"
        path.write_text(job.model_dump_json())
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--num_processes", str(cfg.num_processes), *args,
            "-m", "flows.train_entry", str(path), "--no-validate",
        ]  # fmt: skip
        logger.info("launching: %s", " ".join(cmd))
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")])),
        }
        proc = subprocess.Popen(
            cmd, cwd=_REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(EVENT_PREFIX):
                event = json.loads(line[len(EVENT_PREFIX) :])
                if event["type"] == "log":
                    on_log(event["record"])
                elif event["type"] == "summary":
                    summary = event["summary"]
                elif event["type"] == "error" and error is None:
                    error = event
            else:
                tail = (tail + [line.rstrip()])[-20:]
                logger.debug("%s", line.rstrip())
        rc = proc.wait()
    if error is not None:
        raise _ERRORS.get(error["class"], TrainingError)(error["message"])
    if rc != 0 or summary is None:
        last = "; ".join(x for x in tail[-3:] if x) or "no output"
        raise TrainingError(f"accelerate launch of {job.stage} exited with code {rc} ({last})")
    return summary


def run_stage(
    job: TrainJob, registry: RegistryConfig, parent_run_id: str | None = None
) -> tuple[ModelRef, dict[str, Any]]:
    """Validate the inputs, train (in process or via accelerate launch), log everything; -> (ref, summary)."""
    cfg = job.train_cfg()
    check_job_inputs(job)  # empty table / wrong latent shape: fail before an MLflow run or a model exists
    try:
        tracker = StageTracker(job, registry, parent_run_id or os.environ.get(PARENT_RUN_ENV) or None)
    except InstaflowError:
        raise
    except Exception as err:
        from tasks.registry import _is_connection_error, tracking_uri

        if _is_connection_error(err):
            uri = tracking_uri(registry, job.storage)
            raise ConfigError(
                f"MLflow at {uri} is not reachable: is the server running? (instaflow stack up)"
            ) from None
        raise
    try:
        if cfg.num_processes > 1:
            summary = _launch(job, cfg, tracker.on_log)
        else:
            summary = run_train_job(job, on_log=tracker.on_log, validate=False)
    except BaseException:
        tracker.fail()
        raise
    summary.update(
        mlflow_run_id=tracker.run_id, tracking_uri=tracker.uri, experiment_id=tracker.experiment_id
    )
    tracker.finish(summary)
    store = Store(job.storage)
    store.write_bytes(f"{job.ckpt_dir}/{SUMMARY_FILE}", json.dumps(summary, indent=1, default=str).encode())
    _log().info(
        "%s %s: steps %d (resumed from %d), final loss %s -> %s",
        job.stage, job.key, summary["steps"], summary["start_step"], summary["final_loss"], job.out_uri,
    )  # fmt: skip
    ref = ModelRef(
        uri=job.out_uri,
        kind=job.out_kind,
        config_hash=stable_hash(job.section),
        source=f"{job.out_kind}-{job.key}",  # the identity distill pairs and evaluations key on
    )
    return ref, summary


def read_summary(job: TrainJob) -> dict[str, Any] | None:
    """What the finished stage wrote next to its checkpoints (None before it finished once)."""
    store = Store(job.storage)
    uri = f"{job.ckpt_dir}/{SUMMARY_FILE}"
    return json.loads(store.read_bytes(uri)) if store.exists(uri) else None


# ------------------------------------------------------------------------------------------ the tasks
@task(cache_key_fn=training_cache_key, persist_result=True, name="train-reflow")
def train_reflow(
    reflow: TrainConfig,
    storage: StorageConfig,
    triplets: TableRef,
    teacher: ModelRef,
    registry: RegistryConfig,
    mlflow_parent_run_id: str | None = None,
) -> ModelRef:
    """2-Rectified Flow: the teacher's UNet trained on its own triplets with the reflow loss -> the 2-RF folder."""
    job = make_job("reflow", reflow, storage, triplets, teacher)
    ref, _ = run_stage(job, registry, mlflow_parent_run_id)
    return ref


@task(cache_key_fn=training_cache_key, persist_result=True, name="train-distill")
def train_distill(
    distill: DistillConfig,
    storage: StorageConfig,
    pairs: TableRef,
    rf: ModelRef,
    registry: RegistryConfig,
    mlflow_parent_run_id: str | None = None,
) -> ModelRef:
    """One-step distillation: the 2-RF's UNet trained at t = 0 to land on the 2-RF's own Euler solutions."""
    job = make_job("distill", distill, storage, pairs, rf)
    ref, _ = run_stage(job, registry, mlflow_parent_run_id)
    return ref
