"""The end of a rebuild for presets with a paper table (digits): the table, the claims, the grid's full path."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def local_path(uri: str) -> str:
    """file:///abs/path -> /abs/path (what a user can open); other URIs as they are."""
    return uri[len("file://") :] if uri.startswith("file://") else uri


def print_paper_table(console: Console, evaluation: dict[str, Any]) -> None:
    """The paper's table in miniature, the checks of its claims, the classifier's accuracy and the grid path."""
    rows = evaluation.get("paper_table") or []
    if rows:
        acc = evaluation.get("classifier_accuracy")
        title = "The paper's table in miniature" + (
            f" (classifier holdout accuracy {acc:.3f})" if acc else ""
        )
        t = Table(title=title)
        for c in rows[0]:
            t.add_column(str(c))
        for row in rows:
            t.add_row(
                *["" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()]
            )
        console.print(t)
        note = evaluation.get("networks", {}).get("fid_features", "")
        if note:
            console.print(f"[dim]features: {note}[/]")
    for check in evaluation.get("paper_checks") or []:
        mark = "[green]holds[/]" if check["holds"] else "[red]does not hold[/]"
        console.print(f"  {mark}  {check['claim']}: {check['value']:.4g} vs {check['against']:.4g}")
    grid = evaluation.get("grid") or {}
    if grid.get("uri"):
        console.print(
            f"[bold]grid[/] ({', '.join(grid.get('rows', []))}; columns {' '.join(grid.get('columns', []))}):"
        )
        console.print(local_path(grid["uri"]), soft_wrap=True)
