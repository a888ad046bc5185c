"""Stage 6: register the one-step model (and the 2-RF) in MLflow with lineage tags; gate the promotion.

Reads `registry`, `eval` (the 2-RF's default steps/guidance), `models` (dtype) and `storage`.
"""

from __future__ import annotations

import re
from typing import Any

from prefect import flow, get_run_logger

from instaflow_core.config import InstaflowConfig
from instaflow_core.errors import DataError
from instaflow_core.refs import ModelKind, ModelRef, TableRef
from tasks.artifacts import lineage_markdown, publish_markdown
from tasks.caching import code_version, git_sha
from tasks.registration import promote, register_model
from tasks.tracking.promotion import CANDIDATE, CHAMPION

_VERSION_RE = re.compile(r"@v(\d+)$")


def pick_metrics(metrics: dict[str, Any], kind: str, *, most_steps: bool) -> dict[str, float]:
    """The gate metrics of one model from an evaluation result ({"metrics": {setting: {...}}}) or a flat dict.

    A one-step model takes its fewest-step setting, a 2-RF its most-step one (its intended use).
    """
    per_setting = metrics.get("metrics") if isinstance(metrics.get("metrics"), dict) else None
    if per_setting is None:
        return {
            k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    rows = [r for r in per_setting.values() if r.get("model_kind") == kind]
    if not rows:
        raise DataError(
            f"the evaluation has no results for a {kind!r} model (settings: {sorted(per_setting)})"
        )
    row = max(rows, key=lambda r: r["steps"]) if most_steps else min(rows, key=lambda r: r["steps"])
    return {
        k: float(row[k]) for k in ("fid", "clip_score", "latency_s", "straightness") if row.get(k) is not None
    }


def lineage_tags(cfg: InstaflowConfig, lineage: dict[str, Any], metrics: dict[str, Any]) -> dict[str, str]:
    """Tags that trace a version back to its prompts, triplets, teacher, configs, code and Prefect run."""
    tags: dict[str, str] = {}
    for name, ref in lineage.items():
        key = ref.key() if hasattr(ref, "key") else str(ref)
        tags[f"lineage.{name}"] = key[:5000]
        version = ref.version if isinstance(ref, TableRef) else None
        match = _VERSION_RE.search(key) if version is None else None
        if version is not None or match:
            tags[f"instaflow.{name}_version"] = str(version if version is not None else match.group(1))
    if "teacher" in lineage:
        t = lineage["teacher"]
        tags["instaflow.teacher"] = (t.source or t.key()) if isinstance(t, ModelRef) else str(t)
    else:
        tags["instaflow.teacher"] = cfg.models.teacher
    for section, h in cfg.hashes().items():
        if section != "storage":  # where the store is: not lineage, and a moved store keeps its cache hits
            tags[f"instaflow.config_hash.{section}"] = h
    tags["instaflow.preset"] = cfg.preset
    tags["instaflow.code_version"] = code_version()
    tags["instaflow.git_sha"] = git_sha()
    for k in ("uri", "run_id"):
        if metrics.get(k):
            tags[f"instaflow.eval_{k}"] = str(metrics[k])
    networks = metrics.get("networks") or {}
    for k in ("fid_features", "clip_model"):
        if k in networks:
            tags[f"instaflow.{k}"] = str(networks[k])
    eval_set = metrics.get("eval_set") or {}
    if eval_set.get("protocol"):  # which evaluation protocol the metric tags come from, and its label
        tags["instaflow.eval_protocol"] = str(eval_set["protocol"])
        tags["instaflow.paper_comparable"] = str(bool(eval_set.get("paper_comparable"))).lower()
    return tags


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
    tags = lineage_tags(cfg, lineage, metrics)
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
            "register", {"model": model, **({ModelKind.RF2: rf_model} if rf_model else {})}, outputs
        ),
        description="What was registered, and its aliases",
    )
    return result
