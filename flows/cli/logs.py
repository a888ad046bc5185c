"""Where a CLI run's log lines go: the terminal keeps progress and info lines, a log file keeps everything.

Prefect logs every failed task and flow run at ERROR with the whole traceback (and again for each flow the
failure passes through), so a user mistake raised inside a task used to print 2-5 tracebacks before the CLI's
one `error:` line. For `instaflow rebuild|curate|...` the root logger's handlers are split:

- a file handler gets every record, tracebacks included: `<local store root>/logs/<time>-<command>.log` (for an
  s3:// store `~/.cache/instaflow/logs/`, or `$INSTAFLOW_LOG_DIR`); the CLI's error line names the file;
- the terminal handlers (Prefect's console handler) drop Prefect's own ERROR records (the failure the CLI
  reports in one line) and print every other record without its traceback.

`--debug` leaves the terminal as Prefect set it (tracebacks and all) and still writes the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from instaflow_core.config import StorageConfig

# The log file of the run in progress (the CLI's error line names it); None outside a routed run.
CURRENT: Path | None = None
_FORMAT = "%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"
_FAILED_STATES = ("Finished in state Failed", "Finished in state Crashed")


def log_dir(storage: StorageConfig) -> Path:
    from instaflow_core.store.schemes import local_root

    if os.environ.get("INSTAFLOW_LOG_DIR"):
        return Path(os.environ["INSTAFLOW_LOG_DIR"]).expanduser()
    root = local_root(storage.root)
    return (root / "logs") if root is not None else Path.home() / ".cache" / "instaflow" / "logs"


class TerminalFilter(logging.Filter):
    """For the terminal handlers: no Prefect failure records, no tracebacks (the log file has them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("prefect") and (
            record.levelno >= logging.ERROR or str(record.msg).startswith(_FAILED_STATES)
        ):
            return False  # the failure: the CLI's one `error:` line says it
        if record.levelno < logging.WARNING and record.name.startswith("instaflow"):
            return False  # raised to INFO for the file only
        # The file handler runs first (it is the root's first handler), so the traceback is already written.
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


@contextlib.contextmanager
def routed(storage: StorageConfig, command: str, debug: bool = False) -> Iterator[Path]:
    """Split log output between the terminal and a log file for the duration of a CLI run."""
    global CURRENT
    import prefect  # noqa: F401 - Prefect installs its console handler on import: split after it

    folder = log_dir(storage)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{command}-{os.getpid()}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    terminal = [h for h in root.handlers if isinstance(h, logging.StreamHandler)]
    root.handlers.insert(0, handler)
    term_filter = TerminalFilter()
    if not debug:
        for h in terminal:
            h.addFilter(term_filter)
    # The instaflow loggers' INFO lines (not only Prefect's) belong in the file too.
    instaflow = logging.getLogger("instaflow")
    old_level = instaflow.level
    if instaflow.getEffectiveLevel() > logging.INFO:
        instaflow.setLevel(logging.INFO)
    CURRENT = path
    try:
        yield path
    finally:
        for h in terminal:
            h.removeFilter(term_filter)
        root.removeHandler(handler)
        handler.close()
        instaflow.setLevel(old_level)
