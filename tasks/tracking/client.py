"""MLflow: evaluation runs, pyfunc registration of diffusers folders, aliases and the promotion gate.

Tracking URI: `registration.tracking_uri`, or `sqlite:///<local store root>/mlflow.db` with artifacts in
`<root>/mlartifacts` next to it; for an s3:// store without a tracking URI, `./.instaflow/mlflow.db` (logged
as a warning: point registration.tracking_uri at the `mlflow server` of `instaflow stack up` to keep the registry
with the data). Against a server, artifacts go wherever the server sends them (S3 with --artifacts-destination).

Aliases, not stages: a new version gets `candidate`; `champion` moves only through `promote_version` (the
gate, or --force with a reason recorded as a tag); every move appends the previous champion to the registered
model's `instaflow.champion_history` tag, which `rollback_champion` pops. The plain functions take an
MlflowClient (the CLI uses them); the @task wrappers open the client from the config (the flows use them).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from instaflow_core.config import RegistrationConfig, StorageConfig
from instaflow_core.errors import ConfigError, InstaflowError
from instaflow_core.store.schemes import local_root
from tasks.retries import is_unreachable

logger = logging.getLogger("instaflow.tasks.tracking")

GATE_METRICS = ("fid", "clip_score")
FALLBACK_DB = Path(".instaflow") / "mlflow.db"
_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


# ---------------------------------------------------------------------------------------- tracking URI
def tracking_uri(registry: RegistrationConfig, storage: StorageConfig) -> str:
    """The MLflow tracking URI for this config (see the module docstring)."""
    if registry.tracking_uri:
        uri = registry.tracking_uri
        if "://" not in uri and not uri.startswith("databricks"):
            return "sqlite:///" + str(Path(uri).expanduser().resolve())  # a bare path means a sqlite file
        return uri
    root = local_root(storage.root)
    if root is None:
        db = FALLBACK_DB.resolve()
        logger.warning(
            "storage.root %s is not local and registration.tracking_uri is unset: using the MLflow registry at %s "
            "(set registration.tracking_uri to the stack's MLflow server to keep it with the data)",
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
def mlflow_client(registry: RegistrationConfig, storage: StorageConfig) -> Iterator[Any]:
    """An MlflowClient on the configured URI; the fluent API points there too until the block ends."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(registry, storage)
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    if uri.startswith(("http://", "https://")):
        check_server(uri)
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
        if is_unreachable(err):
            raise unreachable(uri) from err
        raise
    finally:
        mlflow.set_tracking_uri(previous)
        mlflow.set_registry_uri(previous_registry)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def unreachable(uri: str) -> ConfigError:
    """The one message for a tracking server that does not answer (transient inside a run: retried)."""
    err = ConfigError(
        f"MLflow at {uri} is not reachable: is the server running? (instaflow stack up), "
        "or unset registration.tracking_uri for the local sqlite registry"
    )
    err.transient = True  # type: ignore[attr-defined]  # tasks/retries.py retries it within the window
    return err


def server_answers(uri: str, timeout: float = 5.0) -> bool:
    """True when a server answers HTTP at uri/health (any status: a proxy or auth in front may hide /health)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):  # noqa: S310
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds on a server that is down (MLflow's client would retry with backoff for minutes)."""
    if not server_answers(uri, timeout):
        raise unreachable(uri)


def ensure_experiment(client: Any, name: str) -> str:
    """The experiment id, creating it (artifacts next to a sqlite db) when missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        db, wanted = _sqlite_path(client.tracking_uri), artifact_location(client.tracking_uri)
        if db is not None and wanted:  # a registry that moved with its store: artifacts follow it
            from tasks.tracking.relocate import relocate, stale_prefix

            old = stale_prefix(exp.artifact_location, wanted)
            if old:
                relocate(db, old, wanted)
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri))


def run_url(client: Any, experiment_id: str, run_id: str) -> str | None:
    uri = client.tracking_uri
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return None


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
