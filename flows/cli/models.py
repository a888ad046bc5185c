"""`instaflow models list|promote|rollback`: the MLflow registry, aliases and the promotion gate.

The tracking URI comes from the config (`--preset` / `--set registration.tracking_uri=...`): the same registry the
register stage wrote to.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from flows.cli.options import PresetOpt, SetOpt, load_config

app = typer.Typer(
    help="Registered models: list versions, promote through the gate, roll back.", no_args_is_help=True
)


def _fmt(value: float | None, nd: int) -> str:
    return "-" if value is None else f"{value:.{nd}f}"


@app.command("list")
def list_cmd(
    name: str = typer.Option(None, "--name", "-n", help="Only this registered model (default: all)."),
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Versions with their aliases and key metrics."""
    from rich.console import Console
    from rich.table import Table

    from tasks.tracking.client import mlflow_client, tracking_uri
    from tasks.tracking.promotion import check_name, list_models

    cfg = load_config(preset, set_)
    if name:
        check_name(name)
    # piped output (no terminal) would be cut to 80 columns: print the whole table instead
    console = Console() if sys.stdout.isatty() else Console(width=200)
    uri = tracking_uri(cfg.registration, cfg.storage)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        # a read never creates a registry
        console.print(f"no registered models at {uri} (no registry yet: run `instaflow rebuild`)")
        return
    with mlflow_client(cfg.registration, cfg.storage) as client:
        rows = list_models(client, name)
    if not rows:
        console.print(f"no registered models at {tracking_uri(cfg.registration, cfg.storage)}")
        return
    from instaflow_core.evaluation.names import column_names

    table = Table(title=f"models at {tracking_uri(cfg.registration, cfg.storage)}")
    heads = {column_names(r.get("networks")) for r in rows}
    # named by the networks that computed them (FD(tiny-CLIP), not FID, unless the real ones ran)
    fid_head, clip_head = heads.pop() if len(heads) == 1 else ("FD/FID (see note)", "CLIP cos (see note)")
    mixed = len(heads) > 0
    for col in (
        "name",
        "version",
        "aliases",
        "kind",
        fid_head,
        clip_head,
        "latency s",
        "straightness",
        "created",
        "note",
    ):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["name"],
            r["version"],
            ", ".join(r["aliases"]) or "-",
            r["kind"] or "-",
            _fmt(r["fid"], 3),
            _fmt(r["clip_score"], 4),
            _fmt(r["latency_s"], 4),
            _fmt(r["straightness"], 5),
            r["created"],
            "; ".join(
                x
                for x in (
                    f"forced: {r['forced_reason']}" if r["forced_reason"] else "",
                    "metrics: {} / {}".format(*column_names(r.get("networks"))) if mixed else "",
                )
                if x
            ),
        )
    console.print(table)


@app.command("promote")
def promote_cmd(
    name: str = typer.Argument(..., help="Registered model name."),
    version: str = typer.Option(None, "--version", "-v", help="Version to promote (default: the candidate)."),
    force: bool = typer.Option(False, "--force", help="Promote even if the gate blocks (needs --reason)."),
    reason: str = typer.Option(None, "--reason", help="Why the gate is overridden (recorded as a tag)."),
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Move `champion` to a version if it passes the gate (FID / CLIP versus the current champion)."""
    from tasks.tracking.client import mlflow_client
    from tasks.tracking.promotion import promote_version

    cfg = load_config(preset, set_)
    gate = cfg.registration.gate
    with mlflow_client(cfg.registration, cfg.storage) as client:
        result = promote_version(client, name, gate, version, force=force, reason=reason)
    if result.get("nothing_to_promote"):
        typer.echo(f"{name}: {result['reasons'][0]}")
        return
    typer.echo(
        f"gate: FID may rise by <= {gate.max_fid_increase:g}, CLIP may fall by <= {gate.max_clip_decrease:g} "
        f"(champion before: {result['previous_champion'] or 'none'})"
    )
    for line in result["reasons"]:
        typer.echo(f"  - {line}")
    if result["promoted"]:
        how = f"FORCED (gate blocked; reason: {reason})" if result["forced"] else "gate passed"
        typer.secho(f"{name} v{result['version']} is now champion: {how}", fg="green")
    elif result["passed"]:
        typer.echo(f"{name} v{result['version']}: {result['reasons'][0]}")
    else:
        typer.secho(
            f"{name} v{result['version']} BLOCKED by the gate (use --force --reason to override)", fg="red"
        )
        raise typer.Exit(1)


@app.command("rollback")
def rollback_cmd(
    name: str = typer.Argument(..., help="Registered model name."),
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Give `champion` back to the version that held it before."""
    from tasks.tracking.client import mlflow_client
    from tasks.tracking.promotion import rollback_champion

    cfg = load_config(preset, set_)
    with mlflow_client(cfg.registration, cfg.storage) as client:
        result = rollback_champion(client, name)
    typer.secho(
        f"{name}: champion is v{result['champion']} again (was v{result['replaced'] or '-'})",
        fg="green",
    )
