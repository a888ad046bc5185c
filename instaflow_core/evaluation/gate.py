"""The promotion gate: a candidate's metrics against the champion's, with the reasons for the verdict."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


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
