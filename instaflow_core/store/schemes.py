"""URIs: a plain path or file:// (local) versus an object store (s3://), split once here."""

from __future__ import annotations

from pathlib import Path

from instaflow_core.errors import StorageError

STORE_SCHEME = "store://"  # a URI relative to the store root (Store.ref / Store.resolve)


def _split_scheme(uri: str) -> tuple[str, str]:
    """('s3', 'bucket/key') | ('file', '/abs/path'); plain paths count as file (relative to the cwd)."""
    uri = str(uri)
    if uri.startswith("s3://"):
        return "s3", uri[len("s3://") :].strip("/")
    if uri.startswith("file://"):
        rest = uri[len("file://") :]
        return "file", str(Path(rest or ".").expanduser().resolve())
    if uri.startswith(STORE_SCHEME):
        raise StorageError(f"{uri} is relative to a store: resolve it with Store.resolve() first")
    if "://" in uri:
        raise StorageError(f"unsupported storage URI {uri!r}: use a path, file:// or s3://")
    return "file", str(Path(uri).expanduser().resolve())


def _file_uri(path: str) -> str:
    return "file://" + path


def local_root(root: str) -> Path | None:
    """The local folder behind a file:// or plain-path store root, or None for object stores."""
    if root.startswith("file://"):
        return Path(root[len("file://") :]).expanduser().resolve()
    if "://" not in root:
        return Path(root).expanduser().resolve()
    return None
