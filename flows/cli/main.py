"""The `instaflow` command: every command group is wired here, explicitly.

User mistakes (InstaflowError) become one clear line and exit 1; the traceback (with its chained causes) only
with --debug.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from flows.cli import (
    check,
    config,
    demo,
    export,
    lineage,
    models,
    pretrain,
    run,
    sample,
    schedule,
    serve,
    stack,
    triplets,
)
from instaflow_core.errors import InstaflowError

app = typer.Typer(
    name="instaflow",
    help="InstaFlow training pipeline: curate -> generate -> reflow -> distill -> evaluate -> register.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# The pipeline: the whole rebuild, and each stage on the latest upstream outputs.
for command in (
    run.rebuild,
    run.curate,
    pretrain.pretrain,
    run.generate,
    run.reflow,
    run.distill,
    run.evaluate,
    run.register,
):
    app.command()(command)
app.command()(lineage.lineage)
app.command()(check.check)  # the preflight alone
# Using a model: images, animations, the demo page, the scoring server.
for command in (sample.sample, sample.interpolate, demo.demo, serve.serve):
    app.command()(command)
# Command groups.
app.add_typer(config.app, name="config")
app.add_typer(triplets.app, name="triplets")
app.add_typer(models.app, name="models")
app.add_typer(schedule.app, name="schedule")
app.add_typer(stack.app, name="stack")
app.add_typer(export.app, name="export")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and debug logs.")) -> None:
    if debug:
        os.environ["INSTAFLOW_DEBUG"] = "1"
        logging.basicConfig(level=logging.DEBUG)


def main() -> None:
    debug = "--debug" in sys.argv or os.environ.get("INSTAFLOW_DEBUG") == "1"
    # transformers warns at import that torchvision is missing (its PIL fallbacks are what we use)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        # standalone_mode=False returns typer.Exit codes instead of exiting: pass them on
        rc = app(standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except InstaflowError as err:
        if debug:
            raise
        from flows.cli import logs

        where = f" (full log: {logs.CURRENT})" if logs.CURRENT is not None else ""
        typer.secho(f"error: {err}{where}", fg="red", err=True)
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
