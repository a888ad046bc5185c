"""Stage 6: register the one-step model (and the 2-RF) in MLflow with lineage tags; gate the promotion.

Reads `registry`, `eval` (the 2-RF's default steps/guidance), `models` (dtype) and `storage`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from instaflow_core.config import InstaflowConfig
from instaflow_core.refs import ModelKind, ModelRef, Stage
from instaflow_core.registration.rules import lineage_tags, pick_metrics
from tasks.artifacts import lineage_markdown, publish_markdown
from tasks.caching import code_version, git_sha
from tasks.registration import promote, register_model
from tasks.tracking.promotion import CANDIDATE, CHAMPION


def _after_gate(reg: dict[str, Any], gate: dict[str, Any] | None) -> dict[str, Any]:
    if gate is None:
        return reg
    aliases = set(reg["aliases"])
    if gate["promoted"]:
        aliases = (aliases - {CANDIDATE}) | {CHAMPION}
    return {**reg, "aliases": sorted(aliases), "gate": gate}


@flow(name="instaflow-register")
def register_flow(
    cfg: InstaflowConfig,
    model: ModelRef,
    metrics: dict[str, Any],
    lineage: dict[str, Any],
    rf_model: ModelRef | None = None,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Register `model` as `registration.model_name` (alias `candidate`), and the 2-RF as `registration.rf_model_name`
    when both are given; with `registration.auto_promote` the gate decides whether `champion` moves.

    `metrics` is evaluate_flow's result (or a flat {"fid": .., "clip_score": ..}); `lineage` maps names
    (prompts, triplets, teacher, ...) to references or their keys. Returns {model_name, version, aliases,
    model_uri, run_id, run_url, metrics, gate?, rf?}.
    """
    log = get_run_logger()
    reg_cfg = cfg.registration
    tags = lineage_tags(cfg, lineage, metrics, code_version=code_version(), git_sha=git_sha())
    one_step = pick_metrics(metrics, model.kind, most_steps=False)
    inference = {"num_inference_steps": 1, "guidance_scale": 1.0, "dtype": cfg.models.dtype}
    reg = register_model(
        reg_cfg, cfg.storage, model, reg_cfg.model_name, one_step, tags, inference, parent_run_id
    )
    gate = promote(reg_cfg, cfg.storage, reg_cfg.model_name, reg["version"]) if reg_cfg.auto_promote else None
    result = _after_gate(reg, gate)
    if gate is not None:
        log.info("%s v%s gate: %s", reg_cfg.model_name, reg["version"], "; ".join(gate["reasons"]))

    if rf_model is not None and reg_cfg.rf_model_name:
        rf_metrics = pick_metrics(metrics, rf_model.kind, most_steps=True) if metrics else {}
        rf_inference = {
            "num_inference_steps": max(cfg.evaluation.rf_steps),
            "guidance_scale": cfg.evaluation.rf_guidance,
            "dtype": cfg.models.dtype,
        }
        rf_reg = register_model(
            reg_cfg,
            cfg.storage,
            rf_model,
            reg_cfg.rf_model_name,
            rf_metrics,
            tags,
            rf_inference,
            parent_run_id,
        )
        rf_gate = (
            promote(reg_cfg, cfg.storage, reg_cfg.rf_model_name, rf_reg["version"])
            if reg_cfg.auto_promote
            else None
        )
        result["rf"] = _after_gate(rf_reg, rf_gate)

    outputs = {"model": f"models:/{result['model_name']}/{result['version']} {result['aliases']}"}
    if "rf" in result:
        outputs[ModelKind.RF2] = (
            f"models:/{result['rf']['model_name']}/{result['rf']['version']} {result['rf']['aliases']}"
        )
    publish_markdown(
        "instaflow-register-lineage",
        lineage_markdown(
            Stage.REGISTER, {"model": model, **({ModelKind.RF2: rf_model} if rf_model else {})}, outputs
        ),
        description="What was registered, and its aliases",
    )
    return result
