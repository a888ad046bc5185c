"""LanceDB tables under a Store: create/open, idempotent merges, lineage metadata, Parquet export, tensors.

Lineage lives in the Lance *table metadata* (`LanceDataset.update_metadata`): it is versioned with the table
(each version keeps the metadata it was written with, later writes carry it forward), works the same on
local folders and S3, and is readable by plain pylance without our code.

Fixed-shape tensors are stored as flat fixed-size lists (`pa.list_(dtype, n)`) with the shape in the field
metadata: every Arrow, Lance and Parquet reader understands them, and the shape survives round trips.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from instaflow_core.errors import DataError, InstaflowError
from instaflow_core.refs import TableRef
from instaflow_core.store.commits import keyed_merge
from instaflow_core.store.uri import Store, translate_error

SHAPE_KEY = b"instaflow.shape"


# ------------------------------------------------------------------------------------------- tensors
def tensor_field(
    name: str, shape: Sequence[int], dtype: pa.DataType = pa.float16(), nullable: bool = True
) -> pa.Field:
    """A fixed-shape tensor column: flat `pa.list_(dtype, prod(shape))`, shape kept in the field metadata."""
    shape = tuple(int(s) for s in shape)
    if not shape or any(s <= 0 for s in shape):
        raise DataError(f"tensor column {name!r}: shape must be positive, got {shape}")
    return pa.field(
        name,
        pa.list_(dtype, math.prod(shape)),
        nullable=nullable,
        metadata={SHAPE_KEY: json.dumps(list(shape))},
    )


def tensor_shape(field: pa.Field) -> tuple[int, ...]:
    """The per-row shape of a tensor field (from its metadata; `(n,)` when none was recorded)."""
    meta = field.metadata or {}
    if SHAPE_KEY in meta:
        return tuple(json.loads(meta[SHAPE_KEY]))
    if pa.types.is_fixed_size_list(field.type):
        return (field.type.list_size,)
    raise DataError(f"column {field.name!r} is not a fixed-shape tensor column ({field.type})")


def to_tensor_column(array: np.ndarray, dtype: pa.DataType | None = None) -> pa.FixedSizeListArray:
    """(N, *shape) numpy -> a length-N fixed-size-list array (rows flattened in C order)."""
    array = np.ascontiguousarray(array)
    if array.ndim < 2:
        raise DataError(f"to_tensor_column needs (N, ...) with at least 2 dims, got shape {array.shape}")
    n = int(math.prod(array.shape[1:]))
    values = pa.array(array.reshape(-1))
    if dtype is not None and values.type != dtype:
        values = values.cast(dtype)
    return pa.FixedSizeListArray.from_arrays(values, n)


def from_tensor_column(
    column: pa.Array | pa.ChunkedArray, shape: Sequence[int] | None = None, dtype: Any = None
) -> np.ndarray:
    """A fixed-size-list column -> numpy (N, *shape) (or (N, n) without a shape); nulls are a DataError."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], type=column.type)
    if not pa.types.is_fixed_size_list(column.type):
        raise DataError(f"expected a fixed-size list column, got {column.type}")
    if column.null_count:
        raise DataError(f"tensor column has {column.null_count} null rows")
    n = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False)  # flatten() honours slicing offsets
    out = flat.reshape(len(column), *(tuple(shape) if shape is not None else (n,)))
    return out.astype(dtype, copy=False) if dtype is not None else out


# ------------------------------------------------------------------------------------------- helpers
class _GenericGuard:
    """Like Store.guard for functions that only get a table (no endpoint to name)."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, InstaflowError) or not isinstance(exc, Exception):
            return False
        mapped = translate_error(exc, self.what)
        if mapped is not None:
            raise mapped from exc
        return False


def _same_fields(a: pa.Schema, b: pa.Schema) -> bool:
    return [(f.name, f.type) for f in a] == [(f.name, f.type) for f in b]


def to_arrow(data: Any, schema: pa.Schema) -> pa.Table:
    """Rows (pa.Table / RecordBatch / list of dicts / dict of columns / pandas) -> a table with `schema`."""
    try:
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        if isinstance(data, list):
            return pa.Table.from_pylist(data, schema=schema)
        if isinstance(data, dict):
            data = pa.table(data)
        if not isinstance(data, pa.Table):
            import pandas as pd

            if isinstance(data, pd.DataFrame):
                data = pa.Table.from_pandas(data, preserve_index=False)
            else:
                raise DataError(f"cannot write rows of type {type(data).__name__}")
        missing = [n for n in schema.names if n not in data.column_names]
        extra = [n for n in data.column_names if n not in schema.names]
        if missing or extra:
            raise DataError(f"rows do not match the table schema: missing {missing}, unexpected {extra}")
        return data.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
        raise DataError(f"rows do not match the table schema: {err}") from err


def _dedupe_last(data: pa.Table, on: str) -> pa.Table:
    """Keep the last row for each key: Lance's merge_insert inserts every duplicate of a new key."""
    if data.column(on).null_count:
        raise DataError(f"merge key {on!r} has null values")
    if len(pa.compute.unique(data.column(on))) == data.num_rows:
        return data
    idx = pa.array(np.arange(data.num_rows, dtype=np.int64))
    groups = (
        data.select([on])
        .append_column("__row", idx)
        .group_by(on, use_threads=False)
        .aggregate([("__row", "max")])
    )
    keep = np.sort(groups.column("__row_max").to_numpy())
    return data.take(pa.array(keep))


def _latest_version(table: Any) -> int:
    return int(table.to_lance().latest_version)


# ------------------------------------------------------------------------------------------- tables
def create_table(
    store: Store,
    name: str,
    schema: pa.Schema,
    metadata: dict[str, str] | None = None,
    exist_ok: bool = True,
) -> Any:
    """Create an empty table (or open the existing one when its columns match); returns the LanceTable.

    `metadata` is written as table metadata (one extra version, only when it changes anything).
    """
    db = store.db()
    with store.guard(f"create table {name!r}"):
        existing = _table_names(db)
        if name in existing:
            if not exist_ok:
                raise DataError(f"table {name!r} already exists in {store.uri('lance')}")
            table = db.open_table(name)
            if not _same_fields(table.schema, schema):
                raise DataError(
                    f"table {name!r} exists with other columns: {_describe(table.schema)} (wanted {_describe(schema)})"
                )
        else:
            table = db.create_table(name, schema=schema, exist_ok=True)
    if metadata:
        current = get_metadata(table)
        if any(current.get(k) != _as_str(v) for k, v in metadata.items()):
            set_metadata(table, metadata)
    return table


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}:{f.type}" for f in schema)


def _table_names(db: Any) -> list[str]:
    if hasattr(db, "list_tables"):
        res = db.list_tables()
        names = getattr(res, "tables", res)
        return list(names)
    return list(db.table_names())


def open_table(store: Store, name: str, version: int | None = None) -> Any:
    """Open a table (at `version` when given, read-only then); DataError naming what exists when missing."""
    db = store.db()
    with store.guard(f"open table {name!r}"):
        names = _table_names(db)
        if name not in names:
            raise DataError(
                f"table {name!r} not found in {store.uri('lance')} (tables: {sorted(names) or 'none'})"
            )
        table = db.open_table(name)
        if version is not None:
            versions = [v["version"] for v in table.list_versions()]
            if int(version) not in versions:
                raise DataError(
                    f"table {name!r} has no version {version} (versions: {versions[0]}..{versions[-1]})"
                )
            table.checkout(int(version))
    return table


def merge_rows(table: Any, data: Any, on: str) -> int:
    """Idempotent upsert on key column `on` (duplicate keys in `data`: the last wins); returns the new version.

    Exactly-once with concurrent writers when `on` is the table's declared key (store/commits.py): the merge
    takes the unindexed join and commit conflicts are retried, never shown raw.
    """
    rows = _dedupe_last(to_arrow(data, table.schema), on)
    if rows.num_rows == 0:
        return int(table.version)
    with _GenericGuard(f"merge into table {table.name!r}"):
        res = keyed_merge(table, rows, on)
    return int(getattr(res, "version", None) or table.version)


def append_rows(table: Any, data: Any) -> int:
    """Append rows as they are (no key check); returns the new version."""
    rows = to_arrow(data, table.schema)
    if rows.num_rows == 0:
        return int(table.version)
    with _GenericGuard(f"append to table {table.name!r}"):
        res = table.add(rows)
    return int(getattr(res, "version", None) or table.version)


def table_ref(store: Store, name: str, config_hash: str = "", version: int | None = None) -> TableRef:
    """A reference to the table at `version` (default: the current one) with its row count."""
    table = open_table(store, name, version)
    with store.guard(f"count rows of {name!r}"):
        return TableRef(
            db_uri=store.ref("lance"),  # store-relative: a moved store still resolves it
            table=name,
            version=int(table.version),
            rows=int(table.count_rows()),
            config_hash=config_hash,
        )


def open_ref(store: Store, ref: TableRef) -> Any:
    """Open the table a TableRef points at, at its version."""
    if store.resolve(ref.db_uri).rstrip("/") != store.uri("lance"):
        raise DataError(f"table {ref.key()} is not in this store ({store.uri('lance')})")
    return open_table(store, ref.table, ref.version)


def _as_str(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)


def set_metadata(table: Any, metadata: dict[str, Any]) -> int:
    """Merge keys into the table metadata (non-strings stored as JSON; None deletes a key); returns the new version."""
    with _GenericGuard(f"set metadata of {table.name!r}"):
        ds = table.to_lance()
        if int(ds.version) != int(ds.latest_version):
            raise DataError(f"table {table.name!r} is open at old version {ds.version}: reopen it to write")
        ds.update_metadata({k: (None if v is None else _as_str(v)) for k, v in metadata.items()})
        table.checkout_latest()
    return int(table.version)


def get_metadata(table: Any) -> dict[str, str]:
    """The table metadata at the table's checked-out version."""
    with _GenericGuard(f"read metadata of {table.name!r}"):
        return dict(table.to_lance().metadata or {})


def list_versions(store: Store, name: str) -> list[dict[str, Any]]:
    """[{"version": int, "timestamp": ISO str, "rows": int}, ...] oldest first."""
    table = open_table(store, name)
    with store.guard(f"list versions of {name!r}"):
        out = []
        for v in table.list_versions():
            meta = v.get("metadata") or {}
            ts = v.get("timestamp")
            out.append(
                {
                    "version": int(v["version"]),
                    "timestamp": ts.isoformat() if hasattr(ts, "isoformat") else str(ts),
                    "rows": int(meta["total_rows"]) if "total_rows" in meta else None,
                }
            )
    return out


def export_parquet(
    store: Store,
    name: str,
    version: int | None,
    dest_uri: str,
    row_group_rows: int = 100_000,
    columns: list[str] | None = None,
    filter: str | None = None,
) -> tuple[str, int]:
    """Stream a table version into one Parquet file at dest_uri (any store URI); returns (dest_uri, rows).

    Batches are buffered up to `row_group_rows` so row groups are full-sized whatever Lance's batch size;
    memory stays about one row group. The table metadata and its name/version go into the file's metadata.
    """
    import pyarrow.parquet as pq

    if row_group_rows < 1:
        raise DataError("row_group_rows must be >= 1")
    table = open_table(store, name, version)
    lineage = {"instaflow.table": name, "instaflow.version": str(table.version), **get_metadata(table)}
    rows = 0
    with store.guard(f"export {name!r} to {dest_uri}"):
        ds = table.to_lance()
        schema = ds.schema if columns is None else pa.schema([ds.schema.field(c) for c in columns])
        schema = schema.with_metadata(
            {**(schema.metadata or {}), **{k.encode(): v.encode() for k, v in lineage.items()}}
        )
        with store.open(dest_uri, "wb") as fh, pq.ParquetWriter(fh, schema) as writer:
            buf: pa.Table | None = None
            for batch in ds.to_batches(
                columns=columns, filter=filter, batch_size=min(row_group_rows, 65_536)
            ):
                part = pa.Table.from_batches([batch]).replace_schema_metadata(schema.metadata)
                buf = part if buf is None else pa.concat_tables([buf, part])
                rows += batch.num_rows
                while buf.num_rows >= row_group_rows:  # exactly row_group_rows per group
                    writer.write_table(buf.slice(0, row_group_rows), row_group_size=row_group_rows)
                    buf = buf.slice(row_group_rows)
            if buf is not None and buf.num_rows:
                writer.write_table(buf, row_group_size=row_group_rows)
    return dest_uri, rows


__all__ = [
    "append_rows",
    "create_table",
    "export_parquet",
    "from_tensor_column",
    "get_metadata",
    "list_versions",
    "merge_rows",
    "open_ref",
    "open_table",
    "set_metadata",
    "table_ref",
    "tensor_field",
    "tensor_shape",
    "to_arrow",
    "to_tensor_column",
]
