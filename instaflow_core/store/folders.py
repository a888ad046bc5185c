"""Folders in the store: upload, download, and a cached local copy (diffusers loads model folders from disk).

A mixin of `Store`: it uses the store's `_fs_for(uri)` (filesystem + path) and `guard(what)` (errors as one line).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from instaflow_core.errors import StorageError
from instaflow_core.store.errors import StoreNotFoundError
from instaflow_core.store.schemes import _split_scheme


class FolderTransfer:
    """put_dir / get_dir / local_copy over any fsspec filesystem the store resolves."""

    def put_dir(self, local_dir: str | Path, uri: str, clean: bool = False) -> str:
        """Upload a local folder's contents (or one file) to uri; `clean` first deletes what is there."""
        src = Path(local_dir)
        uri = self.resolve(uri)
        if not src.exists():
            raise StorageError(f"put_dir: local path {src} does not exist")
        fs, dest = self._fs_for(uri)
        if src.is_file():
            pairs = [(str(src), dest)]
        else:
            pairs = [
                (str(p), f"{dest}/{p.relative_to(src).as_posix()}")
                for p in sorted(src.rglob("*"))
                if p.is_file()
            ]
        with self.guard(f"upload {src} -> {uri}"):
            if clean and fs.exists(dest):
                fs.rm(dest, recursive=True)
            if pairs:
                if _split_scheme(uri)[0] == "file":
                    for _, r in pairs:
                        Path(r).parent.mkdir(parents=True, exist_ok=True)
                # Lists on both sides: fsspec maps them 1:1 and uploads concurrently on S3.
                fs.put([lp for lp, _ in pairs], [r for _, r in pairs])
        return uri

    def _remote_files(self, fs: Any, path: str) -> dict[str, dict[str, Any]]:
        """{relative name: info} of every file under path; {"": info} when path is a single file."""
        found = fs.find(path, detail=True, withdirs=False)
        if not found:
            return {}
        base = path.rstrip("/")
        out: dict[str, dict[str, Any]] = {}
        for name, info in found.items():
            name = name.rstrip("/")
            rel = "" if name == base else name[len(base) + 1 :] if name.startswith(base + "/") else None
            if rel is not None:
                out[rel] = info
        return out

    def get_dir(self, uri: str, local_dir: str | Path) -> Path:
        """Download the folder at uri into local_dir (contents land directly in local_dir)."""
        fs, path = self._fs_for(uri)
        dest = Path(local_dir)
        with self.guard(f"download {uri}"):
            files = self._remote_files(fs, path)
            if not files:
                raise StoreNotFoundError(f"download {uri}: not found")
            dest.mkdir(parents=True, exist_ok=True)
            rpaths, lpaths = [], []
            for rel in sorted(files):
                target = dest / (rel or Path(path).name)
                target.parent.mkdir(parents=True, exist_ok=True)
                rpaths.append(f"{path}/{rel}" if rel else path)
                lpaths.append(str(target))
            fs.get(rpaths, lpaths)
        return dest

    def local_copy(self, uri: str, cache_dir: str | Path | None = None) -> Path:
        """A local path holding uri: the path itself for local URIs, else a cached download.

        The cache key is the URI plus a fingerprint of the remote listing (names, sizes, ETags), so a folder
        rewritten in place is downloaded again. Downloads land in a temp folder renamed into place, so an
        interrupted download never looks complete.
        """
        uri = self.resolve(uri)
        scheme, path = _split_scheme(uri)
        if scheme == "file":
            p = Path(path)
            if not p.exists():
                raise StoreNotFoundError(f"{uri}: not found")
            return p
        fs, path = self._fs_for(uri)
        with self.guard(f"download {uri}"):
            files = self._remote_files(fs, path)
        if not files:
            raise StoreNotFoundError(f"{uri}: not found")
        listing = sorted(
            (rel, info.get("size"), info.get("ETag") or info.get("LastModified"))
            for rel, info in files.items()
        )
        fingerprint = hashlib.sha256(repr(listing).encode()).hexdigest()[:16]
        root = Path(
            cache_dir
            or os.environ.get("INSTAFLOW_CACHE_DIR")
            or Path.home() / ".cache" / "instaflow" / "store"
        )
        slot = root / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
        final = slot / fingerprint
        single = list(files) == [""]
        result = final / Path(path).name if single else final
        if (final / ".complete").exists():
            return result
        slot.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=slot))
        try:
            self.get_dir(uri, tmp)
            (tmp / ".complete").write_text(uri)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / ".complete").exists():  # not a concurrent winner: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in slot.iterdir():  # keep one version per URI
            if old != final and not old.name.startswith(".dl-"):
                shutil.rmtree(old, ignore_errors=True)
        return result
