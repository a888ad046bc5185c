"""A Hugging Face hub cache entry built from a local folder, and an offline switch for tests (no network).

`install_in_hub_cache(folder, hf_home, repo_id)` lays the folder's files out exactly as huggingface_hub stores a
download: `$HF_HOME/hub/models--<owner>--<name>/` with blobs/, refs/main, snapshots/<commit>/ (relative symlinks to
the blobs) and trees/<commit>.json (the file listing huggingface_hub >= 2.4 caches). `offline_hub(hf_home)` points
the current process at it with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".msgpack", ".onnx", ".pt", ".pth")  # stored with git LFS


def repo_files(folder: str | Path) -> list[str]:
    """Every file of the repo folder as a '/'-separated relative path, sorted (the hub's file listing)."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _file_entry(path: Path) -> dict[str, Any]:
    """The hub's tree entry for one file: git blob id; for LFS files also the sha256 (= the cache's blob name)."""
    data = path.read_bytes()
    if not path.name.endswith(LFS_SUFFIXES):
        return {"size": len(data), "blob_id": _git_blob_sha1(data)}
    sha256 = hashlib.sha256(data).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
    return {
        "size": len(data),
        "blob_id": _git_blob_sha1(pointer),
        "lfs_sha256": sha256,
        "lfs_size": len(data),
    }


def install_in_hub_cache(
    folder: str | Path,
    hf_home: str | Path,
    repo_id: str,
    *,
    allow_patterns: Iterable[str] | None = None,
    ignore_patterns: Iterable[str] | None = None,
    write_tree: bool = True,
    hardlink: bool = True,
) -> Path:
    """Put the folder's files into `$HF_HOME/hub` as huggingface_hub does; returns the snapshot folder.

    blobs/<sha256 for LFS files, git sha1 otherwise>, refs/main -> <commit>, snapshots/<commit>/<path> -> relative
    symlinks to the blobs. The commit id is a hash of the file listing (stable across builds). `allow_patterns` /
    `ignore_patterns` install a subset, like `hf download --include/--exclude`. `write_tree` also writes
    `trees/<commit>.json`, the listing of ALL files (huggingface_hub >= 2.4 writes it after a snapshot_download),
    so that an offline snapshot_download asking for files that were not installed fails as incomplete instead of
    returning a partial folder. Blobs are hard links to the folder's files when possible (no extra disk): a test
    that damages a file on purpose must write a new file (or install with `hardlink=False`), not edit in place.
    """
    from huggingface_hub.utils import filter_repo_objects

    folder = Path(folder)
    files = repo_files(folder)
    entries = {rel: _file_entry(folder / rel) for rel in files}
    commit = hashlib.sha1(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    storage = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    wanted = list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
    for rel in wanted:
        blob_name = entries[rel].get("lfs_sha256", entries[rel]["blob_id"])
        blob = storage / "blobs" / blob_name
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            try:
                if not hardlink:
                    raise OSError
                os.link(folder / rel, blob)
            except OSError:
                shutil.copyfile(folder / rel, blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)  # no trailing newline, as huggingface_hub writes it
    if write_tree:
        (storage / "trees").mkdir(parents=True, exist_ok=True)
        tree = {"format_version": 1, "files": entries}
        (storage / "trees" / f"{commit}.json").write_text(json.dumps(tree, indent=1, sort_keys=True))
    return snapshot


@contextlib.contextmanager
def offline_hub(hf_home: str | Path) -> Iterator[Path]:
    """Point this process at `hf_home` and go offline, also after huggingface_hub was imported.

    huggingface_hub reads HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE once, at import: setting the environment in a
    test is not enough, the module constants are patched too (and everything is restored on exit).
    """
    from huggingface_hub import constants

    hub = str(Path(hf_home) / "hub")
    env = {"HF_HOME": str(hf_home), "HF_HUB_CACHE": hub, "HF_HUB_OFFLINE": "1"}
    attrs = {
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": hub,
        "HUGGINGFACE_HUB_CACHE": hub,
        "HF_HUB_OFFLINE": True,
    }
    old_env = {k: os.environ.get(k) for k in env}
    old_attrs = {k: getattr(constants, k) for k in attrs}
    os.environ.update(env)
    for k, v in attrs.items():
        setattr(constants, k, v)
    try:
        yield Path(hub)
    finally:
        for k, v in old_attrs.items():
            setattr(constants, k, v)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
