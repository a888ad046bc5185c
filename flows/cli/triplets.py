"""`instaflow triplets ...`: look at what generation made (query, search, stats, export, show).

Every command reads the store of the resolved config (`--preset`, `--set storage.root=...`) and works on any
table there (`--table prompts`, `--table distill_pairs`), at its latest version or `--version V`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import typer
from rich.console import Console
from rich.table import Table

from flows.cli.options import PresetOpt, SetOpt, load_config
from instaflow_core.errors import DataError

app = typer.Typer(
    help="Query, search, summarise, export and view the triplets (or any table) in the store.",
    no_args_is_help=True,
)
console = Console()

TableOpt = typer.Option("triplets", "--table", "-t", help="Table name (triplets, prompts, distill_pairs).")
VersionOpt = typer.Option(None, "--version", "-V", help="Table version (default: the latest).")
LimitOpt = typer.Option(20, "--limit", "-n", min=1, help="Most rows to show.")
ColumnsOpt = typer.Option(
    None, "--columns", "-c", help="Columns to show, comma-separated or repeated (default: all but tensors)."
)
WhereOpt = typer.Option(None, "--where", "-w", help="SQL filter, e.g. \"teacher = 'tiny' AND seed > 10\".")
JsonOpt = typer.Option(False, "--json", help="Print JSON lines instead of a table.")


def _open(preset: str, sets: list[str] | None, table: str, version: int | None) -> tuple[Any, Any, Any]:
    from instaflow_core.store import Store
    from instaflow_core.store.query import open_for_query

    cfg = load_config(preset, sets)
    store = Store(cfg.storage, read_only=True)  # a read: no root created, no write probe
    return cfg, store, open_for_query(store, table, version)


# What a terminal-wide table shows by default for triplet tables (--columns all, or --json, shows everything).
TRIPLET_VIEW = ("triplet_id", "prompt", "seed", "guidance", "shard", "teacher")


def _columns(raw: list[str] | None, schema: pa.Schema, compact: bool = False) -> list[str] | None:
    """--columns as a list; `all` = every column (tensors too); none given = None (all but tensors), or with
    `compact` a terminal-sized view of triplet tables."""
    cols = [c.strip() for item in raw or [] for c in item.split(",") if c.strip()]
    if cols == ["all"]:
        return list(schema.names)
    if not cols and compact and "triplet_id" in schema.names:
        return [c for c in TRIPLET_VIEW if c in schema.names]
    return cols or None


def _cell(value: Any, width: int = 80) -> str:
    if value is None:
        return "null"
    if isinstance(value, list) and len(value) > 8:
        return f"<{len(value)} values>"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_rows(rows: pa.Table, title: str, as_json: bool) -> None:
    """A table when it fits the terminal, else one block per row (like psql's expanded mode); or JSON lines."""
    data = rows.to_pylist()
    if as_json:
        for row in data:
            typer.echo(json.dumps(row, default=str))
        return
    names = rows.column_names
    cells = [[_cell(row[c]) for c in names] for row in data]
    widths = [max([len(n)] + [len(r[i]) for r in cells]) for i, n in enumerate(names)]
    fits = sum(min(w, 40) + 3 for w in widths) + 1 <= console.width
    if fits or not data:
        t = Table(title=title, header_style="bold")
        for name in names:
            t.add_column(name, overflow="fold")
        for r in cells:
            t.add_row(*r)
        console.print(t)
    else:
        console.print(f"[bold]{title}[/]")
        key_w = max(len(n) for n in names)
        for k, r in enumerate(cells, start=1):
            console.rule(f"row {k}", align="left", style="dim")
            for name, value in zip(names, r, strict=True):
                console.print(f"[bold]{name:<{key_w}}[/]  {value}", soft_wrap=False, overflow="fold")
    console.print(f"[dim]{rows.num_rows} row(s)[/]")


def _title(table: Any, extra: str = "") -> str:
    return f"{table.name} @ v{table.version}{'  ' + extra if extra else ''}"


# ------------------------------------------------------------------------------------------- query
@app.command()
def query(
    where: str | None = WhereOpt,
    limit: int = LimitOpt,
    table: str = TableOpt,
    columns: list[str] = ColumnsOpt,
    version: int | None = VersionOpt,
    as_json: bool = JsonOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Rows matching a SQL filter (tensor columns hidden unless named in --columns)."""
    from instaflow_core.store.query import query_rows

    _, _, tbl = _open(preset, set_, table, version)
    cols = _columns(columns, tbl.schema, compact=not as_json)
    rows = query_rows(tbl, where, limit, cols)
    _print_rows(rows, _title(tbl, f"where {where}" if where else ""), as_json)


# ------------------------------------------------------------------------------------------- search
@app.command()
def search(
    text: str | None = typer.Argument(None, help="Words to find in the prompts (full-text search)."),
    vector_from: str | None = typer.Option(
        None, "--vector-from", help="Vector search: rows whose prompt embedding is nearest this prompt's."
    ),
    where: str | None = WhereOpt,
    limit: int = LimitOpt,
    table: str = TableOpt,
    columns: list[str] = ColumnsOpt,
    version: int | None = VersionOpt,
    as_json: bool = JsonOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Full-text search on the prompt text, or vector search with --vector-from (needs an embedding column)."""
    from instaflow_core.store.query import embedding_column, search_text, search_vector

    if (text is None) == (vector_from is None):
        raise DataError('give search words, or --vector-from "<prompt>" for a vector search (not both)')
    cfg, _, tbl = _open(preset, set_, table, version)
    cols = _columns(columns, tbl.schema, compact=not as_json)
    if text is not None:
        rows, how = search_text(tbl, text, limit, cols, where)
        note = "" if how == "fts" else "  (no full-text index on this version: substring scan)"
        _print_rows(rows, _title(tbl, f"search {text!r}{note}"), as_json)
        return
    column = embedding_column(tbl.schema)
    if column is None:
        raise DataError(
            f"table {table!r} has no prompt embedding column (a fixed-size float list named 'prompt_embedding'): "
            'vector search is unavailable; use `instaflow triplets search "<words>"` for full-text search'
        )
    vec = _embed(cfg, vector_from)
    rows = search_vector(tbl, vec, limit, cols, column, where)
    _print_rows(rows, _title(tbl, f"nearest to {vector_from!r} by {column}"), as_json)


def _embed(cfg: Any, prompt: str) -> Any:
    from instaflow_core.models.loading import teacher_parts
    from instaflow_core.store.query import embed_prompts

    model = teacher_parts(cfg.models)
    return embed_prompts(model["text_encoder"], model["tokenizer"], [prompt])[0]


# ------------------------------------------------------------------------------------------- stats
def _human(n: float) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command()
def stats(
    table: str = TableOpt,
    version: int | None = VersionOpt,
    as_json: bool = JsonOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Rows, bytes, per-teacher and per-run counts, and the table's versions."""
    from instaflow_core.store import Store
    from instaflow_core.store.query import table_stats

    cfg = load_config(preset, set_)
    s = table_stats(Store(cfg.storage, read_only=True), table, version)
    if as_json:
        typer.echo(json.dumps(s, indent=2, default=str))
        return
    t = Table(title=f"{s['table']} @ v{s['version']}", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value", overflow="fold")
    t.add_row("uri", s["uri"])
    t.add_row("rows", f"{s['rows']:,}")
    t.add_row("data bytes (this version)", f"{_human(s['data_bytes'])}  ({_human(s['bytes_per_row'])}/row)")
    t.add_row("on disk (all versions, indexes)", _human(s["disk_bytes"]))
    for label, key in (("per teacher", "per_teacher"), ("per run", "per_run"), ("per split", "per_split")):
        if s[key]:
            shown = s[key][:10]
            more = f"  (+{len(s[key]) - 10} more)" if len(s[key]) > 10 else ""
            t.add_row(label, "\n".join(f"{k}: {v:,}" for k, v in shown) + more)
    t.add_row("indexes", ", ".join(s["indexes"]) or "none")
    vs = s["versions"]
    listing = [
        f"v{v['version']}  {v['timestamp'][:19]}  {v['rows'] if v['rows'] is not None else '?'} rows"
        for v in vs
    ]
    if len(listing) > 12:
        listing = listing[:3] + [f"... {len(listing) - 9} more ..."] + listing[-6:]
    t.add_row(f"versions ({len(vs)})", "\n".join(listing))
    console.print(t)


# ------------------------------------------------------------------------------------------- export
@app.command()
def export(
    fmt: str = typer.Option("parquet", "--format", "-f", help="Output format (parquet)."),
    dest: str | None = typer.Option(
        None,
        "--dest",
        "-d",
        help="Destination URI or path (default: <store>/exports/<table>-v<version>.parquet).",
    ),
    table: str = TableOpt,
    version: int | None = VersionOpt,
    where: str | None = WhereOpt,
    columns: list[str] = ColumnsOpt,
    row_group_rows: int | None = typer.Option(
        None, "--row-group-rows", min=1, help="Rows per Parquet row group (default: about 64 MB per group)."
    ),
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Write a table version to Parquet (for pandas, duckdb, Spark), latents as fixed-size lists."""
    from instaflow_core.store import export_parquet
    from instaflow_core.store.query import is_tensor_field, query_rows, select_columns

    if fmt.lower() != "parquet":
        raise DataError(f"--format {fmt!r}: only parquet is supported")
    _, store, tbl = _open(preset, set_, table, version)
    v = int(tbl.version)
    cols = select_columns(tbl.schema, _columns(columns, tbl.schema), show_tensors=True)
    if where:
        query_rows(tbl, where, limit=1, columns=cols[:1])  # a bad filter fails here, in one line
    target = dest or store.uri("exports", f"{table}-v{v}.parquet")
    if "://" not in target:
        target = str(Path(target).expanduser().resolve())
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    if row_group_rows is None:
        # ~64 MB row groups: big enough for fast scans, small enough for readers that load one group at a time
        # (SD latents are 32 KB a row: 2048 rows; the tiny ones 128 B: capped at 128k rows).
        width = sum(
            tbl.schema.field(c).type.list_size * 4 for c in cols if is_tensor_field(tbl.schema.field(c))
        )
        row_group_rows = int(min(131_072, max(1024, (64 << 20) // (width + 256))))
    uri, rows = export_parquet(
        store,
        table,
        v,
        target,
        row_group_rows=row_group_rows,
        columns=cols if columns else None,
        filter=where,
    )
    console.print(
        f"wrote [bold]{rows:,}[/] rows of {table} @ v{v} to {uri} (row groups of {row_group_rows:,} rows)"
    )


# ------------------------------------------------------------------------------------------- show
def _table_teacher(tbl: Any, cfg: Any) -> Any:
    """The model that made the table's latents (its VAE decodes them), from the table's lineage metadata;
    None when the table does not record one that can still be loaded (then the configured teacher is used)."""
    from instaflow_core.models.loading import load_model
    from instaflow_core.refs import ModelKind, ModelRef
    from instaflow_core.store import get_metadata

    uri = get_metadata(tbl).get("teacher_uri")
    if not uri:
        return None
    try:
        return load_model(ModelRef(uri=uri, kind=ModelKind.TEACHER), cfg.storage, cfg.models)
    except Exception as err:  # moved or deleted since: say so, fall back to the configured teacher
        console.print(
            f"[yellow]the table's teacher {uri} could not be loaded ({err}); using models.teacher[/]"
        )
        return None


@app.command()
def show(
    ids: list[str] = typer.Argument(None, help="triplet ids to show."),
    where: str | None = WhereOpt,
    limit: int = typer.Option(16, "--limit", "-n", min=1, help="Most images with --where."),
    out: str = typer.Option("grid.png", "--out", "-o", help="PNG to write (a path or a store URI)."),
    cols: int = typer.Option(4, "--cols", min=1, help="Images per grid row."),
    table: str = TableOpt,
    version: int | None = VersionOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Decode latents with the teacher's VAE and write an image grid captioned with the prompts."""
    if bool(ids) == bool(where):
        raise DataError("name triplet ids, or pick rows with --where (one of the two)")

    import numpy as np
    import torch

    from instaflow_core.inference.images import decode_latents, image_grid, png_bytes
    from instaflow_core.models.loading import teacher_parts
    from instaflow_core.store import from_tensor_column
    from instaflow_core.store.query import query_rows, rows_by_id, text_column

    cfg, store, tbl = _open(preset, set_, table, version)
    if "x1" not in tbl.schema.names:
        raise DataError(f"table {table!r} has no x1 latent column: nothing to decode")
    text = text_column(tbl.schema)
    want = ["triplet_id", text, "x1", "latent_shape"]
    want = [c for c in want if c in tbl.schema.names]
    rows = rows_by_id(tbl, ids, want) if ids else query_rows(tbl, where, limit, want)
    if rows.num_rows == 0:
        raise DataError(f"no rows match --where {where!r}")
    shape = rows.column("latent_shape")[0].as_py() if "latent_shape" in rows.column_names else None
    x1 = from_tensor_column(rows.column("x1"), shape).astype(np.float32)
    if x1.ndim != 4:
        raise DataError(f"x1 has shape {x1.shape[1:]}: expected (C, h, w) latents")
    model = _table_teacher(tbl, cfg) or teacher_parts(cfg.models)
    with torch.inference_mode():
        images = decode_latents(model, torch.from_numpy(x1))
    grid = image_grid(images, cols, captions=rows.column(text).to_pylist(), min_side=128, background=255)
    png = png_bytes(grid)
    if "://" in out:
        store.write_bytes(out, png)
    else:
        path = Path(out).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        out = str(path.resolve())
    console.print(f"wrote {rows.num_rows} image(s) ({grid.shape[1]}x{grid.shape[0]}) to {out}")
