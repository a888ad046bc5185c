"""Prefect tasks of the training stages: reflow (2-Rectified Flow) and one-step distillation (InstaFlow).

Each task is one core call (`instaflow_core.training.job.run_train_job`, which trains through
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
`accelerate launch --num_processes N [launcher_args] -m instaflow_core.training.entry job.json` (infra/ACCELERATE.md);
the main process streams its log records back on stdout and this task logs them to MLflow as they come.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task

from instaflow_core.config import (
    DistillationConfig,
    InstaflowConfig,
    ModelsConfig,
    RegistrationConfig,
    StorageConfig,
    TrainConfig,
    stable_hash,
)
from instaflow_core.errors import ConfigError, DataError, InstaflowError, StorageError, TrainingError
from instaflow_core.refs import TRAINED_KIND, ModelRef, Stage, TableRef
from instaflow_core.store import Store
from instaflow_core.training.job import EVENT_PREFIX, TrainJob, check_job_inputs, run_train_job
from tasks.artifacts import lineage_markdown, run_logger
from tasks.caching import stage_cache_key
from tasks.retries import STORE_RETRIES
from tasks.tracking.runs import StageTracker

logger = logging.getLogger("instaflow.tasks.training")

PARENT_RUN_ENV = "INSTAFLOW_MLFLOW_PARENT_RUN"  # the rebuild's MLflow run, when the caller passes none
SUMMARY_FILE = "summary.json"  # in the checkpoint folder: what the finished stage produced
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
    stage: str,
    section: TrainConfig,
    storage: StorageConfig,
    data: TableRef,
    base: ModelRef,
    models: ModelsConfig | None = None,
) -> TrainJob:
    """The stage's job: where its checkpoints, model folder and sample grid go in the store."""
    key = stage_key(stage, data, base, section)
    store = Store(storage)
    kind = TRAINED_KIND[Stage(stage)]
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
        models=models or ModelsConfig(),
    )


def training_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """`stage_cache_key` over the references and the stage section, without the registry settings."""
    return stage_cache_key(context, {k: v for k, v in parameters.items() if k not in _NOT_IN_KEY})


# ------------------------------------------------------------------------------------------ MLflow


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
            "-m", "instaflow_core.training.entry", str(path), "--no-validate",
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
    job: TrainJob, registry: RegistrationConfig, parent_run_id: str | None = None
) -> tuple[ModelRef, dict[str, Any]]:
    """Validate the inputs, train (in process or via accelerate launch), log everything; -> (ref, summary)."""
    cfg = job.train_cfg()
    check_job_inputs(job)  # empty table / wrong latent shape: fail before an MLflow run or a model exists
    try:
        tracker = StageTracker(job, registry, parent_run_id or os.environ.get(PARENT_RUN_ENV) or None)
    except InstaflowError:
        raise
    except Exception as err:
        from tasks.tracking.client import is_unreachable, tracking_uri, unreachable

        if is_unreachable(err):
            raise unreachable(tracking_uri(registry, job.storage)) from err
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
    run_logger().info(
        "%s %s: steps %d (resumed from %d), final loss %s -> %s",
        job.stage, job.key, summary["steps"], summary["start_step"], summary["final_loss"], job.out_uri,
    )  # fmt: skip
    ref = ModelRef(
        uri=store.relative(job.out_uri),  # store://models/<kind>-<key>: a moved store still resolves it
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
@task(cache_key_fn=training_cache_key, persist_result=True, name="reflow-train", **STORE_RETRIES)
def train_reflow(
    reflow: TrainConfig,
    storage: StorageConfig,
    triplets: TableRef,
    teacher: ModelRef,
    registry: RegistrationConfig,
    mlflow_parent_run_id: str | None = None,
    models: ModelsConfig | None = None,
) -> ModelRef:
    """2-Rectified Flow: the teacher's UNet trained on its own triplets with the reflow loss -> the 2-RF folder.

    `models` says how a hub-id teacher resolves (revision, local_files_only) and whether variants are saved."""
    job = make_job("reflow", reflow, storage, triplets, teacher, models)
    ref, _ = run_stage(job, registry, mlflow_parent_run_id)
    return ref


@task(cache_key_fn=training_cache_key, persist_result=True, name="distill-train", **STORE_RETRIES)
def train_distill(
    distill: DistillationConfig,
    storage: StorageConfig,
    pairs: TableRef,
    rf: ModelRef,
    registry: RegistrationConfig,
    mlflow_parent_run_id: str | None = None,
    models: ModelsConfig | None = None,
) -> ModelRef:
    """One-step distillation: the 2-RF's UNet trained at t = 0 to land on the 2-RF's own Euler solutions."""
    job = make_job("distill", distill, storage, pairs, rf, models)
    ref, _ = run_stage(job, registry, mlflow_parent_run_id)
    return ref


def stage_report(cfg: InstaflowConfig, stage: str, inputs: dict, ref: ModelRef, job_args: tuple) -> str:
    """The lineage table plus the training summary and the sample grid (inline PNG) for the artifact."""
    section, data, base = job_args
    job = make_job(stage, section, cfg.storage, data, base)
    summary = read_summary(job) or {}
    lines = [
        f"steps **{summary.get('steps', '?')}** (resumed from step {summary.get('start_step', 0)}), final loss "
        f"{summary.get('final_loss', '?')}; EMA weights (decay {section.ema_decay}) saved as the model",
        f"checkpoints `{job.ckpt_dir}`; MLflow run `{summary.get('mlflow_run_id', '?')}` at "
        f"`{summary.get('tracking_uri', '?')}`",
    ]
    store = Store(cfg.storage)
    if store.exists(job.samples_uri):
        png = base64.b64encode(store.read_bytes(job.samples_uri)).decode()
        lines += [
            "",
            f"**samples** ({summary.get('sample_steps', '?')} step(s), guidance {summary.get('sample_guidance', '?')}"
            f", prompts {summary.get('sample_prompts', section.sample_prompts)}): `{job.samples_uri}`",
            "",
            f"![samples](data:image/png;base64,{png})",
        ]
    return lineage_markdown(stage, inputs, {TRAINED_KIND[Stage(stage)]: ref}, "\n".join(lines))
