"""Stage 4: distillation. The 2-RF makes its own pairs, and a one-step student learns them: InstaFlow.

    prompts + 2-RF -> distill_pairs table (the triplet stage's sharded, exactly-once machinery; Euler
    `distillation.pairs.num_inference_steps` steps, guidance `distillation.pairs.guidance_scale`, seeds from
    `distillation.pairs.seed`) -> distill-train (t = 0, X0 -> the 2-RF's output) -> models/instaflow-<key>/

Reads `distill`, `storage`, `orchestration` (the pair shards' task runner), `models` (dtype when the 2-RF
solves) and `registry`. Same caching, checkpoint/resume and MLflow behaviour as reflow.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.generate import pairs_flow
from instaflow_core.config import InstaflowConfig
from instaflow_core.evaluation.curves import curve_spec
from instaflow_core.generation.triplets import PairsJob
from instaflow_core.refs import ModelKind, ModelRef, Stage, TableRef
from tasks.artifacts import publish_markdown
from tasks.training import stage_report, train_distill

PAIRS_TABLE = "distill_pairs"


@flow(name="instaflow-distill")
def distill_flow(
    cfg: InstaflowConfig,
    rf: ModelRef,
    prompts: TableRef,
    mlflow_parent_run_id: str | None = None,
    teacher: ModelRef | None = None,
) -> ModelRef:
    """2-RF + prompts -> distill_pairs -> the one-step InstaFlow diffusers folder (ModelRef kind "instaflow").

    `teacher`: whose images the quality curves compare with (evaluation.during_training, protocol teacher)."""
    job = PairsJob.from_distill_pairs(cfg.distillation.pairs, table=PAIRS_TABLE)
    pairs = pairs_flow(job, prompts, rf, cfg.storage, cfg.orchestration, cfg.models, stage=Stage.DISTILL)
    ref = train_distill(
        cfg.distillation, cfg.storage, pairs, rf, cfg.registration, mlflow_parent_run_id, models=cfg.models,
        curves=curve_spec(cfg, Stage.DISTILL, teacher),
    )  # fmt: skip
    inputs = {
        ModelKind.RF2: rf,
        "prompts": prompts,
        PAIRS_TABLE: pairs,
        "distill config": cfg.section_hash(Stage.DISTILL.section),
    }
    report = stage_report(cfg, Stage.DISTILL, inputs, ref, pairs, rf)
    publish_markdown(
        "instaflow-distill", report, description="Distillation: inputs, the model, summary, samples"
    )
    get_run_logger().info("InstaFlow %s", ref.uri)
    return ref
