"""Prefect artifacts: keyed markdown and tables (version history per key), progress, lineage tables."""

from __future__ import annotations

import logging
import re
from typing import Any

from tasks.caching import code_version, git_sha

_KEY_RE = re.compile(r"[^a-z0-9-]+")


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return _KEY_RE.sub("-", "-".join(parts).lower()).strip("-")


def _in_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def publish_markdown(key: str, markdown: str, description: str = "") -> None:
    """A keyed markdown artifact (same key across runs = version history on the Artifacts page)."""
    if not _in_run():
        return
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key=artifact_key(key), markdown=markdown, description=description or None)


def publish_table(key: str, rows: list[dict[str, Any]], description: str = "") -> None:
    if not _in_run() or not rows:
        return
    from prefect.artifacts import create_table_artifact

    create_table_artifact(key=artifact_key(key), table=rows, description=description or None)


class Progress:
    """A Prefect progress artifact that a long task updates (no-op outside a Prefect run)."""

    def __init__(self, description: str) -> None:
        self._id = None
        if _in_run():
            from prefect.artifacts import create_progress_artifact

            self._id = create_progress_artifact(progress=0.0, description=description)

    def update(self, fraction: float) -> None:
        if self._id is None:
            return
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(
            artifact_id=self._id, progress=round(100.0 * max(0.0, min(1.0, fraction)), 1)
        )


def lineage_markdown(stage: str, inputs: dict[str, Any], outputs: dict[str, Any], extra: str = "") -> str:
    """A small markdown table naming what a stage consumed and produced (links where the value is a URL)."""

    def cell(v: Any) -> str:
        s = v.key() if hasattr(v, "key") else str(v)
        return f"[{s}]({s})" if s.startswith(("http://", "https://")) else f"`{s}`"

    lines = [f"### {stage}", "", "| direction | name | reference |", "|---|---|---|"]
    lines += [f"| input | {k} | {cell(v)} |" for k, v in inputs.items()]
    lines += [f"| output | {k} | {cell(v)} |" for k, v in outputs.items()]
    lines += ["", f"code version `{code_version()}`, git `{git_sha()}`"]
    if extra:
        lines += ["", extra]
    return "\n".join(lines)


def run_logger(fallback: str = "instaflow") -> Any:
    """The Prefect run logger inside a run (shown in the UI and the CLI), a plain logger outside one."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - no active run
        return logging.getLogger(fallback)
