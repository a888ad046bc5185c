"""Streaming caption readers: Parquet, JSONL, CSV/TSV, plain text, COCO caption JSON, from paths, URIs or globs.

`iter_caption_batches(source, ...)` yields `(file, texts)` with at most `batch_rows` captions per batch, reading
files incrementally (Parquet through `iter_batches`, text formats line by line, gzip/zstd/bz2 decompressed on the
fly), so memory stays flat however large the file. The one exception is COCO annotation JSON, which is parsed
whole: those files are bounded (captions_val2017.json is 2 MB, train 90 MB) and the format is one JSON object.

Bad input:
- a missing file, a glob that matches nothing, a missing column or a non-text column: always a `DataError`
  naming the thing (a config mistake, not bad data);
- a bad row (NUL bytes, invalid UTF-8, invalid JSON line, missing field, non-text value) or an unreadable file
  (corrupt Parquet, I/O error): with `on_bad_row="skip"` counted in `bad_rows[reason]` and skipped; with
  `"error"` a `DataError` naming the file and row.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import fsspec
import pyarrow as pa

from instaflow_core.config import CaptionSource, CurationConfig
from instaflow_core.curation.prompts import Curator, rows_to_arrow
from instaflow_core.curation.sniff import sniff
from instaflow_core.errors import DataError

OnBadRow = Literal["skip", "error"]

_EXT_FORMAT = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
_EXT_FORMAT |= {".tsv": "csv", ".txt": "txt", ".text": "txt", ".json": "coco"}
_COMPRESSION_EXT = (".gz", ".bz2", ".zst", ".xz")
_GLOB_CHARS = "*?["


def detect_format(path: str) -> str:
    """The format implied by a file name (compression suffix ignored); DataError if none."""
    name = path.lower()
    for ext in _COMPRESSION_EXT:
        if name.endswith(ext):
            name = name[: -len(ext)]
    for ext, fmt in _EXT_FORMAT.items():
        if name.endswith(ext):
            return fmt
    raise DataError(
        f"cannot tell the format of {path!r} from its extension: set curation.sources[].format "
        f"to one of parquet, jsonl, csv, txt, coco"
    )


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def resolve_paths(
    path: str, fs: fsspec.AbstractFileSystem | None = None
) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """Expand a path, file:// URI, object-store URI or glob into (filesystem, sorted file list).

    Object-store URIs use `fs` when given (the Store's configured filesystem: endpoint and keys), else fsspec's
    default for the scheme. A relative local path is looked up from the working directory (the presets' own
    bundled files are made absolute when the preset loads, see config.load).
    """
    if _is_url(path):
        if fs is None:
            fs, _ = fsspec.core.url_to_fs(path)
        protocol = path.split("://", 1)[0]
        stripped = path.split("://", 1)[1]
        if any(c in stripped for c in _GLOB_CHARS):
            files = sorted(fs.glob(stripped))
            if not files:
                raise DataError(f"caption source {path!r} matches no files")
        else:
            if not fs.exists(stripped):
                raise DataError(f"caption source not found: {path}")
            files = [stripped]
        return fs, [f"{protocol}://{f}" if not f.startswith(f"{protocol}://") else f for f in files]

    local = path[len("file://") :] if path.startswith("file://") else path
    local = os.path.expanduser(local)
    lfs = fsspec.filesystem("file")
    for cand in [Path(local)]:
        if any(c in local for c in _GLOB_CHARS):
            files = sorted(lfs.glob(str(cand)))
            files = [f for f in files if lfs.isfile(f)]
            if files:
                return lfs, files
        elif cand.is_file():
            return lfs, [str(cand.resolve())]
    if any(c in local for c in _GLOB_CHARS):
        raise DataError(f"caption source {path!r} matches no files")
    raise DataError(f"caption source not found: {path}")


def _fs_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """What `fs.open` wants: the path without the scheme for object stores."""
    return path.split("://", 1)[1] if _is_url(path) else path


class _BadRows:
    """Counts bad rows per reason, or raises when the config says so."""

    def __init__(self, counter: Counter, on_bad_row: OnBadRow) -> None:
        self.counter = counter
        self.on_bad_row = on_bad_row

    def __call__(self, reason: str, file: str, row: int | None, detail: str = "") -> None:
        if self.on_bad_row == "error":
            where = f"{file}: row {row}" if row is not None else file
            hint = " (set curation.on_bad_row=skip to skip such rows)"
            raise DataError(f"{where}: {reason.replace('_', ' ')}{': ' + detail if detail else ''}{hint}")
        self.counter[reason] += 1


def iter_caption_batches(
    source: CaptionSource,
    *,
    batch_rows: int = 50_000,
    on_bad_row: OnBadRow = "skip",
    bad_rows: Counter | None = None,
    fs: fsspec.AbstractFileSystem | None = None,
) -> Iterator[tuple[str, list[str | None]]]:
    """Yield `(file, captions)` batches (at most `batch_rows` each) from every file the source names.

    Captions are returned as read (None for a null cell); normalisation is `prompts.normalize`'s job.
    """
    counter = bad_rows if bad_rows is not None else Counter()
    bad = _BadRows(counter, on_bad_row)
    fs, files = resolve_paths(source.path, fs)
    for file in files:
        fmt = detect_format(file) if source.format == "auto" else source.format
        reader = _READERS[fmt]
        if fmt != "parquet":  # random bytes, images, archives: refused whole, never read as rows
            compressed = next((e for e in _COMPRESSION_EXT if file.lower().endswith(e)), None)
            reason = sniff(fs, _fs_path(fs, file), compressed)
            if reason:
                raise DataError(f"{file}: not a text caption file: {reason}")
        try:
            yield from _batched(file, reader(fs, file, source.column, bad), batch_rows)
        except DataError:
            raise
        except (OSError, ValueError, EOFError) as err:  # corrupt / truncated / unreadable file
            # pyarrow's ArrowInvalid is a ValueError; gzip's BadGzipFile an OSError.
            bad(
                "unreadable_file",
                file,
                None,
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
            )


def _batched(
    file: str, rows: Iterator[str | None], batch_rows: int
) -> Iterator[tuple[str, list[str | None]]]:
    batch: list[str | None] = []
    for text in rows:
        batch.append(text)
        if len(batch) >= batch_rows:
            yield file, batch
            batch = []
    if batch:
        yield file, batch


# ------------------------------------------------------------------------------------------------ readers
def _open_binary(fs: fsspec.AbstractFileSystem, file: str) -> Any:
    return fs.open(_fs_path(fs, file), "rb", compression="infer")


def _decode_lines(fs: fsspec.AbstractFileSystem, file: str, bad: _BadRows) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line that is valid UTF-8 without NUL bytes; bad lines are reported."""
    with _open_binary(fs, file) as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 BOM
            if b"\x00" in raw:
                bad("nul_bytes", file, lineno)
                continue
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                bad("bad_encoding", file, lineno, f"not UTF-8 at byte {err.start}")


def _read_txt(fs: fsspec.AbstractFileSystem, file: str, column: str, bad: _BadRows) -> Iterator[str | None]:
    for _, line in _decode_lines(fs, file, bad):
        yield line  # empty lines are counted as "empty" by the curator


def _read_jsonl(fs: fsspec.AbstractFileSystem, file: str, column: str, bad: _BadRows) -> Iterator[str | None]:
    checked = False
    for lineno, line in _decode_lines(fs, file, bad):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            bad("bad_json", file, lineno, err.msg)
            continue
        if not isinstance(obj, dict):
            bad("bad_json", file, lineno, "not a JSON object")
            continue
        if column not in obj:
            if not checked:  # the first object decides whether the column name is wrong for the whole file
                raise DataError(
                    f"{file}: no field {column!r} (fields present: {sorted(obj)}); "
                    f"set curation.sources[].column"
                )
            bad("missing_field", file, lineno, column)
            continue
        checked = True
        value = obj[column]
        if value is not None and not isinstance(value, str):
            bad("not_text", file, lineno, f"{column} is {type(value).__name__}")
            continue
        if value is not None and "\x00" in value:
            bad("nul_bytes", file, lineno)
            continue
        yield value


def _read_csv(fs: fsspec.AbstractFileSystem, file: str, column: str, bad: _BadRows) -> Iterator[str | None]:
    delimiter = "\t" if file.lower().replace(".gz", "").endswith(".tsv") else ","
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with _open_binary(fs, file) as fb:
        # surrogateescape keeps undecodable bytes as lone surrogates so the csv parser (which handles quoted
        # multi-line fields) keeps going; a caption containing one is then reported as bad_encoding.
        text = io.TextIOWrapper(fb, encoding="utf-8-sig", errors="surrogateescape", newline="")
        lines = _drop_nul_lines(text, file, bad)
        reader = csv.reader(lines, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        if column not in header:
            raise DataError(
                f"{file}: no column {column!r} (columns present: {header}); set curation.sources[].column"
            )
        idx = header.index(column)
        while True:
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                bad("bad_csv", file, reader.line_num, str(err))
                continue
            row = reader.line_num
            if not record:
                continue
            if idx >= len(record):
                bad("missing_field", file, row, column)
                continue
            value = record[idx]
            if _has_surrogate(value):
                bad("bad_encoding", file, row, "not UTF-8")
                continue
            yield value


def _drop_nul_lines(lines: Any, file: str, bad: _BadRows) -> Iterator[str]:
    for lineno, line in enumerate(lines, start=1):
        if "\x00" in line:
            bad("nul_bytes", file, lineno)
            continue
        yield line


def _has_surrogate(s: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in s) if not s.isascii() else False


def _read_parquet(
    fs: fsspec.AbstractFileSystem, file: str, column: str, bad: _BadRows
) -> Iterator[str | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open(_fs_path(fs, file), "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if column not in names:
            raise DataError(
                f"{file}: no column {column!r} (columns present: {names}); set curation.sources[].column"
            )
        typ = pf.schema_arrow.field(column).type
        if pa.types.is_dictionary(typ):
            typ = typ.value_type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)):
            raise DataError(f"{file}: column {column!r} holds {typ}, not text")
        row = 0
        # Row-group by row-group: memory is one batch of one column, whatever the file size.
        for rb in pf.iter_batches(batch_size=8192, columns=[column]):
            for value in rb.column(0).to_pylist():
                row += 1
                if value is not None and "\x00" in value:
                    bad("nul_bytes", file, row)
                    continue
                yield value


def _read_coco(fs: fsspec.AbstractFileSystem, file: str, column: str, bad: _BadRows) -> Iterator[str | None]:
    with _open_binary(fs, file) as f:
        try:
            data = json.load(f)
        except UnicodeDecodeError as err:
            raise DataError(f"{file}: not UTF-8 ({err.reason} at byte {err.start})") from err
        except json.JSONDecodeError as err:
            raise DataError(f"{file}: not valid JSON ({err.msg} at line {err.lineno})") from err
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{file}: not a COCO caption file (no 'annotations' list; top level has {keys})")
    for i, ann in enumerate(anns, start=1):
        value = ann.get("caption") if isinstance(ann, dict) else None
        if not isinstance(value, str):
            bad("missing_field", file, i, "caption")
            continue
        if "\x00" in value:
            bad("nul_bytes", file, i)
            continue
        yield value


_READERS = {
    "txt": _read_txt,
    "jsonl": _read_jsonl,
    "csv": _read_csv,
    "parquet": _read_parquet,
    "coco": _read_coco,
}


def source_identity(
    source: CaptionSource, fs: fsspec.AbstractFileSystem | None = None
) -> list[dict[str, Any]]:
    """What identifies a source's current content, for cache keys: each file's path, size and mtime/etag."""
    if source.format == "digits":  # an image source (curation/images.py): the dataset, not a file
        from instaflow_core.curation.images import source_identity as image_source_identity

        return image_source_identity(source)
    fs, files = resolve_paths(source.path, fs)
    out = []
    for file in files:
        info = fs.info(_fs_path(fs, file))
        stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        out.append({"path": file, "size": info.get("size"), "stamp": str(stamp)})
    return out


def curated_batches(
    curation: CurationConfig,
    curator: Curator,
    fs: fsspec.AbstractFileSystem | None = None,
) -> Iterator[pa.Table]:
    """Read every configured source in order and yield the kept prompts batch by batch (PROMPTS_SCHEMA tables).

    Bad rows are counted into `curator.report.bad_rows`; reading stops once `curation.max_prompts` are kept.
    """
    if not curation.sources:
        raise DataError("curation.sources is empty: name at least one caption file (path, format, column)")
    for source in curation.sources:
        if source.format == "digits":  # an image source: the captions of its (image, caption) rows
            from instaflow_core.curation.images import source_captions

            rows = curator.add(source_captions(source, curation.images), source.path)
            if rows:
                yield rows_to_arrow(rows)
            if curator.full:
                return
            continue
        for file, texts in iter_caption_batches(
            source,
            batch_rows=curation.batch_rows,
            on_bad_row=curation.on_bad_row,
            bad_rows=curator.report.bad_rows,
            fs=fs,
        ):
            # The configured path names the source (stable across machines); a glob's rows name their file.
            label = file if any(c in source.path for c in _GLOB_CHARS) else source.path
            rows = curator.add(texts, label)
            if rows:
                yield rows_to_arrow(rows)
            if curator.full:
                return
