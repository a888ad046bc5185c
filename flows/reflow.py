"""Stage 3: reflow. The teacher's denoiser, trained on the teacher's own triplets, becomes the 2-Rectified Flow.

    triplets table version + teacher -> reflow-train (checkpoints, resume, MLflow run) -> models/2rf-<key>/

Reads `reflow` (the schedule, optimiser, EMA, GPU switches, sample prompts), `storage` and `registry` (where the
MLflow run goes). The training task is cached on (triplets ref, teacher ref, reflow section): an unchanged
rebuild does not train again, and a killed run resumes from its last checkpoint when rerun.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from instaflow_core.config import InstaflowConfig
from instaflow_core.evaluation.curves import curve_spec
from instaflow_core.refs import ModelRef, Stage, TableRef
from tasks.artifacts import publish_markdown
from tasks.training import stage_report, train_reflow


@flow(name="instaflow-reflow")
def reflow_flow(
    cfg: InstaflowConfig, triplets: TableRef, teacher: ModelRef, mlflow_parent_run_id: str | None = None
) -> ModelRef:
    """Triplets + teacher -> the 2-RF diffusers folder (ModelRef kind "2rf").

    The MLflow run nests under `mlflow_parent_run_id` (or $INSTAFLOW_MLFLOW_PARENT_RUN) when given.
    """
    ref = train_reflow(
        cfg.reflow, cfg.storage, triplets, teacher, cfg.registration, mlflow_parent_run_id, models=cfg.models,
        curves=curve_spec(cfg, Stage.REFLOW, teacher),
    )  # fmt: skip
    inputs = {"triplets": triplets, "teacher": teacher, "reflow config": cfg.section_hash("reflow")}
    report = stage_report(cfg, Stage.REFLOW, inputs, ref, triplets, teacher)
    publish_markdown(
        "instaflow-reflow", report, description="Reflow: inputs, the 2-RF, training summary, samples"
    )
    get_run_logger().info("2-RF %s", ref.uri)
    return ref
