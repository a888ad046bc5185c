"""Exactly-once rows in one Lance table from any number of writers: the declared key, retried commits, dedupe.

The argument is written out in docs/exactly-once.md; in short:

- The key column carries Lance's `lance-schema:unenforced-primary-key` field metadata (`key_field`, or
  `declare_key` on a table made before). With it, every `merge_insert` on the key records the keys it inserted
  in its transaction; at commit Lance compares them with those of every transaction committed since its read
  version and, on overlap, re-runs the whole merge (the join too) on the latest version, where the colliding
  keys now match and become updates. Without the key, two writers' inserts land in different fragments and
  never conflict: both commit, the key is there twice.
- Merges must take the unindexed join (`use_index(False)`): the scalar-index join path does not record the
  inserted keys (lance 13/14), so a BTree on the key with the default `use_index=True` brings duplicates back.
  Tables made here therefore get no BTree on their merge key (store/query.py).
- `retry_commit` retries what Lance surfaces as a commit conflict (compaction and index builds do; merges do
  once Lance's own 10 tries / 30 s run out) with jittered exponential backoff, then raises one clear
  `CommitContention` line. A raw "Retryable commit conflict" never reaches a user.
- `verify_and_dedupe` is the proof at the end, and the repair of tables written by a client that broke the
  rules: it deletes surplus copies by (key, _rowid) pairs, at most n-1 per key with n copies, so it can never
  delete the last copy of a key, even while others write or compact.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from instaflow_core.errors import StorageError

log = logging.getLogger("instaflow.store.commits")
T = TypeVar("T")

PK_KEY = "lance-schema:unenforced-primary-key"
_CONFLICT_MARKERS = ("commit conflict", "write contention", "conflicting", "retryable", "preempted")
_DELETE_CHUNK = 500  # keys per dedupe commit (a predicate of (key, _rowid) pairs)


class CommitContention(StorageError):
    """A commit kept conflicting with other writers for longer than the retry budget."""


# ------------------------------------------------------------------------------------------ the key
def key_field(name: str, type_: pa.DataType | None = None) -> pa.Field:
    """A non-nullable key column declared as Lance's unenforced primary key (conflict detection on it)."""
    return pa.field(name, type_ or pa.string(), nullable=False, metadata={PK_KEY: "true"})


def has_declared_key(schema_or_table: Any, on: str) -> bool:
    """True when column `on` carries the primary-key field metadata (a schema, a lancedb or lance table)."""
    schema = schema_or_table if isinstance(schema_or_table, pa.Schema) else schema_or_table.schema
    if on not in schema.names:
        return False
    meta = schema.field(on).metadata or {}
    # `key_field` writes PK_KEY=true; `set_unenforced_primary_key` writes PK_KEY:position=<n> (lance 13/14)
    return meta.get(PK_KEY.encode(), b"").lower() in (b"true", b"1", b"yes") or bool(
        meta.get(f"{PK_KEY}:position".encode())
    )


def declare_key(table: Any, on: str) -> bool:
    """Declare `on` the table's primary key if it is not yet (one metadata commit, in place; Lance does not
    let it change afterwards). Returns True when this call declared it."""
    table.checkout_latest()
    if has_declared_key(table, on):
        return False
    try:
        retry_commit(
            lambda: table.set_unenforced_primary_key(on), f"declare {on!r} the key of {table.name!r}"
        )
    except Exception as err:  # noqa: BLE001 - a racing writer may have declared it first: check below
        table.checkout_latest()
        if not has_declared_key(table, on):
            raise StorageError(f"table {table.name!r}: cannot declare {on!r} its primary key: {err}") from err
        return False
    table.checkout_latest()
    if not has_declared_key(table, on):
        raise StorageError(f"table {table.name!r}: declaring {on!r} its primary key did not take")
    return True


# ------------------------------------------------------------------------------------------ commits
def is_conflict(err: BaseException) -> bool:
    """A commit conflict / contention from Lance or LanceDB (they arrive as OSError/RuntimeError text)."""
    if isinstance(err, CommitContention):
        return False
    text = f"{type(err).__name__}: {err}".lower()
    return any(m in text for m in _CONFLICT_MARKERS)


def retry_commit(
    fn: Callable[[], T],
    what: str,
    *,
    budget_s: float = 600.0,
    base_s: float = 0.1,
    cap_s: float = 5.0,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """Run `fn` (one Lance commit), retrying commit conflicts with full-jitter exponential backoff.

    After `budget_s` of conflicts: `CommitContention` naming `what`. Anything else is re-raised unchanged.
    `on_retry` runs before each new try (e.g. `table.checkout_latest()` for operations that do not rebase).
    """
    t0 = time.monotonic()
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as err:
            if not is_conflict(err):
                raise
            attempt += 1
            waited = time.monotonic() - t0
            if waited > budget_s:
                raise CommitContention(
                    f"{what}: still conflicting with other writers after {attempt} tries in {waited:.0f}s "
                    "(too many writers on one table: fewer, larger commits help)"
                ) from err
            delay = random.uniform(0, min(cap_s, base_s * 2**attempt))
            log.info("%s: commit conflict (try %d), retrying in %.2fs", what, attempt, delay)
            time.sleep(delay)
            if on_retry is not None:
                on_retry()


def keyed_merge(table: Any, rows: pa.Table, on: str, *, budget_s: float = 600.0) -> Any:
    """The exactly-once write: upsert `rows` on `on` through the unindexed join, conflicts retried.

    `rows` must not repeat a key (merge_insert inserts every copy of a new key); callers dedupe first.
    """

    def once() -> Any:
        return (
            table.merge_insert(on)
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .use_index(False)  # the indexed join records no inserted keys: no conflict detection
            .execute(rows)
        )

    return retry_commit(once, f"merge {rows.num_rows} rows into {table.name!r}", budget_s=budget_s)


# ------------------------------------------------------------------------------------------ verify
def _sql_literal(v: Any) -> str:
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    return str(int(v))


def _surplus(table: Any, on: str, where: str | None) -> list[tuple[Any, list[int]]]:
    """[(key, row ids of its surplus copies)] at the latest version; the lowest row id of a key is kept."""
    table.checkout_latest()
    t = table.to_lance().to_table(columns=[on], filter=where, with_row_id=True)
    if t.num_rows == len(pc.unique(t.column(on))):
        return []
    groups = t.group_by(on).aggregate([("_rowid", "list")])
    keys, rids = groups.column(on).to_pylist(), groups.column("_rowid_list").to_pylist()
    return [(k, sorted(r)[1:]) for k, r in zip(keys, rids, strict=True) if len(r) > 1]


def verify_and_dedupe(
    table: Any,
    on: str,
    expected: Iterable[Any] | None = None,
    where: str | None = None,
    max_rounds: int = 10,
) -> dict[str, Any]:
    """Delete surplus copies of duplicated keys (one copy of each stays) and count the expected keys.

    Each delete predicate names (key, _rowid) pairs, at most n-1 for a key with n copies, so the last copy of a
    key can never be deleted, even when compaction moved row ids since the read (then fewer rows match and the
    next round deletes the rest). Returns {version, rows, distinct, duplicates (left), removed, and with
    `expected`: missing_count, missing (first 20), unexpected_count}.
    """
    removed = 0
    for _ in range(max_rounds):
        pairs = _surplus(table, on, where)
        if not pairs:
            break
        for s in range(0, len(pairs), _DELETE_CHUNK):
            pred = " OR ".join(
                f"({on} = {_sql_literal(k)} AND _rowid IN ({', '.join(str(r) for r in rids)}))"
                for k, rids in pairs[s : s + _DELETE_CHUNK]
            )
            if where:
                pred = f"({where}) AND ({pred})"
            res = retry_commit(lambda p=pred: table.delete(p), f"dedupe {table.name!r}")
            table.checkout_latest()
            deleted = getattr(res, "num_deleted_rows", None)
            removed += int(deleted) if deleted is not None else sum(len(r) for _, r in pairs[s:])
        log.warning("%s: removed surplus copies of %d duplicated %s", table.name, len(pairs), on)
    table.checkout_latest()
    keys = table.to_lance().to_table(columns=[on], filter=where).column(on)
    distinct = set(keys.to_pylist())
    out: dict[str, Any] = {
        "version": int(table.version),
        "rows": len(keys),
        "distinct": len(distinct),
        "duplicates": len(keys) - len(distinct),
        "removed": removed,
    }
    if expected is not None:
        exp = set(expected)
        missing = exp - distinct
        out |= {
            "expected": len(exp),
            "missing_count": len(missing),
            "missing": sorted(missing)[:20],
            "unexpected_count": len(distinct - exp),
        }
    return out
