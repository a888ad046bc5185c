"""Leases and done markers in the store: one holder per named piece of work (a shard, a table's finish step).

They save duplicate *work*; correctness never depends on them (store/commits.py makes the rows exactly-once
whatever the leases do; docs/exactly-once.md).

S3 (`S3Lease`): a lease is ONE object `<prefix>/lease/<name>.json`, changed only by conditional requests, so
S3 itself arbitrates:

| step | request | outcome |
|---|---|---|
| acquire | PUT If-None-Match: * | one of any number of racing creators gets 200 |
| take over an expired lease | PUT If-Match: <its ETag> | one taker wins, the others get 412 |
| heartbeat | PUT If-Match: <my ETag> | 412: someone took it over, the lease is lost |
| release | DELETE If-Match: <my ETag> | never deletes a lease someone else holds now |

Expiry is judged on the server's clock only (the response `Date` minus the object's `LastModified`, +1 s for
its resolution), so client clocks may be skewed. A lease whose holder is provably gone is taken over at once:
the same machine and a pid that no longer runs, or the same Prefect task run (Ray re-runs a task whose worker
died under the same task run id). boto3 is used because s3fs cannot send If-Match.

Local folders (`LocalLease`): an exclusive `flock` on `<prefix>/lease/<name>.lock`. The kernel drops it when
the holder dies, so there is nothing to expire; it never goes stale.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Protocol

from instaflow_core.errors import StorageError


class LeaseLost(StorageError):
    """We held the lease but may not any more (taken over, or no heartbeat got through in time)."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return ""


def holder_id() -> str:
    """host:boot:pid:random, unique per lease object (a retried attempt in the same process gets a new one)."""
    return f"{socket.gethostname()}:{_boot_id()}:{os.getpid()}:{os.urandom(4).hex()}"


def _holder_is_dead(holder: str) -> bool:
    """True only when `holder` ran on this machine (same host and boot) and its pid is gone."""
    parts = str(holder).split(":")
    if len(parts) != 4 or parts[0] != socket.gethostname() or parts[1] != _boot_id() or not parts[1]:
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


class Lease(Protocol):
    """What a shard worker needs from a lease."""

    key: str
    holder: str
    info: dict[str, Any]

    def acquire(self) -> bool: ...
    def heartbeat(self) -> None: ...
    def check(self) -> None: ...
    def release(self) -> None: ...
    def current(self) -> dict[str, Any] | None: ...


# ------------------------------------------------------------------------------------------------ S3
def _code(err: Any) -> str:
    return str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))


def _status(err: Any) -> int:
    return int(getattr(err, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _lost_race(err: Any) -> bool:
    # 412 PreconditionFailed; 409 ConditionalRequestConflict (AWS: a racing conditional write in flight)
    return _status(err) in (409, 412) or _code(err) in ("PreconditionFailed", "ConditionalRequestConflict")


def _missing(err: Any) -> bool:
    return _status(err) == 404 or _code(err) in ("NoSuchKey", "404", "NotFound")


@dataclass
class S3Lease:
    """A named lease on S3. `ttl` seconds without a heartbeat make it free; `hold()` heartbeats at ttl/4."""

    client: Any
    bucket: str
    key: str
    ttl: float = 60.0
    holder: str = field(default_factory=holder_id)
    info: dict[str, Any] = field(default_factory=dict)
    etag: str | None = None
    lost: bool = False
    last_ok: float = 0.0  # monotonic time of our last successful acquire/heartbeat
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _put(self, **cond: str) -> str:
        body = json.dumps({"holder": self.holder, "ttl": self.ttl, "at": time.time(), **self.info}).encode()
        return str(self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **cond)["ETag"])

    def _won(self, etag: str) -> bool:
        self.etag, self.lost, self.last_ok = etag, False, time.monotonic()
        return True

    def current(self) -> dict[str, Any] | None:
        """The lease object now: its body plus "etag" and "age" (server seconds since its last write)."""
        from botocore.exceptions import ClientError

        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as err:
            if _missing(err):
                return None
            raise
        body = json.loads(r["Body"].read() or b"{}")
        server_now = parsedate_to_datetime(r["ResponseMetadata"]["HTTPHeaders"]["date"])
        return {**body, "etag": str(r["ETag"]), "age": (server_now - r["LastModified"]).total_seconds()}

    def _stale(self, cur: dict[str, Any]) -> bool:
        """Expired on the server's clock, or provably abandoned (dead pid here, or our own task run)."""
        if cur["age"] > float(cur.get("ttl", self.ttl)) + 1.0:  # +1 s: LastModified has 1 s resolution
            return True
        mine = self.info.get("task_run")
        return _holder_is_dead(cur.get("holder", "")) or bool(mine and cur.get("task_run") == mine)

    def acquire(self) -> bool:
        """Take the lease if it is free, expired or abandoned; True when we hold it now."""
        from botocore.exceptions import ClientError

        with self._lock:
            if self.etag is not None and not self.lost:
                return True
            for _ in range(3):  # create, or take over; a release racing us means one more round
                try:
                    return self._won(self._put(IfNoneMatch="*"))
                except ClientError as err:
                    if not _lost_race(err):
                        raise
                cur = self.current()
                if cur is None:
                    continue
                if cur.get("holder") == self.holder:  # ours (a lost response)
                    return self._won(cur["etag"])
                if not self._stale(cur):
                    return False
                try:
                    return self._won(self._put(IfMatch=cur["etag"]))
                except ClientError as err:
                    if _lost_race(err) or _missing(err):
                        return False
                    raise
            return False

    def heartbeat(self) -> None:
        """Extend our lease; LeaseLost when someone took it over."""
        from botocore.exceptions import ClientError

        with self._lock:
            if self.etag is None or self.lost:
                raise LeaseLost(f"lease {self.key} is not held by {self.holder}")
            try:
                self.etag = self._put(IfMatch=self.etag)
                self.last_ok = time.monotonic()
            except ClientError as err:
                if _lost_race(err) or _missing(err):
                    self.lost = True
                    raise LeaseLost(f"lease {self.key} was taken over from {self.holder}") from None
                raise

    def check(self, margin: float = 0.75) -> None:
        """Before a commit: LeaseLost when the lease is gone, or may soon be (no heartbeat got through for
        `margin * ttl` seconds of our own clock: S3 unreachable, or this process stalled)."""
        if self.lost or self.etag is None:
            raise LeaseLost(f"lease {self.key} is no longer held by {self.holder}")
        if time.monotonic() - self.last_ok > margin * self.ttl:
            raise LeaseLost(f"lease {self.key}: no heartbeat for {time.monotonic() - self.last_ok:.0f}s")

    def release(self) -> None:
        """Give the lease up, only if it is still ours (If-Match on our ETag)."""
        from botocore.exceptions import ClientError

        with self._lock:
            if self.etag is None:
                return
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
            except ClientError as err:
                if not (_lost_race(err) or _missing(err)):
                    raise
            finally:
                self.etag = None


# --------------------------------------------------------------------------------------------- local
@dataclass
class LocalLease:
    """A named lease on a local folder: an exclusive, non-blocking flock held by an open file."""

    path: Path
    ttl: float = 60.0  # unused: the kernel releases the lock of a dead holder
    holder: str = field(default_factory=holder_id)
    info: dict[str, Any] = field(default_factory=dict)
    _fd: int | None = None

    @property
    def key(self) -> str:
        return str(self.path)

    def acquire(self) -> bool:
        import fcntl

        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"holder": self.holder, "at": time.time(), **self.info}).encode())
        self._fd = fd
        return True

    def current(self) -> dict[str, Any] | None:
        try:
            return {
                **json.loads(self.path.read_text() or "{}"),
                "age": time.time() - self.path.stat().st_mtime,
            }
        except (OSError, ValueError):
            return None

    def heartbeat(self) -> None:
        if self._fd is None:
            raise LeaseLost(f"lease {self.key} is not held by {self.holder}")
        os.utime(self.path)

    def check(self) -> None:
        if self._fd is None:
            raise LeaseLost(f"lease {self.key} is not held by {self.holder}")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (deleting it would race acquirers)
            self._fd = None


# --------------------------------------------------------------------------------------------- holding
class Holding:
    """`with Holding(lease):` heartbeats every `interval` (ttl/4) seconds in a daemon thread, releases at exit.

    The lease must be acquired. Inside, call `lease.check()` before each commit.
    """

    def __init__(self, lease: Lease, interval: float | None = None) -> None:
        self.lease = lease
        self.interval = interval or max(0.5, float(getattr(lease, "ttl", 60.0)) / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"lease-{lease.key[-40:]}")

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.lease.heartbeat()
            except LeaseLost:
                return
            except Exception:  # noqa: BLE001 - a transient S3 error: try again next interval; check() notices
                continue

    def __enter__(self) -> Lease:
        self._thread.start()
        return self.lease

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self.lease.release()
        except Exception:  # noqa: BLE001 - an unreleased lease only expires later
            pass
