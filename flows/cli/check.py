"""`instaflow check`: the preflight alone (tasks/preflight.py), a line per check, exit 1 on any problem.

    instaflow check --preset sd15 --set models.teacher=/data/sd15     # everything a rebuild needs
    instaflow check --preset sd15 --stage distill                      # what `instaflow distill` needs

`instaflow rebuild` and the stage commands run the same checks before any work; nothing is written either way.
"""

from __future__ import annotations

import os
import time

import typer
from rich.console import Console

from flows.cli.options import PresetOpt, SetOpt, load_config
from instaflow_core.refs import parse_stages

console = Console()


def check(
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
    stage: list[str] = typer.Option(
        None, "--stage", help="Check only what these stages need (repeatable; default: a whole rebuild)."
    ),
) -> None:
    """Check everything a run will need (teacher, weights, data, S3, MLflow, names, resolution) in seconds."""
    from tasks.preflight import run_preflight

    stages = parse_stages(stage, "--stage") or None
    cfg = load_config(preset, set_)
    os.environ.setdefault("HF_HUB_OFFLINE", "1" if cfg.models.local_files_only else "0")
    t0 = time.perf_counter()
    report = run_preflight(cfg, stages)
    for result in report.results:
        mark = "[green]ok[/]" if not result.problems else "[red]FAIL[/]"
        console.print(f"{mark:>16} {result.name:<11} {result.seconds:5.2f} s")
        for problem in result.problems:
            console.print(f"                 - {problem}", highlight=False, markup=False)
    seconds = time.perf_counter() - t0
    if report.ok:
        console.print(f"preset {cfg.preset}: all {len(report.results)} checks passed in {seconds:.1f} s")
        return
    report.raise_if_failed()
