"""Registration tasks: the diffusers folder logged as an MLflow pyfunc model and registered (alias `candidate`),
and the promotion gate as a task (auto-promotion after registration). The MLflow plumbing is tasks/tracking/."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from prefect import task

from instaflow_core.config import RegistrationConfig, StorageConfig, stable_hash
from instaflow_core.errors import DataError
from instaflow_core.refs import ModelRef, Stage
from instaflow_core.store import Store
from tasks.artifacts import publish_markdown
from tasks.caching import root_flow_run_id, stage_cache_key
from tasks.retries import STORE_RETRIES
from tasks.tracking.client import _parent_ok, ensure_experiment, mlflow_client, run_url
from tasks.tracking.promotion import CANDIDATE, _versions, promote_version, version_metrics

MODEL_KEY_TAG = "instaflow.model_key"

logger = logging.getLogger("instaflow.tasks.registration")


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


def _model_folder(store: Store, uri: str) -> Path:
    uri = store.resolve(uri)
    if uri.startswith("s3://"):
        return _registered_view(store.local_copy(uri), uri.rstrip("/").rsplit("/", 1)[-1])
    folder = store.local_path(uri)
    if not folder.is_dir():
        raise DataError(f"model folder {uri} not found")
    return folder


def _registered_view(cached: Path, name: str) -> Path:
    """The downloaded folder as it is in the store (hard links, named as there), without the cache's own
    `.complete` marker, which would otherwise be logged into the registered model."""
    view = cached.with_name(cached.name + "-registered") / name
    if not view.is_dir():
        tmp = view.with_name(f".{name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(cached, tmp, ignore=shutil.ignore_patterns(".complete"), copy_function=os.link)
        os.replace(tmp, view)
    return view


@task(name="register-model", cache_key_fn=stage_cache_key, persist_result=True, **STORE_RETRIES)
def register_model(
    registry: RegistrationConfig,
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

    from tasks.tracking import pyfunc_model
    from tasks.tracking.pyfunc_model import DIFFUSERS_ARTIFACT, signature

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
            "instaflow.model_uri": store.resolve(model.uri),
            "instaflow.kind": model.kind.value,
        }
        with mlflow.start_run(
            experiment_id=exp_id,
            run_name=f"register-{name}",
            parent_run_id=_parent_ok(client, parent_run_id),
            tags={**version_tags, "instaflow.stage": str(Stage.REGISTER)},
        ):
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=pyfunc_model.__file__,  # models from code: this file, not a pickle
                artifacts={DIFFUSERS_ARTIFACT: str(folder)},
                signature=signature(inference["num_inference_steps"], inference["guidance_scale"]),
                model_config={**inference, "kind": model.kind.value},
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


@task(name="register-promote", cache_key_fn=stage_cache_key, persist_result=True, **STORE_RETRIES)
def promote(
    registry: RegistrationConfig,
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
        "instaflow-register-promotion",
        f"### {name} v{result['version']}: {verdict}\n\n" + "\n".join(f"- {r}" for r in result["reasons"]),
        description="The promotion gate's decision",
    )
    return result
