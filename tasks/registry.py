"""MLflow: evaluation runs, pyfunc registration of diffusers folders, aliases and the promotion gate.

Tracking URI: `registry.tracking_uri`, or `sqlite:///<local store root>/mlflow.db` with artifacts in
`<root>/mlartifacts` next to it; for an s3:// store without a tracking URI, `./.instaflow/mlflow.db` (logged
as a warning: point registry.tracking_uri at the `mlflow server` of `instaflow stack up` to keep the registry
with the data). Against a server, artifacts go wherever the server sends them (S3 with --artifacts-destination).

Aliases, not stages: a new version gets `candidate`; `champion` moves only through `promote_version` (the
gate, or --force with a reason recorded as a tag); every move appends the previous champion to the registered
model's `instaflow.champion_history` tag, which `rollback_champion` pops. The plain functions take an
MlflowClient (the CLI uses them); the @task wrappers open the client from the config (the flows use them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import task

from instaflow_core.config import GateConfig, RegistryConfig, StorageConfig, stable_hash
from instaflow_core.errors import ConfigError, DataError, InstaflowError
from instaflow_core.refs import ModelRef
from instaflow_core.store import Store
from tasks.common import local_root, publish_markdown, root_flow_run_id, stage_cache_key

logger = logging.getLogger("instaflow.tasks.registry")

CANDIDATE = "candidate"
CHAMPION = "champion"
HISTORY_TAG = "instaflow.champion_history"
MODEL_KEY_TAG = "instaflow.model_key"
EVAL_KEY_TAG = "instaflow.eval_key"
GATE_METRICS = ("fid", "clip_score")
SHOWN_METRICS = ("fid", "clip_score", "latency_s", "straightness")
FALLBACK_DB = Path(".instaflow") / "mlflow.db"
_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


# ---------------------------------------------------------------------------------------- tracking URI
def tracking_uri(registry: RegistryConfig, storage: StorageConfig) -> str:
    """The MLflow tracking URI for this config (see the module docstring)."""
    if registry.tracking_uri:
        uri = registry.tracking_uri
        if "://" not in uri and not uri.startswith("databricks"):
            return "sqlite:///" + str(Path(uri).expanduser().resolve())  # a bare path means a sqlite file
        return uri
    root = local_root(storage)
    if root is None:
        db = FALLBACK_DB.resolve()
        logger.warning(
            "storage.root %s is not local and registry.tracking_uri is unset: using the MLflow registry at %s "
            "(set registry.tracking_uri to the stack's MLflow server to keep it with the data)",
            storage.root,
            db,
        )
    else:
        db = root / "mlflow.db"
    return "sqlite:///" + str(db)


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str) -> str | None:
    """For a sqlite tracking URI: <folder of the db>/mlartifacts (file URI); a server decides for itself."""
    db = _sqlite_path(uri)
    return (db.parent / "mlartifacts").as_uri() if db is not None else None


@contextlib.contextmanager
def mlflow_client(registry: RegistryConfig, storage: StorageConfig) -> Iterator[Any]:
    """An MlflowClient on the configured URI; the fluent API points there too until the block ends."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(registry, storage)
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    # set_*_uri also export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI: restore globals and environment after
    saved_env = {k: os.environ.get(k) for k in _URI_ENV}
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    previous_registry = os.environ.get("MLFLOW_REGISTRY_URI")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield MlflowClient(tracking_uri=uri, registry_uri=uri)
    except InstaflowError:
        raise
    except Exception as err:
        if _is_connection_error(err):
            raise ConfigError(
                f"MLflow at {uri} is not reachable: is the server running? (instaflow stack up)"
            ) from None
        raise
    finally:
        mlflow.set_tracking_uri(previous)
        mlflow.set_registry_uri(previous_registry)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds on a server that is down (MLflow's client would retry with backoff for minutes)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):  # noqa: S310
            return
    except urllib.error.HTTPError:
        return  # it answered (a proxy or auth in front may not expose /health): reachable
    except (urllib.error.URLError, OSError):
        raise ConfigError(
            f"MLflow at {uri} is not reachable: is the server running? (instaflow stack up), "
            "or unset registry.tracking_uri for the local sqlite registry"
        ) from None


def _is_connection_error(err: Exception) -> bool:
    text = f"{type(err).__name__}: {err}"
    return any(
        m in text
        for m in ("Connection refused", "Max retries exceeded", "ConnectionError", "Failed to establish")
    )


def ensure_experiment(client: Any, name: str) -> str:
    """The experiment id, creating it (artifacts next to a sqlite db) when missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri))


def run_url(client: Any, experiment_id: str, run_id: str) -> str | None:
    uri = client.tracking_uri
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return None


def _find_run(client: Any, experiment_id: str, key: str, value: str) -> Any:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{key}` = '{value}'", max_results=1)
    return runs[0] if runs else None


def _parent_ok(client: Any, parent_run_id: str | None) -> str | None:
    """A parent run id that exists on this server, else None (a stale id must not fail the stage)."""
    if not parent_run_id:
        return None
    try:
        client.get_run(parent_run_id)
        return parent_run_id
    except Exception:
        logger.warning(
            "parent MLflow run %s not found on %s: logging a top-level run",
            parent_run_id,
            client.tracking_uri,
        )
        return None


# ------------------------------------------------------------------------------------------- evaluation
@task(name="eval-mlflow-run", cache_key_fn=stage_cache_key, persist_result=True)
def log_evaluation(
    registry: RegistryConfig,
    storage: StorageConfig,
    results: dict[str, Any],
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """One MLflow run with every metric (`<setting>.<metric>`), the sample grids and the results JSON.

    Idempotent: a run already tagged with these results' key is returned instead of logging a duplicate
    (a cached rebuild does not add runs). Cached by Prefect on the registry section (tracking URI included) and
    the results; after resetting the MLflow database, `--refresh register` (or `evaluate`) logs again.
    """
    import mlflow
    import numpy as np

    store = Store(storage)
    with mlflow_client(registry, storage) as client:
        exp_id = ensure_experiment(client, registry.experiment)
        existing = _find_run(client, exp_id, EVAL_KEY_TAG, results["key"])
        if existing is not None:
            rid = existing.info.run_id
            return {
                "run_id": rid,
                "run_url": run_url(client, exp_id, rid),
                "experiment_id": exp_id,
                "reused": True,
            }
        networks, eval_set = results["networks"], results["eval_set"]
        tags = {
            EVAL_KEY_TAG: results["key"],
            "instaflow.eval_uri": results["uri"],
            "instaflow.stage": "evaluate",
            "instaflow.eval_set": eval_set["name"],
            "instaflow.reference": eval_set["reference"],
            "instaflow.fid_features": networks["fid_features"],
            "instaflow.clip_model": networks["clip_model"],
            "instaflow.paper_comparable": str(
                bool(
                    networks["fid_paper_comparable"]
                    and networks["clip_paper_comparable"]
                    and eval_set["paper_comparable"]
                )
            ).lower(),
            "instaflow.code_version": results.get("code_version", ""),
        }
        with mlflow.start_run(
            experiment_id=exp_id,
            run_name=f"evaluate-{eval_set['name']}",
            parent_run_id=_parent_ok(client, parent_run_id),
            tags=tags,
        ) as run:
            mlflow.log_params(
                {"eval_set": eval_set["name"], "samples": eval_set["samples"], "note": eval_set["note"][:500]}
            )
            metrics = {}
            for row in results["rows"]:
                for m in SHOWN_METRICS:
                    if row.get(m) is not None:
                        metrics[f"{row['name']}.{m}"] = float(row[m])
            mlflow.log_metrics(metrics)
            mlflow.log_dict(
                {k: results[k] for k in ("eval_set", "networks", "reference", "rows", "table")},
                "eval/results.json",
            )
            grids = []
            for row in results["rows"]:
                img = _read_png(store, row["grid_uri"])
                mlflow.log_image(img, f"eval/samples/{row['name']}.png")
                grids.append(img)
            if grids and len({g.shape[1] for g in grids}) == 1:
                # the settings' grids one under the other, in table order
                mlflow.log_image(np.concatenate(grids, axis=0), "eval/samples_grid.png")
            rid = run.info.run_id
        return {
            "run_id": rid,
            "run_url": run_url(client, exp_id, rid),
            "experiment_id": exp_id,
            "reused": False,
        }


def _read_png(store: Store, uri: str) -> Any:
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(store.read_bytes(uri))).convert("RGB"))


# ------------------------------------------------------------------------------------------ registration
def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in (
        "torch",
        "diffusers",
        "transformers",
        "accelerate",
        "safetensors",
        "mlflow",
        "numpy",
        "pandas",
        "pillow",
        "scipy",
        "pydantic",
        "pyyaml",
    ):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


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


def _model_folder(store: Store, uri: str) -> Path:
    if uri.startswith("s3://"):
        return store.local_copy(uri)
    folder = store.local_path(uri)
    if not folder.is_dir():
        raise DataError(f"model folder {uri} not found")
    return folder


@task(name="register-model", cache_key_fn=stage_cache_key, persist_result=True)
def register_model(
    registry: RegistryConfig,
    storage: StorageConfig,
    model: ModelRef,
    name: str,
    metrics: dict[str, float],
    tags: dict[str, str],
    inference: dict[str, Any],
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Log the diffusers folder as a pyfunc model, register it under `name`, tag it, alias it `candidate`.

    Idempotent on the model reference: a version already registered for `model.key()` is returned as it is.
    Cached by Prefect like every stage task; after resetting the MLflow database use `--refresh register`.
    """
    import mlflow

    from tasks import pyfunc_model
    from tasks.pyfunc_model import DIFFUSERS_ARTIFACT, signature

    store = Store(storage)
    with mlflow_client(registry, storage) as client:
        exp_id = ensure_experiment(client, registry.experiment)
        model_key = stable_hash(model.key())
        for mv in _versions(client, name):
            if (mv.tags or {}).get(MODEL_KEY_TAG) == model_key:
                logger.info("%s is already registered as %s version %s", model.key(), name, mv.version)
                return _registered(client, name, mv, exp_id, reused=True)
        folder = _model_folder(store, model.uri)
        version_tags = {
            **{k: str(v) for k, v in tags.items()},
            # the run that produced this version (the rebuild, when run from one): read here, not passed in,
            # so the task's cache key stays stable across rebuilds
            "instaflow.prefect_flow_run_id": root_flow_run_id(),
            **{f"metric.{k}": repr(float(v)) for k, v in metrics.items() if v is not None},
            MODEL_KEY_TAG: model_key,
            "instaflow.model_ref": model.key(),
            "instaflow.model_uri": model.uri,
            "instaflow.kind": model.kind,
        }
        with mlflow.start_run(
            experiment_id=exp_id,
            run_name=f"register-{name}",
            parent_run_id=_parent_ok(client, parent_run_id),
            tags={**version_tags, "instaflow.stage": "register"},
        ):
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=pyfunc_model.__file__,  # models from code: this file, not a pickle
                artifacts={DIFFUSERS_ARTIFACT: str(folder)},
                signature=signature(inference["num_inference_steps"], inference["guidance_scale"]),
                model_config={**inference, "kind": model.kind},
                pip_requirements=_pip_requirements(),
            )
        mv = mlflow.register_model(info.model_uri, name, tags=version_tags)
        client.set_registered_model_alias(name, CANDIDATE, mv.version)
        logger.info("registered %s version %s (alias %s)", name, mv.version, CANDIDATE)
        return _registered(client, name, client.get_model_version(name, mv.version), exp_id, reused=False)


def _registered(client: Any, name: str, mv: Any, exp_id: str, reused: bool) -> dict[str, Any]:
    aliases = [a for a, v in client.get_registered_model(name).aliases.items() if str(v) == str(mv.version)]
    return {
        "model_name": name,
        "version": str(mv.version),
        "model_uri": f"models:/{name}/{mv.version}",
        "run_id": mv.run_id,
        "run_url": run_url(client, exp_id, mv.run_id) if mv.run_id else None,
        "aliases": sorted(aliases),
        "metrics": version_metrics(mv),
        "tracking_uri": client.tracking_uri,
        "reused": reused,
    }


# --------------------------------------------------------------------------------------------- promotion
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


def _check_model(client: Any, name: str) -> list[Any]:
    versions = _versions(client, name)
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
            raise DataError(f"{name} has no '{CANDIDATE}' version: pass --version")
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
    from instaflow_core.metrics import check_gate  # lazy: metrics imports torch, `models list` should not

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
                }
            )
    return rows


@task(name="promote-model", cache_key_fn=stage_cache_key, persist_result=True)
def promote(
    registry: RegistryConfig,
    storage: StorageConfig,
    name: str,
    version: str | None = None,
    force: bool = False,
    reason: str | None = None,
) -> dict[str, Any]:
    """The gate as a task (auto-promotion after registration); publishes the decision as an artifact."""
    with mlflow_client(registry, storage) as client:
        result = promote_version(client, name, registry.gate, version, force, reason)
    verdict = (
        "promoted to champion" if result["promoted"] else ("blocked" if not result["passed"] else "unchanged")
    )
    publish_markdown(
        "instaflow-promotion",
        f"### {name} v{result['version']}: {verdict}\n\n" + "\n".join(f"- {r}" for r in result["reasons"]),
        description="The promotion gate's decision",
    )
    return result


__all__ = [
    "CANDIDATE",
    "CHAMPION",
    "artifact_location",
    "ensure_experiment",
    "list_models",
    "log_evaluation",
    "mlflow_client",
    "promote",
    "promote_version",
    "register_model",
    "rollback_champion",
    "tracking_uri",
    "version_metrics",
]
