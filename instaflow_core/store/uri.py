"""One storage code path for local folders (plain path / file://) and S3 (s3://, any endpoint).

`Store(cfg)` gives URIs under the configured root, an fsspec filesystem for them, the options LanceDB and
pylance need, folder upload/download and a cached local copy of a folder (diffusers loads model folders from
disk: `put_dir`, `get_dir`, `local_copy`). S3 keys are read from the environment variables the config names, at the moment a client is built;
they are never stored on the Store, printed, logged, pickled or put into an exception message.

References that outlive a run (TableRef, ModelRef, evaluation results, refs/latest.json, Prefect results) hold
store-relative URIs, `store://lance` or `store://models/2rf-<key>` (`Store.ref`, `Store.relative`), and every
method here resolves them against the current root (`Store.resolve`): a store copied or moved to another
folder, or a bucket served by another endpoint, still resolves. Anything else (s3://, file://, plain paths, hub
ids of external teachers) is left as it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from instaflow_core.config import StorageConfig
from instaflow_core.errors import InstaflowError, StorageError
from instaflow_core.store.errors import StoreNotFoundError, translate_error
from instaflow_core.store.schemes import STORE_SCHEME, _file_uri, _split_scheme

# Lance's own (object_store) retries of one S3 request: a few seconds of a flaky endpoint are absorbed there;
# longer outages are the task retries' job (tasks/retries.py), which re-run a task for minutes.
LANCE_RETRY_OPTIONS = {"client_max_retries": "8", "client_retry_timeout": "20", "connect_timeout": "5s"}


class Store:
    """The configured storage root and everything that reads or writes under it.

    `root` is normalised: `file:///abs/path` for local folders (relative roots resolved against the cwd when
    the Store is made) or `s3://bucket/prefix`. Methods take URIs (s3://, file:// or plain local paths).
    """

    def __init__(self, cfg: StorageConfig | str | None = None, read_only: bool = False) -> None:
        if cfg is None:
            cfg = StorageConfig()
        elif isinstance(cfg, str):
            cfg = StorageConfig(root=cfg)
        self.cfg = cfg
        self.scheme, path = _split_scheme(cfg.root)
        if self.scheme == "s3":
            if not path:
                raise StorageError(f"storage.root {cfg.root!r} names no bucket: use s3://bucket/prefix")
            self.bucket, _, self.prefix = path.partition("/")
            self.root = f"s3://{path}"
        else:
            self.bucket, self.prefix = None, path
            self.root = _file_uri(path)
        self._fs: Any = None
        self._db: Any = None
        self._checked = False
        self.read_only = read_only  # read commands: check() neither creates the root nor probes a write

    # ----------------------------------------------------------------------------------- identity
    def __repr__(self) -> str:
        ep = f", endpoint={self.cfg.s3_endpoint!r}" if self.is_s3 else ""
        return f"Store(root={self.root!r}{ep})"

    def __getstate__(self) -> dict[str, Any]:
        # Clients hold the keys and sockets: rebuild them after unpickling (Prefect, process runners).
        state = self.__dict__.copy()
        state.update(_fs=None, _db=None, _checked=False)
        return state

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def endpoint(self) -> str | None:
        return self.cfg.s3_endpoint if self.is_s3 else None

    def uri(self, *parts: str) -> str:
        """A URI under the root: `store.uri("models", "teacher")`."""
        clean = [str(p).strip("/") for p in parts if str(p).strip("/")]
        for p in clean:
            if ".." in p.split("/"):
                raise StorageError(f"'..' is not allowed in store paths: {p!r}")
        return "/".join([self.root, *clean]) if clean else self.root

    def ref(self, *parts: str) -> str:
        """A store-relative URI for references that are persisted: `store.ref("models", "teacher")`."""
        self.uri(*parts)  # the same checks ('..')
        clean = [str(p).strip("/") for p in parts if str(p).strip("/")]
        return STORE_SCHEME + "/".join(clean)

    def relative(self, uri: str) -> str:
        """`uri` as a store-relative URI when it lies under the root; anything else unchanged."""
        root = self.root.rstrip("/")
        if uri.rstrip("/") == root:
            return STORE_SCHEME
        if uri.startswith(root + "/"):
            return STORE_SCHEME + uri[len(root) + 1 :].strip("/")
        return uri

    def resolve(self, uri: str) -> str:
        """The real URI of a store-relative one (`store://x` -> `<root>/x`); others are returned unchanged."""
        uri = str(uri)
        if not uri.startswith(STORE_SCHEME):
            return uri
        return self.uri(*uri[len(STORE_SCHEME) :].split("/"))

    def fs_path(self, uri: str) -> str:
        """The path fsspec uses for a URI: 'bucket/key' on S3, an absolute path locally."""
        return _split_scheme(self.resolve(uri))[1]

    def local_path(self, uri: str) -> Path:
        """The local path of a file:// or plain-path URI (StorageError for s3://)."""
        uri = self.resolve(uri)
        scheme, path = _split_scheme(uri)
        if scheme != "file":
            raise StorageError(f"{uri} is not a local path: use store.local_copy() to download it")
        return Path(path)

    # ----------------------------------------------------------------------------------- clients
    def _keys(self) -> tuple[str | None, str | None]:
        """The S3 keys from the environment. Without them AWS falls back to its default chain (instance
        roles); a custom endpoint has no such chain, so missing keys fail here instead of probing the
        network for instance metadata."""
        key = os.environ.get(self.cfg.access_key_env) or None
        secret = os.environ.get(self.cfg.secret_key_env) or None
        if self.is_s3 and self.cfg.s3_endpoint and not (key and secret):
            missing = [
                n for n, v in ((self.cfg.access_key_env, key), (self.cfg.secret_key_env, secret)) if not v
            ]
            raise StorageError(
                f"no S3 credentials for {self.cfg.s3_endpoint}: set the environment variable(s) {', '.join(missing)}"
            )
        return key, secret

    def _allow_http(self) -> bool:
        if self.cfg.allow_http is not None:
            return self.cfg.allow_http
        return bool(self.cfg.s3_endpoint and self.cfg.s3_endpoint.startswith("http://"))

    @property
    def fs(self) -> Any:
        """The fsspec filesystem of the root: LocalFileSystem or s3fs.S3FileSystem (built once)."""
        if self._fs is None:
            if self.is_s3:
                import s3fs

                key, secret = self._keys()
                self._fs = s3fs.S3FileSystem(
                    key=key,
                    secret=secret,
                    endpoint_url=self.cfg.s3_endpoint,
                    client_kwargs={"region_name": self.cfg.s3_region},
                    config_kwargs={
                        "connect_timeout": 5,
                        "read_timeout": 120,
                        "retries": {"max_attempts": 3, "mode": "standard"},
                    },
                    # Other processes (Lance, workers) write too: never trust a cached listing.
                    use_listings_cache=False,
                    skip_instance_cache=True,
                )
            else:
                from fsspec.implementations.local import LocalFileSystem

                self._fs = LocalFileSystem(auto_mkdir=True)
        return self._fs

    def _fs_for(self, uri: str) -> tuple[Any, str]:
        scheme, path = _split_scheme(self.resolve(uri))
        if scheme == "s3":
            if not self.is_s3:
                raise StorageError(f"{uri} is an S3 URI but storage.root is local ({self.root})")
            return self.fs, path
        if self.is_local:
            return self.fs, path
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(auto_mkdir=True), path

    def storage_options(self) -> dict[str, str]:
        """Options for `lancedb.connect` / `lance.dataset` (object_store keys); {} for local roots."""
        if not self.is_s3:
            return {}
        opts = {
            "region": self.cfg.s3_region,
            "allow_http": "true" if self._allow_http() else "false",
            **LANCE_RETRY_OPTIONS,
        }
        if self.cfg.s3_endpoint:
            opts["endpoint"] = self.cfg.s3_endpoint
        key, secret = self._keys()
        if key:
            opts["aws_access_key_id"] = key
        if secret:
            opts["aws_secret_access_key"] = secret
        return opts

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Turn storage failures inside the block into one-line StorageErrors naming `what`."""
        try:
            yield
        except FileNotFoundError as err:
            if isinstance(err, InstaflowError):
                raise
            raise StoreNotFoundError(f"{what}: not found") from err
        except Exception as err:
            mapped = translate_error(
                err,
                what,
                endpoint=self.endpoint if self.is_s3 else None,
                bucket=self.bucket,
                key_envs=(self.cfg.access_key_env, self.cfg.secret_key_env) if self.is_s3 else None,
            )
            if mapped is None:
                raise
            raise mapped from err

    # ----------------------------------------------------------------------------------- checks
    def check(self) -> None:
        """Fail fast with one clear StorageError when the root cannot be used (unreachable, keys, bucket)."""
        if self.is_local:
            path = Path(self.prefix)
            if self.read_only:
                if not path.is_dir():
                    raise StorageError(
                        f"no store at {path}: run `instaflow rebuild` (or point storage.root at one)"
                    )
                self._checked = True
                return
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise StorageError(f"cannot create storage root {path}: {err.strerror}") from err
            if not os.access(path, os.W_OK):
                raise StorageError(f"storage root {path} is not writable")
            self._checked = True
            return
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        key, secret = self._keys()
        client = boto3.client(
            "s3",
            endpoint_url=self.cfg.s3_endpoint,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            region_name=self.cfg.s3_region,
            # A health probe: short timeouts and no retries, so a dead endpoint fails in seconds.
            config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1, "mode": "standard"}),
        )
        what = f"storage {self.root}"
        try:
            client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except (ClientError, BotoCoreError) as err:
            code = err.response.get("Error", {}).get("Code", "") if isinstance(err, ClientError) else ""
            mapped = translate_error(
                err,
                what,
                endpoint=self.cfg.s3_endpoint or "AWS S3",
                bucket=self.bucket,
                key_envs=(self.cfg.access_key_env, self.cfg.secret_key_env),
            )
            raise (mapped or StorageError(f"{what}: S3 error {code or type(err).__name__}")) from err
        self._checked = True

    # ----------------------------------------------------------------------------------- blobs
    def exists(self, uri: str) -> bool:
        """True when a file or a non-empty folder exists at uri."""
        fs, path = self._fs_for(uri)
        with self.guard(f"exists {uri}"):
            return bool(fs.exists(path))

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self._fs_for(uri)
        with self.guard(f"read {uri}"):
            return fs.cat_file(path)

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write a whole object (atomically: S3 PUTs are; locally a temp file is renamed into place)."""
        uri = self.resolve(uri)
        fs, path = self._fs_for(uri)
        with self.guard(f"write {uri}"):
            if _split_scheme(uri)[0] == "file":
                target = Path(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, target)
            else:
                fs.pipe_file(path, data)

    def open(self, uri: str, mode: str = "rb") -> Any:
        """An fsspec file object (streaming writes on S3 go up as multipart uploads)."""
        fs, path = self._fs_for(uri)
        with self.guard(f"open {uri}"):
            return fs.open(path, mode)

    def ls(self, uri: str) -> list[str]:
        """URIs of the direct children of a folder ([] if it does not exist)."""
        fs, path = self._fs_for(uri)
        scheme = _split_scheme(self.resolve(uri))[0]
        with self.guard(f"list {uri}"):
            try:
                names = fs.ls(path, detail=False)
            except FileNotFoundError:
                return []
        return sorted(f"s3://{n}" if scheme == "s3" else _file_uri(n) for n in names)

    def delete(self, uri: str, recursive: bool = True) -> None:
        """Remove a file or folder (no error if missing)."""
        fs, path = self._fs_for(uri)
        with self.guard(f"delete {uri}"):
            if fs.exists(path):
                fs.rm(path, recursive=recursive)

    # ----------------------------------------------------------------------------------- tables
    def db(self, check: bool = True) -> Any:
        """A LanceDB connection at `<root>/lance` (the store is checked once first, so bad keys fail fast)."""
        if check and not self._checked:
            self.check()
        if self._db is None:
            import lancedb

            with self.guard(f"connect {self.uri('lance')}"):
                self._db = lancedb.connect(self.uri("lance"), storage_options=self.storage_options() or None)
        return self._db

    # ---- folders: upload, download, a cached local copy ----------------------------------------------
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
