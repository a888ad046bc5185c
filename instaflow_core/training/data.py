"""Feeding micro-batches to the loop, and finding the same data position again on resume.

`train` accepts two kinds of batch source:

* a factory `batches(req: BatchRequest) -> Iterable[dict]` (preferred). It is called at the start of each
  stage, and on resume mid-stage, and must yield THIS rank's micro-batches of `req.micro_batch_size` rows
  for stage `req.stage_index`, beginning after the first `req.start` of them (so a deterministic loader
  can seek instead of replaying). Sharding by `req.rank` / `req.world_size` is the factory's job.
* a plain iterable of micro-batch dicts (a list, a DataLoader). It is one stream over all stages, read
  round-robin across processes (rank r keeps items r, r+W, ...), re-iterated when it ends (epochs), and on
  resume the consumed items are drawn and dropped. Fine for small data; use a factory for real data.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from instaflow_core.config import TrainStageConfig
from instaflow_core.errors import DataError
from instaflow_core.training.setup import StageSpan


@dataclass(frozen=True)
class BatchRequest:
    """What a batch factory is asked for."""

    stage_index: int
    stage: TrainStageConfig
    micro_batch_size: int  # rows per yielded batch, on this rank
    start: int  # micro-batches of this stage this rank already consumed: skip them
    rank: int
    world_size: int
    seed: int  # TrainConfig.seed, for shuffles


BatchSource = Iterable[dict] | Callable[[BatchRequest], Iterable[dict]]


def is_factory(batches: Any) -> bool:
    return callable(batches) and not hasattr(batches, "__iter__")


def batch_rows(batch: dict) -> int | None:
    """Rows in a micro-batch: the length of its first tensor (or list) value."""
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            return v.shape[0]
        if isinstance(v, (list, tuple)):
            return len(v)
    return None


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list) and obj and isinstance(obj[0], torch.Tensor):
        return [to_device(v, device) for v in obj]
    return obj


class BatchStream:
    """This rank's micro-batches, positioned by global optimizer step; times how long it waits on data."""

    def __init__(self, batches: BatchSource, spans: list[StageSpan], rank: int, world_size: int, seed: int):
        self.batches, self.spans = batches, spans
        self.rank, self.world, self.seed = rank, world_size, seed
        self.factory = is_factory(batches)
        self._it: Iterator[dict] | None = None
        self._span: StageSpan | None = None
        self._drawn = 0  # micro-batches drawn in the current stage (factory mode)
        self.wait_s = 0.0

    # ------------------------------------------------------------------ positioning
    def seek(self, global_step: int) -> None:
        """Position the stream at the first micro-batch of optimizer step `global_step` (0-based)."""
        span = next(s for s in self.spans if s.start <= global_step < s.end)
        done_in_stage = (global_step - span.start) * span.accumulation
        if self.factory:
            self._open_stage(span, done_in_stage)
            return
        # one stream over all stages: every rank draws all items (round-robin), so skip the global count
        consumed = 0
        for s in self.spans:
            if s.end <= global_step:
                consumed += (s.end - s.start) * s.accumulation * self.world
        consumed += done_in_stage * self.world
        self._span = span
        self._it = iter(self.batches)
        for _ in range(consumed):
            self._next_item()

    def _open_stage(self, span: StageSpan, start: int) -> None:
        req = BatchRequest(
            stage_index=span.index,
            stage=span.stage,
            micro_batch_size=span.micro_batch_size,
            start=start,
            rank=self.rank,
            world_size=self.world,
            seed=self.seed,
        )
        self._it, self._span, self._drawn = iter(self.batches(req)), span, start

    # ------------------------------------------------------------------ reading
    def _next_item(self) -> dict:
        try:
            return next(self._it)
        except StopIteration:
            pass
        self._it = iter(self.batches)  # next epoch of a re-iterable source
        try:
            return next(self._it)
        except StopIteration as err:
            raise DataError(
                "the batch iterable is empty or a one-shot iterator that ran out: pass a list/DataLoader "
                "or a factory batches(req)"
            ) from err

    def next(self, span: StageSpan, step: int) -> dict:
        """The next micro-batch of this rank for optimizer step `step` of stage `span`."""
        t0 = time.perf_counter()
        if self.factory:
            if self._span is None or self._span.index != span.index:
                self._open_stage(span, 0)
            try:
                batch = next(self._it)
            except StopIteration as err:
                raise DataError(
                    f"batches for stage {span.index} ran out after {self._drawn} micro-batches "
                    f"(at step {step + 1}); the factory must yield at least "
                    f"{(span.end - span.start) * span.accumulation} per rank"
                ) from err
            self._drawn += 1
        else:
            batch = None
            for r in range(self.world):
                item = self._next_item()
                if r == self.rank:
                    batch = item
        self.wait_s += time.perf_counter() - t0
        if not isinstance(batch, dict):
            raise DataError(f"a batch must be a dict of tensors, got {type(batch).__name__}")
        rows = batch_rows(batch)
        if rows is not None and rows != span.micro_batch_size:
            raise DataError(
                f"stage {span.index} expects micro-batches of {span.micro_batch_size} rows per process "
                f"(batch_size {span.stage.batch_size} / accumulation {span.accumulation} / {self.world} "
                f"processes), got {rows}"
            )
        return batch
