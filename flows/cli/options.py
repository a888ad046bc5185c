"""CLI options shared by the commands that load a config."""

from __future__ import annotations

import typer

from instaflow_core.config import PRESETS_DIR, InstaflowConfig, load

_PRESETS = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
PresetOpt = typer.Option("tiny", "--preset", "-p", help=f"Preset name ({_PRESETS}) or a YAML file.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a config value: section.key=value (repeatable).")


def load_config(preset: str, sets: list[str] | None) -> InstaflowConfig:
    return load(preset, sets or [])
