"""Teacher pretraining (before generation, when `models.teacher` is `pretrain`): the pipeline trains its own
teacher, a text-conditioned 1-Rectified Flow, on the curated (image, caption) table.

    prompts table version (-> the image table it was curated with) + a fresh digits model
    -> pretrain-train (reflow's loss on independent noise, `pretraining.caption_dropout` of captions dropped
    for guidance; checkpoints, resume, MLflow run) -> models/1rf-<key>/  (ModelRef kind "1rf")

Reads `pretraining` (the schedule, optimiser, EMA), `digits.model` (the architecture), `storage` and
`registration` (where the MLflow run goes). Cached like reflow: an unchanged rebuild does not train again.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from instaflow_core.config import InstaflowConfig
from instaflow_core.errors import ConfigError
from instaflow_core.evaluation.curves import curve_spec
from instaflow_core.refs import ModelRef, Stage, TableRef
from tasks.artifacts import publish_markdown
from tasks.pretrain import pretrain_init
from tasks.training import stage_report, train_pretrain


@flow(name="instaflow-pretrain")
def pretrain_flow(
    cfg: InstaflowConfig, prompts: TableRef, mlflow_parent_run_id: str | None = None
) -> ModelRef:
    """Prompts (curated from an image source) -> the pretrained 1-RF teacher (ModelRef kind "1rf")."""
    if cfg.pretraining is None:
        raise ConfigError("no `pretraining` section: teacher pretraining needs a training schedule")
    if cfg.digits is None:
        raise ConfigError(
            "no `digits` section: teacher pretraining builds the model `digits.model` describes"
        )
    base = pretrain_init(cfg.digits.model, cfg.storage)
    ref = train_pretrain(
        cfg.pretraining, cfg.storage, prompts, base, cfg.registration, mlflow_parent_run_id,
        curves=curve_spec(cfg, Stage.PRETRAIN),
    )  # fmt: skip
    inputs = {
        "prompts": prompts,
        "initial model": base,
        "pretraining config": cfg.section_hash("pretraining"),
    }
    report = stage_report(cfg, Stage.PRETRAIN, inputs, ref, prompts, base)
    publish_markdown(
        "instaflow-pretrain", report, description="Teacher pretraining: inputs, the 1-RF, summary, samples"
    )
    get_run_logger().info("1-RF teacher %s", ref.uri)
    return ref
