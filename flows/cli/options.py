"""CLI options shared by the commands that load a config."""

from __future__ import annotations

import typer

from instaflow_core.config import InstaflowConfig, load

PresetOpt = typer.Option("tiny", "--preset", "-p", help="Preset name (tiny, digits, sd15) or a YAML file.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config value: section.key=value (repeatable).")


def load_config(preset: str, sets: list[str] | None) -> InstaflowConfig:
    return load(preset, sets or [])
