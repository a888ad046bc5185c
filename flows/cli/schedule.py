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

import os
import subprocess
import sys

import typer
from rich.console import Console
from rich.table import Table

from flows.cli.options import PresetOpt, SetOpt
from infra.deployments import (
    DEFAULT_POOL,
    REPO,
    RUN_ENV,
    ScheduleError,
    _read_deployment,
    connected,
    create_deployment,
    ensure_pool,
    full_name,
    list_deployments,
    trigger,
    wait_for,
)
from instaflow_core.errors import ConfigError

app = typer.Typer(
    help="Scheduled rebuilds: a Prefect deployment of the rebuild flow on a work pool.",
    no_args_is_help=False,
)
console = Console(soft_wrap=True)


ApiOpt = typer.Option(
    None, "--prefect-api", help="Prefect API URL (default: $PREFECT_API_URL, else the local stack's)."
)
PoolOpt = typer.Option(
    DEFAULT_POOL, "--pool", help="Work pool name (created as a `process` pool if missing)."
)


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
