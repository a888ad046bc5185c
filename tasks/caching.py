"""What every task shares: cache keys built from references, result storage, artifacts.

Contract 2 (docs/interfaces.md): tasks return references (URI + table version + config hash), never tensors, and a task's
cache key is a hash of those references, the config section it reads and the code version. An unchanged stage is
then a cache hit in any later run, and a changed config recomputes only what depends on it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from instaflow_core.config import OrchestrationConfig, StorageConfig, stable_hash
from instaflow_core.refs import Stage, downstream

WINDOW_ENV = (
    "INSTAFLOW_RETRY_WINDOW_S"  # the run's retry window (prefect_settings sets it; tasks/retries.py reads it)
)

logger = logging.getLogger("instaflow.tasks")

_CODE_DIRS = ("instaflow_core", "tasks")
_REPO = Path(__file__).resolve().parent.parent


@functools.cache
def code_version() -> str:
    """A hash of the compute code (instaflow_core + tasks sources): a code change invalidates cached stages."""
    h = hashlib.sha256()
    for d in _CODE_DIRS:
        for path in sorted((_REPO / d).rglob("*.py")):
            h.update(str(path.relative_to(_REPO)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


@functools.cache
def git_sha() -> str:
    """The git commit of the checkout (for lineage tags), or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=5
        )
        sha = out.stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _key_material(value: Any) -> Any:
    """Reduce a task parameter to what identifies it: refs and config sections by value, others by repr.

    Where the store is (root, endpoint, key variables) never changes what a stage computes, and references are
    store-relative (`store://...`): a store copied or moved elsewhere keeps its cache hits. Results live in the
    store itself (or, with `orchestration.result_storage`, in a folder per store root), so two stores never
    share a cache entry.
    """
    if isinstance(value, StorageConfig):
        return "store"
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _key_material(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_key_material(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


# Parameters that say where to log, not what to compute: a new MLflow parent run must not invalidate a stage.
NOT_IN_KEY = frozenset({"parent_run_id", "mlflow_parent_run_id", "lease_ttl_s", "rows_per_commit"})


def stage_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect `cache_key_fn`: task name + its reference/config parameters + code version."""
    payload = {
        "task": context.task.name,
        "params": {k: _key_material(v) for k, v in sorted(parameters.items()) if k not in NOT_IN_KEY},
        "code": code_version(),
    }
    return f"{context.task.name}-{stable_hash(payload)}"


@contextlib.contextmanager
def prefect_settings(storage: StorageConfig, orchestration: OrchestrationConfig) -> Iterator[None]:
    """Persist task results (needed for cross-run cache hits) next to the data, for the duration of a run.

    file:// stores keep results in <root>/prefect-results; s3:// stores use a saved RemoteFileSystem block
    (Prefect needs it saved before tasks resolve their storage), keys taken from the environment.
    """
    from prefect.settings import (
        PREFECT_DEFAULT_RESULT_STORAGE_BLOCK,
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_RESULTS_PERSIST_BY_DEFAULT,
        temporary_settings,
    )

    updates: dict[Any, Any] = {PREFECT_RESULTS_PERSIST_BY_DEFAULT: True}
    target = storage.root.rstrip("/") + "/prefect-results"
    if orchestration.result_storage:  # shared by several stores: one folder per store (keys omit the root)
        target = f"{orchestration.result_storage.rstrip('/')}/{stable_hash(storage.root)[:12]}"
    if target.startswith("s3://"):
        updates[PREFECT_DEFAULT_RESULT_STORAGE_BLOCK] = _s3_result_block(target, storage)
    else:
        path = (
            Path(target[len("file://") :] if target.startswith("file://") else target).expanduser().resolve()
        )
        path.mkdir(parents=True, exist_ok=True)
        updates[PREFECT_LOCAL_STORAGE_PATH] = path
    saved = os.environ.get(WINDOW_ENV)
    os.environ[WINDOW_ENV] = str(orchestration.retry_window_s)  # read by the retry condition of every task
    try:
        with temporary_settings(updates=updates):
            yield
    finally:
        if saved is None:
            os.environ.pop(WINDOW_ENV, None)
        else:
            os.environ[WINDOW_ENV] = saved


def _s3_result_block(basepath: str, storage: StorageConfig) -> str:
    from prefect.filesystems import RemoteFileSystem

    client_kwargs: dict[str, Any] = {"region_name": storage.s3_region}
    if storage.s3_endpoint:
        client_kwargs["endpoint_url"] = storage.s3_endpoint
    settings = {
        "key": os.environ.get(storage.access_key_env),
        "secret": os.environ.get(storage.secret_key_env),
        "client_kwargs": client_kwargs,
        # Short, as the store's own client: s3fs retries each call 5 times over botocore's attempts, so botocore's
        # longer backoff made each cache lookup of a task wait minutes on a dead endpoint before Prefect called it
        # a miss, whatever orchestration.retry_window_s said. Outages are the task retries' job (tasks/retries.py):
        # a result that cannot be written fails the attempt, and the retry finds the shard's committed rows.
        "config_kwargs": {
            "connect_timeout": 5,
            "read_timeout": 120,
            "retries": {"max_attempts": 2, "mode": "standard"},
        },
    }
    name = "instaflow-results-" + stable_hash({"base": basepath, "endpoint": storage.s3_endpoint})[:10]
    RemoteFileSystem(basepath=basepath, settings=settings).save(name, overwrite=True)
    return f"remote-file-system/{name}"


def root_flow_run_id() -> str:
    """The id of the outermost flow run (the rebuild, when a stage runs as its subflow); '' outside Prefect."""
    from prefect.context import FlowRunContext, TaskRunContext

    task_ctx, flow_ctx = TaskRunContext.get(), FlowRunContext.get()
    run_id = (
        str(task_ctx.task_run.flow_run_id) if task_ctx else (str(flow_ctx.flow_run.id) if flow_ctx else "")
    )
    if not run_id:
        return ""
    try:
        from prefect import get_client

        with get_client(sync_client=True) as client:
            run = client.read_flow_run(run_id)
            for _ in range(16):  # subflows nest a few levels at most
                if run.parent_task_run_id is None:
                    break
                parent_task = client.read_task_run(run.parent_task_run_id)
                run = client.read_flow_run(parent_task.flow_run_id)
            return str(run.id)
    except Exception as err:  # lineage must not fail a registration
        logger.warning("could not resolve the root flow run of %s: %s", run_id, err)
        return run_id


# ---------------------------------------------------------------------------------------------- artifacts


@contextlib.contextmanager
def stage_settings(stage: Stage, forced: Iterable[Stage]) -> Iterator[None]:
    """Prefect settings for one stage's subflow of the rebuild.

    - Heartbeats off for the stage subflows: Prefect's heartbeat thread sleeps in 1 s steps and is joined when a
      flow run ends, which added ~1 s to every stage (most of a no-change rebuild's time). The rebuild's own run
      keeps its heartbeat, so a crashed rebuild is still detected.
    - Refresh the cache (force re-execution) of every task in this stage when the user asked to refresh it
      (`forced`) or a stage whose outputs it depends on (the stage graph's `downstream`).
    """
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_TASKS_REFRESH_CACHE,
        temporary_settings,
    )

    updates: dict[Any, Any] = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    if stage in downstream(forced):
        updates[PREFECT_TASKS_REFRESH_CACHE] = True
    with temporary_settings(updates=updates):
        yield
