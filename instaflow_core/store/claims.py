"""Claims: the leases and done markers of one job under `<root>/coord/<...>/`, and the wait-or-take loop.

    claims = Claims(store, "triplets", plan_key, ttl=60)
    lease = claims.wait(name, info)     # None: someone marked it done meanwhile; else we hold the lease
    with Holding(lease): ... lease.check() before each commit ...; claims.mark_done(name, {...})

Done markers are hints that let a waiter stop waiting; the table stays the truth (a shard worker re-reads its
ids at the latest version before solving anything).
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

from instaflow_core.store.leases import Lease, LocalLease, S3Lease
from instaflow_core.store.uri import Store

log = logging.getLogger("instaflow.store.claims")


def s3_client(store: Store) -> Any:
    """A boto3 S3 client for the store's endpoint (keys from the configured environment variables)."""
    import boto3
    from botocore.config import Config

    key, secret = store._keys()
    return boto3.client(
        "s3",
        endpoint_url=store.cfg.s3_endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name=store.cfg.s3_region,
        config=Config(connect_timeout=5, read_timeout=20, retries={"max_attempts": 4, "mode": "standard"}),
    )


class Claims:
    """Leases (`lease/<name>`) and done markers (`done/<name>.json`) under `<root>/coord/<parts...>`."""

    def __init__(self, store: Store, *parts: str, ttl: float = 60.0, poll_s: float = 2.0) -> None:
        self.store = store
        self.base = store.uri("coord", *parts)
        self.ttl, self.poll_s = float(ttl), float(poll_s)
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}  # the client holds keys and sockets

    def _s3(self) -> Any:
        if self._client is None:
            self._client = s3_client(self.store)
        return self._client

    def lease(self, name: str, info: dict[str, Any] | None = None) -> Lease:
        """A fresh (not yet acquired) lease object for `name`."""
        uri = f"{self.base}/lease/{name}"
        if self.store.is_s3:
            key = uri[len(f"s3://{self.store.bucket}/") :] + ".json"
            return S3Lease(self._s3(), str(self.store.bucket), key, ttl=self.ttl, info=dict(info or {}))
        return LocalLease(Path(self.store.local_path(uri + ".lock")), ttl=self.ttl, info=dict(info or {}))

    def done(self, name: str) -> dict[str, Any] | None:
        """The done marker's payload, or None."""
        uri = f"{self.base}/done/{name}.json"
        with self.store.guard(f"read done marker {name}"):
            if not self.store.exists(uri):
                return None
            try:
                return json.loads(self.store.read_bytes(uri) or b"{}")
            except (FileNotFoundError, ValueError):
                return None

    def mark_done(self, name: str, payload: dict[str, Any]) -> None:
        """Write (or overwrite: markers are idempotent) the done marker of `name`."""
        self.store.write_bytes(
            f"{self.base}/done/{name}.json", json.dumps({**payload, "at": time.time()}).encode()
        )

    def clear_done(self, name: str) -> None:
        self.store.delete(f"{self.base}/done/{name}.json", recursive=False)

    def wait(
        self, name: str, info: dict[str, Any] | None = None, timeout_s: float | None = None
    ) -> Lease | None:
        """Acquire `name`'s lease, waiting while a live holder has it; None once its done marker appears.

        A holder that stops heartbeating (killed, partitioned) loses the lease after `ttl` seconds of the
        server's clock, or at once when it provably died (store/leases.py). `timeout_s` bounds the wait
        (TimeoutError), None waits as long as the holder stays alive.
        """
        t0 = time.monotonic()
        said = -1e9
        while True:
            if self.done(name) is not None:
                return None
            lease = self.lease(name, info)
            with self.store.guard(f"acquire lease {name}"):
                if lease.acquire():
                    return lease
                cur = lease.current() or {}
            waited = time.monotonic() - t0
            if timeout_s is not None and waited > timeout_s:
                raise TimeoutError(f"{name} is still held by {cur.get('holder', '?')} after {waited:.0f}s")
            if waited - said >= 60:
                said = waited
                log.warning(
                    "%s is being made by %s (last heartbeat %.0fs ago): waiting for it to finish or to expire "
                    "(%.0fs without heartbeat)", name, cur.get("holder", "another run"), cur.get("age", 0.0), self.ttl,
                )  # fmt: skip
            time.sleep(self.poll_s * random.uniform(0.5, 1.5))
