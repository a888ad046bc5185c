"""`instaflow schedule`: the weekly rebuild as a Prefect deployment on a work pool.

    instaflow schedule --cron "0 3 * * 0" --preset tiny [--set k=v ...] [--name NAME] [--pool POOL]
    instaflow schedule list | pause NAME | resume NAME | run NAME [--wait] | worker [--pool POOL]

The deployment runs `flows/rebuild.py:scheduled_rebuild` from this checkout (a `set_working_directory` pull
step) with plain JSON parameters (preset + overrides), resolved on the worker. Deployments need a real Prefect
server that workers can reach: $PREFECT_API_URL (or the Prefect profile's), else the local stack's when it is up.
Secrets never go into the deployment (the UI shows its job variables): workers take S3 keys from their own
environment, which `instaflow schedule worker` fills from the local stack when it is up.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from flows.options import PresetOpt, SetOpt, load_config
from instaflow_core.errors import ConfigError, InstaflowError

app = typer.Typer(
    help="Scheduled rebuilds: a Prefect deployment of the rebuild flow on a work pool.",
    no_args_is_help=False,
)
console = Console(soft_wrap=True)

REPO = Path(__file__).resolve().parent.parent
ENTRYPOINT = "flows/rebuild.py:scheduled_rebuild"
FLOW_NAME = "instaflow-scheduled-rebuild"  # the @flow name of scheduled_rebuild
DEFAULT_POOL = "instaflow-process"
# Non-secret environment for every flow run (shown in the UI as job variables, so never keys).
RUN_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false"}

ApiOpt = typer.Option(
    None, "--prefect-api", help="Prefect API URL (default: $PREFECT_API_URL, else the local stack's)."
)
PoolOpt = typer.Option(
    DEFAULT_POOL, "--pool", help="Work pool name (created as a `process` pool if missing)."
)


class ScheduleError(InstaflowError):
    """No reachable Prefect server, or an unknown deployment / work pool."""


# ----------------------------------------------------------------------------------------- the server
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


# ------------------------------------------------------------------------------------------ helpers
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
        console.print(f"created work pool [bold]{pool}[/] (type process)")
        return "process"


def _read_deployment(client: Any, name: str) -> Any:
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(full_name(name))
    except ObjectNotFound:
        raise ScheduleError(
            f"no deployment named {full_name(name)!r}: see `instaflow schedule list`"
        ) from None


def deployment_parameters(preset: str, sets: list[str] | None, refresh: list[str] | None) -> dict[str, Any]:
    """The deployment's parameters, validated here so a typo fails now and not at 3 am on the worker."""
    load_config(preset, sets)
    if refresh:
        from flows.rebuild import check_refresh

        check_refresh(refresh)
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
        raise ConfigError(f"{what}: {msg.removeprefix('Value error, ')}") from None
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


# ------------------------------------------------------------------------------------------ commands
@app.callback(invoke_without_command=True)
def schedule(
    ctx: typer.Context,
    cron: str | None = typer.Option(
        None, "--cron", help='Cron expression, e.g. "0 3 * * 0" (Sundays 03:00).'
    ),
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
    name: str | None = typer.Option(None, "--name", help="Deployment name (default rebuild-<preset>)."),
    pool: str = PoolOpt,
    timezone: str | None = typer.Option(None, "--timezone", help="IANA zone for the cron (default UTC)."),
    refresh: list[str] = typer.Option(
        None, "--refresh", help="Force this stage and all after it in every run."
    ),
    paused: bool = typer.Option(False, "--paused", help="Create the deployment paused."),
    prefect_api: str | None = ApiOpt,
) -> None:
    """Create (or update) the scheduled rebuild deployment; sub-commands manage it."""
    if ctx.invoked_subcommand is not None:
        return
    if not cron:
        console.print(ctx.get_help())
        raise ConfigError('give a schedule: instaflow schedule --cron "0 3 * * 0" --preset tiny')
    with connected(prefect_api):
        info = create_deployment(
            cron,
            preset,
            set_,
            name=name,
            pool=pool,
            timezone=timezone,
            refresh=refresh,
            paused=paused or None,
        )
    console.print(f"deployment [bold]{info['name']}[/] ({info['id']})")
    console.print(f"  cron {cron}{f' {timezone}' if timezone else ''} on work pool {pool}")
    sets = " ".join(f"--set {o}" for o in info["parameters"]["overrides"])
    console.print(f"  parameters: --preset {info['parameters']['preset']} {sets}".rstrip())
    console.print(f"start a worker: [bold]instaflow schedule worker --pool {pool}[/]")


@app.command("list")
def list_(prefect_api: str | None = ApiOpt) -> None:
    """Deployments of the rebuild flow with their schedules, paused state and next run."""
    with connected(prefect_api):
        rows = list_deployments()
    if not rows:
        console.print('no scheduled rebuilds yet: instaflow schedule --cron "0 3 * * 0" --preset tiny')
        return
    t = Table(title="Scheduled rebuilds")
    for col in ("deployment", "schedule", "paused", "pool", "next run"):
        t.add_column(col, no_wrap=True)
    for r in rows:
        t.add_row(
            r["name"].split("/", 1)[1],
            ", ".join(r["schedules"]) or "-",
            "yes" if r["paused"] else "no",
            str(r["pool"]),
            r["next_run"],
        )
    console.print(t)
    for r in rows:  # parameters below the table: overrides are long and must not be cut
        p = r["parameters"]
        sets = " ".join(f"--set {o}" for o in p.get("overrides") or [])
        refresh = " ".join(f"--refresh {x}" for x in p.get("refresh") or [])
        console.print(f"{r['name']}: --preset {p.get('preset')} {sets} {refresh}".rstrip(), soft_wrap=True)


@app.command()
def pause(name: str = typer.Argument(..., help="Deployment name"), prefect_api: str | None = ApiOpt) -> None:
    """Pause a deployment: its schedule stops creating runs until resumed."""
    from prefect import get_client

    with connected(prefect_api), get_client(sync_client=True) as client:
        dep = _read_deployment(client, name)
        client.pause_deployment(dep.id)
    console.print(f"paused {full_name(name)}")


@app.command()
def resume(name: str = typer.Argument(..., help="Deployment name"), prefect_api: str | None = ApiOpt) -> None:
    """Resume a paused deployment."""
    from prefect import get_client

    with connected(prefect_api), get_client(sync_client=True) as client:
        dep = _read_deployment(client, name)
        client.resume_deployment(dep.id)
    console.print(f"resumed {full_name(name)}")


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


@app.command()
def run(
    name: str = typer.Argument(..., help="Deployment name"),
    wait: bool = typer.Option(
        False, "--wait", help="Block until the run finishes (a worker must be running)."
    ),
    timeout: float | None = typer.Option(
        None, "--timeout", help="With --wait: give up after this many seconds."
    ),
    prefect_api: str | None = ApiOpt,
) -> None:
    """Trigger a run of a deployment now."""
    with connected(prefect_api) as env:
        fr = trigger(name)
        console.print(f"flow run {fr.name} ({fr.id}) {fr.state.name if fr.state else ''}")
        console.print(f"  {env['PREFECT_API_URL'].removesuffix('/api')}/runs/flow-run/{fr.id}")
        if not wait:
            return
        console.print(
            f"waiting for a worker on pool {fr.work_pool_name} (instaflow schedule worker --pool {fr.work_pool_name})"
        )
        fr = wait_for(fr.id, timeout)
    state = fr.state.name if fr.state else "unknown"
    console.print(f"flow run {fr.name}: {state}")
    if fr.state is None or not fr.state.is_final():
        raise ScheduleError(
            f"flow run {fr.name} is still {state} after {timeout:.0f}s: is a worker running on pool {fr.work_pool_name}?"
        )
    if not fr.state.is_completed():
        raise ScheduleError(f"flow run {fr.name} ended {state}: see the Prefect UI for its logs")


@app.command()
def worker(
    pool: str = PoolOpt,
    run_once: bool = typer.Option(False, "--run-once", help="Exit after picking up the runs waiting now."),
    limit: int | None = typer.Option(None, "--limit", help="Most flow runs this worker runs at once."),
    prefect_api: str | None = ApiOpt,
) -> None:
    """Start a process worker for the pool in the foreground (Ctrl-C stops it)."""
    with connected(prefect_api) as env:
        kind = ensure_pool(pool)
        if kind != "process":
            raise ScheduleError(
                f"work pool {pool!r} is a {kind} pool: start its worker with `prefect worker start --pool {pool}`"
            )
        cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
        if run_once:
            cmd.append("--run-once")
        if limit:
            cmd += ["--limit", str(limit)]
        console.print(f"worker for pool {pool} on {env['PREFECT_API_URL']} (cwd {REPO})")
        # The worker and its flow runs inherit this environment (stack S3 keys, MLflow URI), never the deployment.
        child_env = {**os.environ, **env, **RUN_ENV}
        rc = subprocess.call(cmd, env=child_env, cwd=REPO)
    if rc not in (0, -2, 130):
        raise typer.Exit(rc)
