"""Writing a shard's latent rows while the next batch computes.

`AsyncLatentWriter(write)` is a drop-in for the shard worker's `write(table, rows)` callable: each call queues
the write on one worker thread and returns, so the GPU solves batch k+1 while batch k's rows (copied to the host
and checked by the shard worker) are merged into the table, a local disk commit or an S3 round trip that
would otherwise leave the GPU idle once per batch. Writes run one at a time, in order, each exactly as the
wrapped callable would have run it; at most `max_pending` wait (then a call blocks: `wait_s` adds up that
back-pressure). The first failed write is raised by the next call or by `flush()`, and nothing queued after
it is written, so a failure never leaves later batches committed ahead of an earlier one.

`flush()` waits for everything queued (the shard worker calls it before reporting the shard done);
`close()` flushes and stops the thread. If the caller dies without either, the queued writes still finish
and the thread exits once the writer is garbage (concurrent.futures' semantics).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class AsyncLatentWriter:
    """`write(table, rows)` on a worker thread, in submission order, at most `max_pending` queued."""

    def __init__(self, write: Callable[[Any, Any], Any], *, max_pending: int = 2) -> None:
        self.write = write
        self.max_pending = max(1, max_pending)
        self.submitted = self.written = 0
        self.wait_s = 0.0  # caller time blocked on a full queue or in flush
        self.write_s = 0.0  # worker time inside `write`
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="latent-writer")
        self._pending: collections.deque[Future] = collections.deque()
        self._failed: BaseException | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _run(self, table: Any, rows: Any) -> None:
        if self._failed is not None:  # an earlier write failed: write nothing after it
            return
        t0 = time.perf_counter()
        try:
            self.write(table, rows)
        except BaseException as err:
            self._failed = err
            raise
        with self._lock:
            self.write_s += time.perf_counter() - t0
            self.written += 1

    def _reap(self, keep: int) -> None:
        """Wait until at most `keep` writes are pending; raise the first failure."""
        t0 = time.perf_counter()
        try:
            while len(self._pending) > keep:
                self._pending.popleft().result()
        finally:
            self.wait_s += time.perf_counter() - t0
        if self._failed is not None:
            raise self._failed

    def __call__(self, table: Any, rows: Any) -> None:
        if self._closed:
            raise RuntimeError("AsyncLatentWriter is closed")
        self._reap(self.max_pending - 1)
        self._pending.append(self._pool.submit(self._run, table, rows))
        self.submitted += 1

    def flush(self) -> None:
        """Wait for every queued write; raise the first failure."""
        self._reap(0)

    def close(self) -> None:
        """Flush, then stop the worker thread (idempotent)."""
        try:
            self.flush()
        finally:
            self._closed = True
            self._pool.shutdown(wait=True)

    def __enter__(self) -> AsyncLatentWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
