"""Aliases, not stages: the gate moves champion, every move is recorded so rollback can undo it."""

from __future__ import annotations

import json
import time
from typing import Any

from instaflow_core.config import GateConfig
from instaflow_core.errors import ConfigError, DataError

CANDIDATE = "candidate"


CHAMPION = "champion"


HISTORY_TAG = "instaflow.champion_history"


SHOWN_METRICS = ("fid", "clip_score", "latency_s", "straightness")


def version_metrics(mv: Any) -> dict[str, float]:
    """Metrics recorded on a model version (tags `metric.<name>`)."""
    out = {}
    for k, v in (mv.tags or {}).items():
        if k.startswith("metric."):
            try:
                out[k[len("metric.") :]] = float(v)
            except (TypeError, ValueError):
                continue
    return out


def _versions(client: Any, name: str) -> list[Any]:
    return sorted(client.search_model_versions(f"name='{name}'"), key=lambda mv: int(mv.version))


def _alias_version(client: Any, name: str, alias: str) -> Any:
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception:  # MlflowException RESOURCE_DOES_NOT_EXIST: no such alias
        return None


def _history(client: Any, name: str) -> list[str]:
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG, "[]")
    try:
        return [str(v) for v in json.loads(raw)]
    except ValueError:
        return []


def check_name(name: str) -> str:
    """A ConfigError for a name MLflow cannot hold (or that would break a filter string)."""
    from instaflow_core.registration.rules import model_name_problem

    problem = model_name_problem(name)
    if problem:
        raise ConfigError(problem)
    return name


def _check_model(client: Any, name: str) -> list[Any]:
    versions = _versions(client, check_name(name))
    if not versions:
        known = sorted(m.name for m in client.search_registered_models())
        raise DataError(f"no registered model {name!r} at {client.tracking_uri} (models: {known or 'none'})")
    return versions


def promote_version(
    client: Any,
    name: str,
    gate: GateConfig,
    version: str | int | None = None,
    force: bool = False,
    reason: str | None = None,
) -> dict[str, Any]:
    """Move `champion` to `version` (default: the `candidate`) when the gate passes, or when forced with a
    reason (recorded on the version as `instaflow.forced_reason`). Returns the decision and what moved."""
    if force and not (reason and reason.strip()):
        raise ConfigError('--force needs --reason "...": the reason is recorded on the model version')
    versions = {str(mv.version): mv for mv in _check_model(client, name)}
    if version is None:
        cand = _alias_version(client, name, CANDIDATE)
        if cand is None:
            champ = _alias_version(client, name, CHAMPION)
            if champ is None:
                raise DataError(f"{name} has no '{CANDIDATE}' version: pass --version")
            # auto-promotion already moved champion to the newest registered version (e.g. after `make demo`)
            return {
                "model_name": name,
                "version": str(champ.version),
                "previous_champion": str(champ.version),
                "passed": True,
                "promoted": False,
                "forced": False,
                "nothing_to_promote": True,
                "reasons": [
                    f"nothing to promote: version {champ.version} is already champion "
                    f"(no '{CANDIDATE}' version; pass --version N to promote another)"
                ],
            }
        version = cand.version
    version = str(version)
    if version not in versions:
        raise DataError(f"{name} has no version {version} (versions: {', '.join(versions)})")
    mv = versions[version]
    champ = _alias_version(client, name, CHAMPION)
    base = {
        "model_name": name,
        "version": version,
        "previous_champion": str(champ.version) if champ else None,
    }
    if champ is not None and str(champ.version) == version:
        return {
            **base,
            "passed": True,
            "promoted": False,
            "forced": False,
            "reasons": ["already the champion"],
        }
    from instaflow_core.registration.rules import check_gate

    decision = check_gate(
        version_metrics(mv),
        version_metrics(champ) if champ is not None else None,
        gate.max_fid_increase,
        gate.max_clip_decrease,
    )
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.set_model_version_tag(name, version, "instaflow.gate", decision.summary()[:5000])
    if not decision.passed and not force:
        return {**base, "passed": False, "promoted": False, "forced": False, "reasons": decision.reasons}
    if force:
        client.set_model_version_tag(name, version, "instaflow.forced_reason", reason.strip())
        client.set_model_version_tag(name, version, "instaflow.forced_at", stamp)
    history = _history(client, name)
    if champ is not None:
        history.append(str(champ.version))
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "instaflow.promoted_at", stamp)
    cand = _alias_version(client, name, CANDIDATE)
    if cand is not None and str(cand.version) == version:
        client.delete_registered_model_alias(name, CANDIDATE)
    return {
        **base,
        "passed": decision.passed,
        "promoted": True,
        "forced": force and not decision.passed,
        "reasons": decision.reasons,
    }


def rollback_champion(client: Any, name: str) -> dict[str, Any]:
    """Give `champion` back to the version that held it before the current one (from the history tag)."""
    versions = {str(mv.version) for mv in _check_model(client, name)}
    history = _history(client, name)
    current = _alias_version(client, name, CHAMPION)
    while history and history[-1] not in versions:  # a deleted version cannot take the alias back
        history.pop()
    if not history:
        raise DataError(f"{name}: no previous champion to roll back to")
    previous = history.pop()
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if current is not None:
        client.set_model_version_tag(name, str(current.version), "instaflow.rolled_back_at", stamp)
    client.set_model_version_tag(name, previous, "instaflow.restored_at", stamp)
    return {"model_name": name, "champion": previous, "replaced": str(current.version) if current else None}


def list_models(client: Any, name: str | None = None) -> list[dict[str, Any]]:
    """Every version (of `name`, or of all registered models): aliases, key metrics, kind, creation time."""
    names = [name] if name else sorted(m.name for m in client.search_registered_models())
    if name:
        _check_model(client, name)  # a bad or unknown name: one line, not an MLflow traceback
    rows = []
    for n in names:
        aliases: dict[str, list[str]] = {}
        for alias, v in client.get_registered_model(n).aliases.items():
            aliases.setdefault(str(v), []).append(alias)
        for mv in _versions(client, n):
            metrics = version_metrics(mv)
            rows.append(
                {
                    "name": n,
                    "version": str(mv.version),
                    "aliases": sorted(aliases.get(str(mv.version), [])),
                    "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(mv.creation_timestamp / 1000)),
                    "kind": (mv.tags or {}).get("instaflow.kind", ""),
                    **{m: metrics.get(m) for m in SHOWN_METRICS},
                    "forced_reason": (mv.tags or {}).get("instaflow.forced_reason"),
                    # which networks computed fid / clip_score (labels; the headers are named after them)
                    "networks": {
                        k: (mv.tags or {}).get(f"instaflow.{k}", "") for k in ("fid_features", "clip_model")
                    },
                }
            )
    return rows
