"""The scheduled rebuild as a Prefect deployment: the server to talk to, work pools, deployments, runs.

The deployment runs `flows/rebuild.py:scheduled_rebuild` from this checkout (a `set_working_directory` pull
step) with plain JSON parameters (preset + overrides), resolved on the worker. Secrets never go into the
deployment (the UI shows its job variables): workers take S3 keys from their own environment."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from instaflow_core.config import load
from instaflow_core.errors import ConfigError, InstaflowError
from instaflow_core.refs import parse_stages

logger = logging.getLogger("instaflow.infra.deployments")


REPO = Path(__file__).resolve().parent.parent  # the checkout the deployment runs from


ENTRYPOINT = "flows/rebuild.py:scheduled_rebuild"


FLOW_NAME = "instaflow-scheduled-rebuild"  # the @flow name of scheduled_rebuild


DEFAULT_POOL = "instaflow-process"


# Non-secret environment for every flow run (shown in the UI as job variables, so never keys).
RUN_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false"}


class ScheduleError(InstaflowError):
    """No reachable Prefect server, or an unknown deployment / work pool."""


def _stack_env() -> dict[str, str]:
    """The local stack's client environment (PREFECT_API_URL, MLflow, S3 keys) when its Prefect is up, else {}."""
    try:
        from infra import stack
    except ImportError:
        return {}
    try:
        state_dir = stack.resolve_state_dir()
        if stack.load_state(state_dir) is None:
            return {}
        if not any(s.name == "prefect" and s.healthy for s in stack.status(state_dir)):
            return {}
        return {k: str(v) for k, v in stack.env(state_dir).items() if v is not None}
    except Exception:  # a half-written or stale state folder counts as "not up"
        return {}


def resolve_api(prefect_api: str | None = None) -> tuple[str, dict[str, str]]:
    """(API URL, extra environment for workers): --prefect-api, $PREFECT_API_URL / the Prefect profile, or
    the local stack. Raises ScheduleError with one line when there is none."""
    from prefect.settings import PREFECT_API_URL

    extra: dict[str, str] = {}
    url = prefect_api or os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if not url:
        extra = _stack_env()
        url = extra.get("PREFECT_API_URL")
    if not url:
        raise ScheduleError(
            "scheduling needs a Prefect server: run `instaflow stack up` (or set PREFECT_API_URL)"
        )
    return url.rstrip("/"), extra


@contextlib.contextmanager
def connected(prefect_api: str | None = None) -> Iterator[dict[str, str]]:
    """Point the Prefect client (and child processes) at the server; yields the environment for workers."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, extra = resolve_api(prefect_api)
    env = {**extra, "PREFECT_API_URL": url}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        # Prefect reads its settings once at import: the context override is what its client sees.
        with temporary_settings(updates={PREFECT_API_URL: url}):
            with get_client(sync_client=True) as client:
                err = client.api_healthcheck()
            if err is not None:
                raise ScheduleError(
                    f"Prefect API at {url} is not reachable ({type(err).__name__}): is the server up?"
                )
            yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def full_name(name: str) -> str:
    """`NAME` -> `instaflow-scheduled-rebuild/NAME`; `flow/NAME` is kept."""
    return name if "/" in name else f"{FLOW_NAME}/{name}"


def ensure_pool(pool: str) -> str:
    """Create `pool` as a process work pool if it does not exist; returns its type."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(pool).type
        except ObjectNotFound:
            pass
        template = ProcessWorker.get_default_base_job_template()
        with contextlib.suppress(ObjectAlreadyExists):  # created meanwhile by someone else: fine
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
        logger.info("created work pool %s (type process)", pool)
        return "process"


def _read_deployment(client: Any, name: str) -> Any:
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(full_name(name))
    except ObjectNotFound as err:
        raise ScheduleError(
            f"no deployment named {full_name(name)!r}: see `instaflow schedule list`"
        ) from err


def deployment_parameters(preset: str, sets: list[str] | None, refresh: list[str] | None) -> dict[str, Any]:
    """The deployment's parameters, validated here so a typo fails now and not at 3 am on the worker."""
    load(preset, sets or [])
    if refresh:
        parse_stages(refresh, "--refresh")
    # A preset file given relative to the caller's cwd must still resolve on the worker (cwd = the repo).
    p = Path(preset)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        preset = str(p.resolve())
    return {"preset": preset, "overrides": list(sets or []), "refresh": list(refresh or [])}


def create_deployment(
    cron: str,
    preset: str = "tiny",
    sets: list[str] | None = None,
    *,
    name: str | None = None,
    pool: str = DEFAULT_POOL,
    timezone: str | None = None,
    refresh: list[str] | None = None,
    paused: bool | None = None,
) -> dict[str, Any]:
    """Create or update the scheduled rebuild deployment (call inside `connected()`). Returns its summary."""
    from prefect import flow
    from prefect.schedules import Cron

    params = deployment_parameters(preset, sets, refresh)
    try:
        from prefect.client.schemas.schedules import CronSchedule

        CronSchedule(cron=cron, timezone=timezone)  # validates the expression and the zone
    except ValueError as err:
        msg = err.errors()[0]["msg"] if hasattr(err, "errors") else str(err)
        what = f"--cron {cron!r}" + (f" --timezone {timezone!r}" if timezone else "")
        raise ConfigError(f"{what}: {msg.removeprefix('Value error, ')}") from err
    schedule = Cron(cron, timezone=timezone)
    name = name or f"rebuild-{Path(preset).stem}"
    ensure_pool(pool)
    rebuild = flow.from_source(source=str(REPO), entrypoint=ENTRYPOINT)
    deployment = rebuild.to_deployment(
        name=name,
        schedule=schedule,
        parameters=params,
        paused=paused,
        tags=["instaflow", f"preset:{Path(preset).stem}"],
        description=f"Scheduled InstaFlow rebuild ({cron}): preset {preset}, overrides {params['overrides']}",
        work_pool_name=pool,
        job_variables={"env": RUN_ENV},
    )
    dep_id = deployment.apply(work_pool_name=pool)
    return {
        "id": str(dep_id),
        "name": f"{FLOW_NAME}/{name}",
        "cron": cron,
        "pool": pool,
        "parameters": params,
    }


def _next_run(client: Any, dep: Any) -> str:
    """The earliest scheduled flow run the server has created for this deployment ('-' when none yet)."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
        ),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC,
        limit=1,
    )
    if runs and runs[0].expected_start_time:
        return runs[0].expected_start_time.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%MZ")
    return "-"


def list_deployments() -> list[dict[str, Any]]:
    """Every deployment of the rebuild flow: name, schedules, paused, pool, parameters, next run."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    out = []
    with get_client(sync_client=True) as client:
        deps = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])))
        for dep in sorted(deps, key=lambda d: d.name):
            crons = []
            for s in dep.schedules:
                expr = getattr(s.schedule, "cron", None) or str(s.schedule)
                tz = getattr(s.schedule, "timezone", None)
                crons.append(
                    f"{expr}{f' ({tz})' if tz and tz != 'UTC' else ''}{'' if s.active else ' [inactive]'}"
                )
            out.append(
                {
                    "name": f"{FLOW_NAME}/{dep.name}",
                    "schedules": crons,
                    "paused": bool(dep.paused),
                    "pool": dep.work_pool_name,
                    "parameters": dep.parameters,
                    "next_run": "-" if dep.paused else _next_run(client, dep),
                }
            )
    return out


def trigger(name: str) -> Any:
    """Create a flow run of the deployment now (a worker on its pool picks it up); returns the FlowRun."""
    from prefect import get_client
    from prefect.deployments import run_deployment

    with get_client(sync_client=True) as client:
        dep = _read_deployment(client, name)
    return run_deployment(dep.id, timeout=0, as_subflow=False, tags=["instaflow", "manual"])


def wait_for(flow_run_id: Any, timeout: float | None = None, poll: float = 2.0) -> Any:
    """Poll the flow run until it reaches a final state (or `timeout` seconds pass); returns the FlowRun."""
    from prefect import get_client

    deadline = None if timeout is None else time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            if deadline is not None and time.monotonic() > deadline:
                return run
            time.sleep(poll)
