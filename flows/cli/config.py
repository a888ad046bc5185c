"""`instaflow config show|hashes`: the resolved config a run would use."""

from __future__ import annotations

import typer

from flows.cli.options import PresetOpt, SetOpt, load_config

app = typer.Typer(help="Show the resolved configuration.", no_args_is_help=True)


@app.command("show")
def show(preset: str = PresetOpt, set_: list[str] = SetOpt) -> None:
    """Print the resolved config (preset + overrides) as YAML."""
    typer.echo(load_config(preset, set_).to_yaml())


@app.command("hashes")
def hashes(preset: str = PresetOpt, set_: list[str] = SetOpt) -> None:
    """Print the per-section hashes (the cache-key material of each stage)."""
    for name, h in load_config(preset, set_).hashes().items():
        typer.echo(f"{name:14s} {h}")
