"""A sqlite registry that moved with its store: point its artifact locations at the new folder.

MLflow records absolute artifact locations (`file:///<old root>/mlartifacts/...`) in the experiments, runs,
model versions and logged models of its database, and offers no API to change them. When a store holding
`mlflow.db` and `mlartifacts/` is copied or moved, new runs would write their artifacts under the old folder
(re-creating it, or writing into the original store) and registered versions would point there. Before a
write path uses such a registry (`ensure_experiment`), this rewrites the old prefix to the new one, once, in
one transaction. Reads (`instaflow models list`, `lineage`) never call it: they only read tags.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

logger = logging.getLogger("instaflow.tasks.tracking")

# (table, column) pairs that hold artifact URIs in MLflow's schema (missing ones are skipped)
_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
    ("logged_models", "artifact_location"),
)
MARK = "/mlartifacts"


def stale_prefix(location: str | None, wanted: str) -> str | None:
    """The old `.../mlartifacts` prefix of an experiment's location when it is not `wanted` (else None)."""
    if not location or not location.startswith("file://") or MARK not in location:
        return None
    prefix = location[: location.index(MARK) + len(MARK)]
    return None if prefix == wanted.rstrip("/") else prefix


def relocate(db: Path, old: str, new: str) -> int:
    """Rewrite `old` -> `new` at the start of every artifact URI in the sqlite db; returns the rows changed."""
    changed = 0
    with sqlite3.connect(db) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table, column in _COLUMNS:
            if table not in tables:
                continue
            cols = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
            if column not in cols:
                continue
            cur = con.execute(
                f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                (new, len(old) + 1, len(old), old),
            )
            changed += cur.rowcount
    logger.warning(
        "the registry %s moved: %d artifact locations now under %s (were %s)", db, changed, new, old
    )
    return changed
