"""Stage 3: reflow. The teacher's UNet, trained on the teacher's own triplets, becomes the 2-Rectified Flow.

    triplets table version + teacher -> train-reflow (checkpoints, resume, MLflow run) -> models/2rf-<key>/

Reads `reflow` (the schedule, optimiser, EMA, GPU switches, sample prompts), `storage` and `registry` (where the
MLflow run goes). The training task is cached on (triplets ref, teacher ref, reflow section): an unchanged
rebuild does not train again, and a killed run resumes from its last checkpoint when rerun.
"""

from __future__ import annotations

import base64

from prefect import flow, get_run_logger

from instaflow_core.config import InstaflowConfig
from instaflow_core.refs import ModelRef, TableRef
from instaflow_core.store import Store
from tasks.common import lineage_markdown, publish_markdown
from tasks.training import make_job, read_summary, train_reflow


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
    return lineage_markdown(stage, inputs, {KIND_LABEL[stage]: ref}, "\n".join(lines))


KIND_LABEL = {"reflow": "2rf", "distill": "instaflow"}


@flow(name="instaflow-reflow")
def reflow_flow(
    cfg: InstaflowConfig, triplets: TableRef, teacher: ModelRef, mlflow_parent_run_id: str | None = None
) -> ModelRef:
    """Triplets + teacher -> the 2-RF diffusers folder (ModelRef kind "2rf").

    The MLflow run nests under `mlflow_parent_run_id` (or $INSTAFLOW_MLFLOW_PARENT_RUN) when given.
    """
    ref = train_reflow(cfg.reflow, cfg.storage, triplets, teacher, cfg.registry, mlflow_parent_run_id)
    report = stage_report(
        cfg,
        "reflow",
        {"triplets": triplets, "teacher": teacher, "reflow config": cfg.section_hash("reflow")},
        ref,
        (cfg.reflow, triplets, teacher),
    )
    publish_markdown(
        "instaflow-reflow", report, description="Reflow: inputs, the 2-RF, training summary, samples"
    )
    get_run_logger().info("2-RF %s", ref.uri)
    return ref
