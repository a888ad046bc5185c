"""Reading triplet (and prompt) tables the way a user asks: filters, full-text and vector search, stats.

Pure data access over a LanceTable (plus `embed_prompts`, which turns prompts into the vectors a vector search
needs). Every user mistake (a bad SQL
filter, a missing table, column or version) is a `DataError` with one line.

Indexes: `ensure_indexes(table)` keeps BTree scalar indexes on the prompt-id / run / teacher columns (never on
triplet_id: a BTree there lets concurrent merges insert duplicates, docs/exactly-once.md) and the full-text
index on the prompt column (the writer calls it after each run; new rows are folded into existing indexes
without rewriting them). Nothing here that reads ever writes: `search_text` without an index scans. A prompt
embedding column, when a table has one,
is a fixed-size float list named `prompt_embedding` (or any `*embedding*` / `vector` column); vector search
is cosine on it, brute force unless a vector index exists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from instaflow_core.errors import DataError, InstaflowError
from instaflow_core.store.tables import list_versions, open_table
from instaflow_core.store.uri import Store

# No index on triplet_id, the merge key: a merge that takes the indexed join records no inserted keys, so a
# client with use_index left on would bypass Lance's duplicate detection (docs/exactly-once.md).
SCALAR_INDEX_COLUMNS = ("prompt_id", "run_id", "teacher")
TEXT_COLUMNS = ("prompt", "text")  # the prompt text in triplets / prompts tables
EMBEDDING_COLUMN = "prompt_embedding"
# What to run when a table is missing.
_PRODUCER = {
    "prompts": "instaflow curate",
    "triplets": "instaflow generate",
    "distill_pairs": "instaflow distill",
}


# ------------------------------------------------------------------------------------------- opening
def open_for_query(store: Store, name: str, version: int | None = None) -> Any:
    """Open a table for reading; a missing table says which command makes it."""
    db = store.db()
    with store.guard(f"list tables in {store.uri('lance')}"):
        res = db.list_tables()
        names = list(getattr(res, "tables", res))
    if name not in names:
        producer = _PRODUCER.get(name)
        hint = f": run `{producer}` first" if producer else ""
        shown = sorted(n for n in names if not n.startswith("_"))
        raise DataError(f"no table {name!r} in {store.uri('lance')}{hint} (tables here: {shown or 'none'})")
    return open_table(store, name, version)


def _bad_query(what: str, expr: str, err: BaseException) -> DataError:
    """One line from Lance/DataFusion's multi-line parser errors."""
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for prefix in ("Invalid input, ", "Invalid user input: "):
        msg = msg.replace(prefix, "")
    if len(msg) > 240:
        msg = msg[:237] + "..."
    return DataError(f"bad {what} {expr!r}: {msg}")


def _run(builder: Any, what: str, expr: str) -> pa.Table:
    try:
        return builder.to_arrow()
    except InstaflowError:
        raise
    except (ValueError, RuntimeError, pa.ArrowInvalid) as err:
        # Lance reports filter/SQL mistakes as ValueError("Invalid input, ...") / RuntimeError.
        raise _bad_query(what, expr, err) from err


# ------------------------------------------------------------------------------------------- columns
def is_tensor_field(field: pa.Field) -> bool:
    """Fixed-size float lists (latents, noise, embeddings): too wide to print."""
    t = field.type
    return pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type)


def tensor_columns(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if is_tensor_field(f)]


def text_column(schema: pa.Schema) -> str:
    for name in TEXT_COLUMNS:
        if name in schema.names:
            return name
    raise DataError(
        f"the table has no prompt text column ({' or '.join(TEXT_COLUMNS)}); columns: {schema.names}"
    )


def embedding_column(schema: pa.Schema) -> str | None:
    """The prompt embedding column, if the table has one."""
    if EMBEDDING_COLUMN in schema.names and is_tensor_field(schema.field(EMBEDDING_COLUMN)):
        return EMBEDDING_COLUMN
    for f in schema:
        if is_tensor_field(f) and ("embedding" in f.name or f.name == "vector"):
            return f.name
    return None


def select_columns(
    schema: pa.Schema, columns: Sequence[str] | None, *, show_tensors: bool = False
) -> list[str]:
    """The columns to fetch: the given ones (checked), else all but the tensor columns."""
    if columns:
        unknown = [c for c in columns if c not in schema.names]
        if unknown:
            raise DataError(f"unknown column(s) {unknown}; the table has {schema.names}")
        return list(columns)
    return [f.name for f in schema if show_tensors or not is_tensor_field(f)]


# ------------------------------------------------------------------------------------------- indexes
def _indexed_columns(table: Any) -> dict[str, str]:
    """{column: index name} for single-column indexes."""
    out = {}
    for ix in table.list_indices():
        cols = list(getattr(ix, "columns", []) or [])
        if len(cols) == 1:
            out[cols[0]] = ix.name
    return out


def ensure_indexes(table: Any, columns: Sequence[str] = SCALAR_INDEX_COLUMNS) -> list[str]:
    """BTree scalar indexes on the prompt-id/run/teacher columns the table has, and the full-text index on its prompt
    text column; folds new rows into existing ones. The stage that writes a table calls this (curation for
    `prompts`, generation's finish task for `triplets`): read commands never build an index.

    Returns the columns whose index was created or updated (an empty list when all were current).
    """
    from lancedb.index import FTS, BTree

    table.checkout_latest()
    indexed = _indexed_columns(table)
    changed = []
    to_update = []
    text = next((c for c in TEXT_COLUMNS if c in table.schema.names), None)
    wanted = [(c, BTree()) for c in columns if c in table.schema.names]
    wanted += [(text, FTS(with_position=False))] if text else []
    for col, config in wanted:
        if col not in indexed:
            table.create_index(col, config=config, replace=False)
            changed.append(col)
        else:
            stats = table.index_stats(indexed[col])
            if stats is not None and stats.num_unindexed_rows:
                to_update.append(col)
    if to_update:
        # Appends the new rows to the existing indexes (no rebuild, no cleanup of old versions).
        table.to_lance().optimize.optimize_indices(index_names=[indexed[c] for c in to_update])
        table.checkout_latest()
        changed += to_update
    return changed


def ensure_fts_index(table: Any, column: str) -> bool:
    """Writers only: a full-text (inverted) index on `column` at the latest version (True when there is one)."""
    from lancedb.index import FTS

    if has_fts_index(table, column):
        return True
    if int(table.version) != int(table.to_lance().latest_version):
        return False  # a checked-out old version is read-only
    table.create_index(column, config=FTS(with_position=False))
    return True


def has_fts_index(table: Any, column: str) -> bool:
    """Is there a full-text index on `column`? (Read-only: search never creates one, see ensure_indexes.)"""
    return column in _indexed_columns(table)


# ------------------------------------------------------------------------------------------- queries
def query_rows(
    table: Any, where: str | None = None, limit: int | None = 20, columns: Sequence[str] | None = None
) -> pa.Table:
    """Rows matching a SQL filter (LanceDB/DataFusion syntax), without tensor columns unless asked for."""
    cols = select_columns(table.schema, columns)
    q = table.search().select(cols).limit(limit)
    if where:
        q = q.where(where)
    return _run(q, "--where filter", where or "")


def rows_by_id(
    table: Any, ids: Sequence[str], columns: Sequence[str] | None = None, key: str = "triplet_id"
) -> pa.Table:
    """Rows with these ids, in the order given; a DataError names the ids that are not there."""
    if key not in table.schema.names:
        raise DataError(f"the table has no {key!r} column")
    quoted = ",".join("'" + str(i).replace("'", "''") + "'" for i in ids)
    rows = query_rows(table, f"{key} IN ({quoted})", limit=None, columns=columns)
    found = rows.column(key).to_pylist()
    missing = [i for i in ids if i not in found]
    if missing:
        raise DataError(
            f"{len(missing)} id(s) not found: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    order = [found.index(i) for i in ids]
    return rows.take(pa.array(order))


def search_text(
    table: Any, text: str, limit: int = 20, columns: Sequence[str] | None = None, where: str | None = None
) -> tuple[pa.Table, str]:
    """Full-text search on the prompt column -> (rows with `_score`, how: 'fts' or 'substring').

    Reads only: a table (version) without a full-text index is searched by a case-insensitive substring scan
    (the writing stage builds the index: `ensure_indexes`).
    """
    if not text.strip():
        raise DataError("search text is empty")
    col = text_column(table.schema)
    cols = select_columns(table.schema, columns)
    if has_fts_index(table, col):
        q = table.search(text, query_type="fts", fts_columns=col).select([*cols, "_score"]).limit(limit)
        if where:
            q = q.where(where, prefilter=True)
        return _run(q, "search", text), "fts"
    pattern = "%" + text.lower().replace("'", "''").replace("%", r"\%").replace("_", r"\_") + "%"
    flt = f"lower({col}) LIKE '{pattern}'" + (f" AND ({where})" if where else "")
    return query_rows(table, flt, limit, cols), "substring"


def search_vector(
    table: Any,
    vector: np.ndarray,
    limit: int = 20,
    columns: Sequence[str] | None = None,
    column: str | None = None,
    where: str | None = None,
) -> pa.Table:
    """Nearest rows by cosine distance on the embedding column (rows with `_distance`)."""
    column = column or embedding_column(table.schema)
    if column is None:
        raise DataError(
            f"the table has no prompt embedding column ({EMBEDDING_COLUMN!r}, a fixed-size float list): "
            "vector search needs one; use `search` (full text) or `query --where` instead"
        )
    dim = table.schema.field(column).type.list_size
    vec = np.asarray(vector, dtype=np.float32).reshape(-1)
    if vec.shape[0] != dim:
        raise DataError(f"the query vector has {vec.shape[0]} values, column {column!r} holds {dim}")
    cols = select_columns(table.schema, columns)
    q = table.search(vec, vector_column_name=column).distance_type("cosine").select(cols).limit(limit)
    if where:
        q = q.where(where, prefilter=True)
    return _run(q, "vector search on", column)


# ------------------------------------------------------------------------------------------- stats
def _value_counts(table: Any, column: str) -> list[tuple[str, int]]:
    if column not in table.schema.names:
        return []
    col = table.to_lance().to_table(columns=[column]).column(column)
    counts = pc.value_counts(col).to_pylist()
    return sorted(((str(c["values"]), int(c["counts"])) for c in counts), key=lambda x: (-x[1], x[0]))


def disk_bytes(store: Store, name: str) -> int:
    """Bytes under the table's folder: every version's data, deletion files, indexes and manifests."""
    fs = store.fs
    path = store.fs_path(store.uri("lance", f"{name}.lance"))
    with store.guard(f"size of table {name!r}"):
        return int(sum(info.get("size", 0) or 0 for info in fs.find(path, detail=True).values()))


def table_stats(store: Store, name: str, version: int | None = None) -> dict[str, Any]:
    """Rows, bytes (data of this version; all on disk), per-teacher and per-run counts, versions, indexes."""
    table = open_for_query(store, name, version)
    with store.guard(f"stats of table {name!r}"):
        st = table.stats()
        total = st.get("total_bytes") if isinstance(st, dict) else getattr(st, "total_bytes", None)
        rows = int(table.count_rows())
        return {
            "table": name,
            "uri": store.uri("lance", f"{name}.lance"),
            "version": int(table.version),
            "rows": rows,
            "data_bytes": int(total or 0),
            "disk_bytes": disk_bytes(store, name),
            "bytes_per_row": (int(total or 0) / rows) if rows else math.nan,
            "per_teacher": _value_counts(table, "teacher"),
            "per_run": _value_counts(table, "run_id"),
            "per_split": _value_counts(table, "split"),
            "versions": list_versions(store, name),
            "indexes": sorted(f"{ix.name} ({ix.index_type})" for ix in table.list_indices()),
            "columns": [f"{f.name}: {f.type}" for f in table.schema],
        }


# ------------------------------------------------------------------------------------------- embeddings
def embed_prompts(
    text_encoder: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int = 64
) -> np.ndarray:
    """The text encoder's pooled output (the end-of-text token's final state) per prompt, L2-normalised.

    (N, D) float32: the vectors a `prompt_embedding` column holds and a vector search compares with cosine.
    """
    import torch

    out = []
    device = next(text_encoder.parameters()).device
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            tok = tokenizer(
                list(prompts[i : i + batch_size]),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            out_ = text_encoder(tok.input_ids.to(device))
            # a CLIP text model's pooled state, or the projected one of CLIP-with-projection encoders (SDXL, SD3)
            pooled = (
                getattr(out_, "pooler_output", None) if hasattr(out_, "pooler_output") else out_.text_embeds
            )
            pooled = pooled.float()
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
    if not out:
        return np.zeros((0, int(text_encoder.config.hidden_size)), np.float32)
    return np.concatenate(out)
