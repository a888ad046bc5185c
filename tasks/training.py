"""Prefect tasks of the training stages: reflow (2-Rectified Flow), one-step distillation (InstaFlow), and
teacher pretraining.

Each task is one core object, `instaflow_core.training.job.TrainJob` (typed section in, saved folder out: its
key, checkpoints, resume, `accelerate launch` for several processes), plus what the orchestration adds: the
MLflow run with the per-step metrics (`tasks.tracking.runs.StageTracker`), the Prefect progress artifact and
the stage report. The task's Prefect cache key is built from the same references and section as the job's key
(tracking settings left out), so an unchanged rebuild does not train again.
"""

from __future__ import annotations

import base64
import logging
import os
from typing import Any

from prefect import task

from instaflow_core.config import (
    DistillationConfig,
    InstaflowConfig,
    ModelsConfig,
    RegistrationConfig,
    StorageConfig,
    TrainConfig,
)
from instaflow_core.errors import InstaflowError
from instaflow_core.evaluation.curves import CurveSpec
from instaflow_core.refs import ModelRef, Stage, TableRef
from instaflow_core.store import Store
from instaflow_core.training.job import TrainJob
from tasks.artifacts import lineage_markdown, run_logger
from tasks.caching import stage_cache_key
from tasks.retries import STORE_RETRIES
from tasks.tracking.runs import StageTracker

logger = logging.getLogger("instaflow.tasks.training")

PARENT_RUN_ENV = "INSTAFLOW_MLFLOW_PARENT_RUN"  # the rebuild's MLflow run, when the caller passes none
# Where to report is no reason to retrain: the registry settings stay out of the cache key (the MLflow
# parent run is left out of every task's key by stage_cache_key), and so do the quality curves' settings
# (evaluation.during_training), which change no weight.
_NOT_IN_KEY = ("registry", "curves")


def training_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """`stage_cache_key` over the references and the stage section, without the registry settings."""
    return stage_cache_key(context, {k: v for k, v in parameters.items() if k not in _NOT_IN_KEY})


def run_stage(job: TrainJob, registry: RegistrationConfig, parent_run_id: str | None = None) -> ModelRef:
    """Check the inputs, train (in process or via accelerate launch), log everything to MLflow; -> the model."""
    job.check_inputs()  # empty table / wrong latent shape: fail before an MLflow run or a model exists
    try:
        tracker = StageTracker(job, registry, parent_run_id or os.environ.get(PARENT_RUN_ENV) or None)
    except InstaflowError:
        raise
    except Exception as err:
        from tasks.retries import is_unreachable
        from tasks.tracking.client import tracking_uri, unreachable

        if is_unreachable(err):
            raise unreachable(tracking_uri(registry, job.storage)) from err
        raise
    try:
        summary = job.execute(tracker.on_log, tracker.on_eval)
    except BaseException:
        tracker.fail()
        raise
    summary.update(
        mlflow_run_id=tracker.run_id, tracking_uri=tracker.uri, experiment_id=tracker.experiment_id
    )
    tracker.finish(summary)
    job.write_summary(summary)
    run_logger().info(
        "%s %s: steps %d (resumed from %d), final loss %s -> %s",
        job.stage, job.key, summary["steps"], summary["start_step"], summary["final_loss"], job.out_uri,
    )  # fmt: skip
    return job.ref()


@task(cache_key_fn=training_cache_key, persist_result=True, name="reflow-train", **STORE_RETRIES)
def train_reflow(
    reflow: TrainConfig,
    storage: StorageConfig,
    triplets: TableRef,
    teacher: ModelRef,
    registry: RegistrationConfig,
    mlflow_parent_run_id: str | None = None,
    models: ModelsConfig | None = None,
    curves: CurveSpec | None = None,
) -> ModelRef:
    """2-Rectified Flow: the teacher's denoiser trained on its own triplets with the reflow loss -> the 2-RF.

    `models` says how a hub-id teacher resolves (revision, local_files_only) and whether variants are saved;
    `curves` (evaluation/curves.py: curve_spec) evaluates the EMA weights while training."""
    job = TrainJob.make(Stage.REFLOW, reflow, storage, triplets, teacher, models, curves)
    return run_stage(job, registry, mlflow_parent_run_id)


@task(cache_key_fn=training_cache_key, persist_result=True, name="distill-train", **STORE_RETRIES)
def train_distill(
    distill: DistillationConfig,
    storage: StorageConfig,
    pairs: TableRef,
    rf: ModelRef,
    registry: RegistrationConfig,
    mlflow_parent_run_id: str | None = None,
    models: ModelsConfig | None = None,
    curves: CurveSpec | None = None,
) -> ModelRef:
    """One-step distillation: the 2-RF's denoiser trained at t = 0 to land on the 2-RF's own Euler solutions."""
    job = TrainJob.make(Stage.DISTILL, distill, storage, pairs, rf, models, curves)
    return run_stage(job, registry, mlflow_parent_run_id)


@task(cache_key_fn=training_cache_key, persist_result=True, name="pretrain-train")
def train_pretrain(
    pretraining: TrainConfig,
    storage: StorageConfig,
    prompts: TableRef,
    base: ModelRef,
    registry: RegistrationConfig,
    mlflow_parent_run_id: str | None = None,
    curves: CurveSpec | None = None,
) -> ModelRef:
    """The 1-Rectified Flow teacher: `base` trained on the train images of the prompts' image table."""
    job = TrainJob.make(Stage.PRETRAIN, pretraining, storage, prompts, base, curves=curves)
    return run_stage(job, registry, mlflow_parent_run_id)


def stage_report(
    cfg: InstaflowConfig, stage: Stage, inputs: dict, ref: ModelRef, data: TableRef, base: ModelRef
) -> str:
    """The lineage table plus the training summary and the sample grid (inline PNG) for the artifact."""
    section = cfg.section(stage.section)
    job = TrainJob.make(stage, section, cfg.storage, data, base)
    summary = job.summary() or {}
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
    return lineage_markdown(stage, inputs, {job.out_kind: ref}, "\n".join(lines))
