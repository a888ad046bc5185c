"""`instaflow stack up|down|status|env`: the local SeaweedFS S3 + Prefect server + MLflow server."""

from __future__ import annotations

from pathlib import Path

import typer

from infra import stack

app = typer.Typer(help="Run the local stack: SeaweedFS S3, Prefect server, MLflow server (loopback only).")

StateDir = typer.Option(
    None,
    "--state-dir",
    envvar="INSTAFLOW_STACK_DIR",
    help="State folder (pids, logs, data, keys). [~/.instaflow/stack]",
)


def _print_status(state_dir: Path | None) -> list[str]:
    """Print one line per service; returns the names of those not healthy."""
    rows = stack.status(state_dir)
    for s in rows:
        pid = f"pid {s.pid}" if s.pid else ""
        typer.echo(f"  {stack.LABELS[s.name]:<16} {s.url:<24} {pid:<11} {s.state}")
    return [s.name for s in rows if not s.healthy]


def _print_exports(state_dir: Path | None) -> None:
    typer.echo("\nTo use it from a shell:")
    for line in stack.export_lines(state_dir):
        typer.echo(f"  {line}")
    overrides = " ".join(f"--set {o}" for o in stack.storage_overrides(state_dir))
    typer.echo(f"\nRuns on its S3: instaflow rebuild {overrides}")


@app.command()
def up(
    state_dir: Path | None = StateDir,
    s3_port: int | None = typer.Option(None, help=f"S3 port [{stack.DEFAULT_PORTS['s3']}]"),
    prefect_port: int | None = typer.Option(None, help=f"Prefect port [{stack.DEFAULT_PORTS['prefect']}]"),
    mlflow_port: int | None = typer.Option(None, help=f"MLflow port [{stack.DEFAULT_PORTS['mlflow']}]"),
    timeout: float = typer.Option(180.0, help="Seconds to wait for each service to become healthy."),
) -> None:
    """Start the services that are not running yet and wait until all three are healthy."""
    stack.up(
        state_dir,
        s3_port=s3_port,
        prefect_port=prefect_port,
        mlflow_port=mlflow_port,
        timeout=timeout,
        echo=typer.echo,
    )
    typer.echo(f"\nstack in {stack.resolve_state_dir(state_dir)}:")
    _print_status(state_dir)
    _print_exports(state_dir)


@app.command()
def down(
    state_dir: Path | None = StateDir,
    timeout: float = typer.Option(20.0, help="Seconds between SIGTERM and SIGKILL."),
) -> None:
    """Stop every service of the stack (data and keys stay in the state folder)."""
    stack.down(state_dir, timeout=timeout, echo=typer.echo)


@app.command()
def status(state_dir: Path | None = StateDir) -> None:
    """Each service's URL and health, and the exports a shell needs. Exit 1 unless all are healthy."""
    typer.echo(f"stack in {stack.resolve_state_dir(state_dir)}:")
    unhealthy = _print_status(state_dir)
    if stack.load_state(state_dir) is not None:
        _print_exports(state_dir)
    if unhealthy:
        raise stack.StackError(f"not healthy: {', '.join(unhealthy)} (start with `instaflow stack up`)")


@app.command("env")
def env_cmd(state_dir: Path | None = StateDir) -> None:
    """Print the export lines only: `eval "$(instaflow stack env)"`."""
    for line in stack.export_lines(state_dir):
        typer.echo(line)
