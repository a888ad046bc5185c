"""Is a caption file text at all? A look at its first KiB before any row is read.

A text reader fed random bytes, an image or a disguised archive splits it on newline bytes and counts every
"line" as a bad row, and a few short lines that happen to be valid UTF-8 get through as prompts (a 50 MB file
of random bytes once committed 153 junk prompts). So each text-format file is sniffed first:

- magic bytes name the container (gzip, zstd, bz2, xz, zip, 7z, PNG, JPEG, GIF, WebP, PDF, Parquet, ELF, ...):
  a compressed file whose name says so (`captions.txt.gz`) is decompressed as before and its *content* is
  sniffed; one whose name does not is refused with its kind ("gzip-compressed: name it .gz");
- a UTF-16/32 byte-order mark: refused as "UTF-16 text: convert it to UTF-8";
- otherwise the share of NUL bytes and of other control bytes decides: text has none or almost none, random
  bytes ~0.4% NUL and ~11% control bytes. Mis-encoded text (Latin-1, cp1252) is not binary: its rows are read
  and counted as `bad_encoding`, and `curation.max_bad_fraction` decides about the source as a whole.
"""

from __future__ import annotations

from typing import Any

SNIFF_BYTES = 1024
MAX_NUL_FRACTION = 0.01  # more NUL bytes than this in the first KiB: not text
MAX_CONTROL_FRACTION = 0.05  # control bytes other than \t \n \v \f \r and ESC

# (offset, magic, kind); the first match wins.
MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x1f\x8b", "gzip-compressed"),
    (0, b"\x28\xb5\x2f\xfd", "zstd-compressed"),
    (0, b"BZh", "bz2-compressed"),
    (0, b"\xfd7zXZ\x00", "xz-compressed"),
    (0, b"PK\x03\x04", "a zip archive"),
    (0, b"PK\x05\x06", "a zip archive"),
    (0, b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
    (257, b"ustar", "a tar archive"),
    (0, b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"GIF8", "a GIF image"),
    (8, b"WEBP", "a WebP image"),
    (0, b"%PDF", "a PDF document"),
    (0, b"PAR1", "a Parquet file"),
    (0, b"\x7fELF", "an ELF executable"),
    (0, b"SQLite format 3\x00", "an SQLite database"),
    (0, b"\x93NUMPY", "a NumPy array"),
)
# What the name must end with for a compressed file to be read (fsspec's compression="infer").
COMPRESSED_SUFFIX = {
    "gzip-compressed": ".gz",
    "zstd-compressed": ".zst",
    "bz2-compressed": ".bz2",
    "xz-compressed": ".xz",
}
_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32 text"),
    (b"\x00\x00\xfe\xff", "UTF-32 text"),
    (b"\xff\xfe", "UTF-16 text"),
    (b"\xfe\xff", "UTF-16 text"),
)
_TEXT_CONTROLS = frozenset(b"\t\n\v\f\r\x1b")
_CONTROL = frozenset(range(0x20)) | {0x7F}


def container_kind(head: bytes) -> str | None:
    """The kind of file the magic bytes at the start name, or None."""
    for offset, magic, kind in MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return kind
    return None


def binary_reason(head: bytes) -> str | None:
    """Why `head` (the first bytes of a file, decompressed if its name says so) is not text, or None."""
    if not head:
        return None
    for bom, kind in _BOMS:
        if head.startswith(bom):
            return f"{kind}: convert it to UTF-8"
    kind = container_kind(head)
    if kind is not None:
        return kind
    nul = head.count(0)
    control = sum(1 for b in head if b in _CONTROL and b not in _TEXT_CONTROLS)
    # shares, with a floor of a few bytes: one bad line in a tiny file is a bad row, not a binary file
    if nul > max(4, MAX_NUL_FRACTION * len(head)) or control > max(8, MAX_CONTROL_FRACTION * len(head)):
        return (
            f"binary data ({nul} NUL and {control - nul} other control bytes in the first {len(head)} bytes)"
        )
    return None


def sniff(fs: Any, path: str, compression: str | None) -> str | None:
    """Why the file at `path` is not a text caption file, or None when it looks like text.

    `compression` is what the file's name implies (None: plain). A compressed file is checked for the
    matching magic and its decompressed start is sniffed; a plain one must not be a known container.
    """
    with fs.open(path, "rb") as f:
        raw = f.read(SNIFF_BYTES)
    kind = container_kind(raw)
    if compression is None:
        if kind in COMPRESSED_SUFFIX:
            return f"{kind} (name it *{COMPRESSED_SUFFIX[kind]} to have it decompressed)"
        return binary_reason(raw)
    if kind not in COMPRESSED_SUFFIX:
        return None  # the name says compressed but it is not: the reader reports it as unreadable
    with fs.open(path, "rb", compression="infer") as f:
        try:
            inner = f.read(SNIFF_BYTES)
        except (OSError, EOFError, ValueError):
            return None  # truncated / corrupt: the reader reports it as an unreadable file
    reason = binary_reason(inner)
    return f"{kind} {reason}" if reason else None
