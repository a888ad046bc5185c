"""`instaflow config show|hashes`: the resolved config a run would use."""

from __future__ import annotations

import typer

from flows.cli import app
from flows.options import PresetOpt, SetOpt, load_config

config_app = typer.Typer(help="Show the resolved configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def show(preset: str = PresetOpt, set_: list[str] = SetOpt) -> None:
    """Print the resolved config (preset + overrides) as YAML."""
    typer.echo(load_config(preset, set_).to_yaml())


@config_app.command("hashes")
def hashes(preset: str = PresetOpt, set_: list[str] = SetOpt) -> None:
    """Print the per-section hashes (the cache-key material of each stage)."""
    for name, h in load_config(preset, set_).hashes().items():
        typer.echo(f"{name:14s} {h}")
