"""The `instaflow` command. Sub-command groups live in flows/cli_*.py; this file wires them and turns user
mistakes (InstaflowError) into one clear line and a non-zero exit, with the traceback only under --debug."""

from __future__ import annotations

import importlib
import logging
import os
import sys

import typer

from instaflow_core.errors import InstaflowError

app = typer.Typer(
    name="instaflow",
    help="InstaFlow training pipeline: curate -> generate -> reflow -> distill -> evaluate -> register.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# (module, group name): each module exposes `app = typer.Typer()`; missing modules are skipped so a partial
# checkout still runs what it has.
_GROUPS = [
    ("flows.cli_stack", "stack"),
    ("flows.cli_triplets", "triplets"),
    ("flows.cli_models", "models"),
    ("flows.cli_schedule", "schedule"),
]
# Top-level commands (rebuild, curate, generate, ...) register themselves on `app` when imported.
_COMMAND_MODULES = ["flows.cli_run", "flows.cli_config", "flows.cli_lineage"]


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and debug logs.")) -> None:
    if debug:
        os.environ["INSTAFLOW_DEBUG"] = "1"
        logging.basicConfig(level=logging.DEBUG)


def _wire() -> None:
    for module, name in _GROUPS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name == module:
                continue
            raise
        app.add_typer(mod.app, name=name)
    for module in _COMMAND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


def main() -> None:
    debug = "--debug" in sys.argv or os.environ.get("INSTAFLOW_DEBUG") == "1"
    # transformers warns at import that torchvision is missing (its PIL fallbacks are what we use)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        _wire()
        # standalone_mode=False returns typer.Exit codes instead of exiting: pass them on
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except InstaflowError as err:
        if debug:
            raise
        typer.secho(f"error: {err}", fg="red", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.secho("interrupted", fg="yellow", err=True)
        sys.exit(130)
    except Exception as err:
        # usage errors and exits come from the click that typer uses (typer may vendor its own copy)
        if isinstance(err, typer.Exit):
            sys.exit(err.exit_code)
        if isinstance(err, typer.Abort):
            sys.exit(1)
        if callable(getattr(err, "show", None)) and isinstance(getattr(err, "exit_code", None), int):
            err.show()
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    # `python -m flows.cli`: run the importable module, on whose `app` the command modules register
    from flows.cli import main as _main

    _main()
