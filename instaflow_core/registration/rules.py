"""Registration's domain rules: which metrics a registered model carries, the lineage tags that trace it back to
its prompts, triplets, teacher, configs and code, the promotion gate (a candidate's metrics against the
champion's, with the reasons for the verdict), and what a registered model may be called.

The MLflow side (registering, aliases, tags on versions) is tasks/tracking/; these rules are plain data in and
out, so the register flow, the CLI and the tests share them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from instaflow_core.errors import DataError
from instaflow_core.refs import ModelRef, TableRef

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


def lineage_tags(
    cfg: Any, lineage: dict[str, Any], metrics: dict[str, Any], *, code_version: str, git_sha: str
) -> dict[str, str]:
    """Tags that trace a version back to its prompts, triplets, teacher, configs, code and evaluation run.
    `cfg` is the InstaflowConfig; `lineage` maps names (prompts, triplets, teacher, ...) to references or keys."""
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
    tags["instaflow.code_version"] = code_version
    tags["instaflow.git_sha"] = git_sha
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


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return ("PASSED: " if self.passed else "BLOCKED: ") + "; ".join(self.reasons)


def check_gate(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    max_fid_increase: float,
    max_clip_decrease: float,
) -> GateDecision:
    """Promote only if FID <= champion FID + max_fid_increase and CLIP >= champion CLIP - max_clip_decrease.

    No champion yet: passes. A metric the champion lacks is not compared; one the candidate lacks blocks (a
    model without measured quality must not replace one with it).
    """
    if champion is None:
        return GateDecision(True, ["no champion yet"])
    reasons, ok = [], True
    for key, limit, worse_if_higher in (
        ("fid", max_fid_increase, True),
        ("clip_score", max_clip_decrease, False),
    ):
        champ, cand = champion.get(key), candidate.get(key)
        if champ is None or not math.isfinite(champ):
            reasons.append(f"{key}: champion has none, not compared")
            continue
        if cand is None or not math.isfinite(cand):
            ok = False
            reasons.append(f"{key}: candidate has none (champion {champ:.4f})")
            continue
        delta = cand - champ if worse_if_higher else champ - cand  # > 0 means the candidate is worse
        within = delta <= limit + 1e-12
        ok &= within
        word = "increase" if worse_if_higher else "decrease"
        reasons.append(
            f"{key} {cand:.4f} vs champion {champ:.4f}: {word} {max(delta, 0.0):.4f} "
            f"{'<=' if within else '>'} allowed {limit:g}"
        )
    return GateDecision(ok, reasons)


# Registered model names: MLflow forbids / and :, quotes would break its filter strings, . and .. are paths.
_BAD_NAME_CHARS = "/\\:'\"`"


def model_name_problem(name: str) -> str | None:
    """Why `name` cannot be a registered model name (MLflow forbids / and :; quotes would break its filter
    strings; . and .. are paths), or None when it can."""
    if not name or not name.strip():
        return "a registered model name cannot be empty"
    if name.strip() in (".", "..") or any(c in _BAD_NAME_CHARS or ord(c) < 32 for c in name):
        return (
            f"{name!r} is not a registered model name: no / \\ : quotes or control characters "
            "(e.g. instaflow-tiny)"
        )
    if len(name) > 256:
        return f"registered model name of {len(name)} characters: at most 256"
    return None


def check_model_name(name: str | None) -> str | None:
    """The config validator: ValueError naming the problem (None passes: an optional name)."""
    if name is not None and (problem := model_name_problem(name)):
        raise ValueError(problem)
    return name
