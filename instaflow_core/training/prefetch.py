"""The pinned, prefetching loader: the loop's micro-batches read, pinned and copied to the GPU ahead of the step.

`PinnedPrefetcher` iterates any batch iterator on a thread, `depth` batches ahead. On CUDA each tensor is
pinned (page-locked, so the copy is a real asynchronous DMA; `.to(non_blocking=True)` from pageable memory is
a synchronous copy in disguise) and uploaded on a side stream; the consumer's stream waits on that copy's event
when it takes the batch, so neither the host nor the compute stream ever blocks on a transfer.

`DeviceFeed` puts one in front of the loop's `BatchStream`: it draws the micro-batches in exactly the order the
loop will ask for them (stage by stage, step by step, `accumulation` per step), so data order, resume and the
rank's shard are unchanged; with depth 0 it is the old inline path (read, then `to_device`), bit for bit.
The batch source runs on the prefetch thread: it must draw from its own generators, not the global RNG (the
project's `triplet_batches` does), or resumed runs would no longer reproduce the uninterrupted one.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from instaflow_core.training.data import BatchStream, to_device
from instaflow_core.training.setup import StageSpan


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _tensors(obj: Any) -> list[Tensor]:
    out: list[Tensor] = []
    _map_tensors(obj, lambda t: out.append(t) or t)
    return out


class PinnedPrefetcher:
    """Iterates `batches` on a thread, `depth` ahead of the caller, uploading tensors to `device` on CUDA.

    Items are dicts / lists / tensors (non-tensor values pass through). An error in the source is raised in
    the caller's thread at the item where it happened (and again on later calls). `wait_s` is the caller's
    time spent waiting for a batch (the loop's data-wait share), `taken` the number of batches handed out.
    """

    def __init__(self, batches: Iterable[Any], device: torch.device | str, *, depth: int = 2) -> None:
        self.device = torch.device(device)
        self.wait_s, self.taken = 0.0, 0
        self._cuda = self.device.type == "cuda"
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._stream = torch.cuda.Stream(device=self.device) if self._cuda else None
        self._thread = threading.Thread(target=self._run, args=(iter(batches),), name="prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _upload(self, t: Tensor) -> Tensor:
        return (t if t.is_cuda else t.pin_memory()).to(self.device, non_blocking=True)

    def _run(self, it: Iterator[Any]) -> None:
        try:
            for batch in it:
                event = None
                if self._cuda:
                    with torch.cuda.stream(self._stream):
                        batch = _map_tensors(batch, self._upload)
                        event = torch.cuda.Event()
                        event.record(self._stream)
                if not self._put((batch, event, None)):
                    return
            self._put((None, None, StopIteration()))
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            self._put((None, None, err))

    def __iter__(self) -> PinnedPrefetcher:
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        batch, event, err = self._q.get()
        self.wait_s += time.perf_counter() - t0
        if err is not None:
            self._q.put((None, None, err))  # keep raising on later calls
            raise err
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)  # the compute stream waits for the copy, the host does not
            for t in _tensors(batch):
                t.record_stream(stream)  # the allocator must not reuse the memory before compute is done
        self.taken += 1
        return batch

    def close(self) -> None:
        """Stop the reader (it may be blocked on a full queue) and wait for it."""
        self._stop.set()
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)


class DeviceFeed:
    """The loop's micro-batches on the training device: `next(span, step)` and `wait_s`, like BatchStream.

    depth 0: read inline and `to_device` (the old path). depth > 0: a PinnedPrefetcher over the exact
    sequence of (stage, step, micro-batch) from `first_step` to `end_step`, so nothing is read past the end.
    """

    def __init__(
        self,
        stream: BatchStream,
        spans: list[StageSpan],
        first_step: int,
        end_step: int,
        device: torch.device,
        depth: int = 0,
    ) -> None:
        self.stream, self.device, self.depth = stream, device, depth
        self._pf: PinnedPrefetcher | None = None
        if depth > 0:
            self._pf = PinnedPrefetcher(self._planned(spans, first_step, end_step), device, depth=depth)

    def _planned(self, spans: list[StageSpan], first: int, end: int) -> Iterator[tuple[int, int, dict]]:
        for step in range(first, end):
            span = next(s for s in spans if s.start <= step < s.end)
            for _ in range(span.accumulation):
                yield span.index, step, self.stream.next(span, step)

    @property
    def wait_s(self) -> float:
        return self._pf.wait_s if self._pf is not None else self.stream.wait_s

    def next(self, span: StageSpan, step: int) -> dict:
        if self._pf is None:
            return to_device(self.stream.next(span, step), self.device)
        index, at, batch = next(self._pf)
        if (index, at) != (span.index, step):  # the loop and the plan disagree: a bug, not a user error
            raise RuntimeError(
                f"prefetched stage {index} step {at}, the loop asked for {span.index} step {step}"
            )
        return batch

    def close(self) -> None:
        if self._pf is not None:
            self._pf.close()
