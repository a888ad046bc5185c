"""Shards: sorted prompt ids cut into contiguous ranges, and the worker that fills one shard exactly once."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from instaflow_core.errors import DataError
from instaflow_core.generation.triplets import FP16_MAX, SolverSpec, TripletJob, build_rows, sql_str
from instaflow_core.generation.writer import AsyncLatentWriter


class ShardSpec(BaseModel):
    """A contiguous range of sorted prompt ids: `first_id <= prompt_id <= last_id` within the planned set."""

    model_config = ConfigDict(frozen=True)

    index: int
    count: int  # shards in the plan
    first_id: str
    last_id: str
    n_prompts: int

    def prompt_filter(self) -> str:
        return f"prompt_id >= {sql_str(self.first_id)} AND prompt_id <= {sql_str(self.last_id)}"


def plan_shards(prompt_ids: pa.Array | pa.ChunkedArray | Sequence[str], shard_size: int) -> list[ShardSpec]:
    """Sorted unique prompt ids cut into shards of `shard_size` (the last one shorter): deterministic."""
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    arr = (
        prompt_ids
        if isinstance(prompt_ids, (pa.Array, pa.ChunkedArray))
        else pa.array(list(prompt_ids), pa.string())
    )
    ids = pc.unique(arr)
    ids = ids.take(pc.sort_indices(ids))
    n = len(ids)
    count = (n + shard_size - 1) // shard_size
    shards = []
    for i in range(count):
        lo, hi = i * shard_size, min(n, (i + 1) * shard_size) - 1
        shards.append(
            ShardSpec(
                index=i, count=count, first_id=ids[lo].as_py(), last_id=ids[hi].as_py(), n_prompts=hi - lo + 1
            )
        )
    return shards


def select_prompt_ids(ids: pa.Array | pa.ChunkedArray, max_prompts: int | None) -> pa.Array:
    """Sorted unique ids, truncated to the first `max_prompts` (deterministic: same set on every rerun)."""
    ids = pc.unique(ids)
    ids = ids.take(pc.sort_indices(ids))
    if max_prompts is not None:
        ids = ids.slice(0, max_prompts)
    return ids


# solve(prompts, seeds) -> X1 as a (B, C, h, w) tensor or array. Built by the caller from a SolverSpec and a model.
Solver = Callable[[list[str], list[int]], Any]


NoiseFn = Callable[[list[int]], Any]  # seeds -> X0 (B, C, h, w), only needed when X0 is stored


@dataclass
class ShardResult:
    shard: int
    expected: int  # triplets the shard should hold
    skipped: int  # already in the table before this run
    written: int  # rows merged by this run
    seconds: float

    @property
    def rate(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def existing_ids(table: Any, where: str) -> set[str]:
    """triplet_ids already in a Lance/LanceDB table that match `where` (only the id column is read)."""
    if table.count_rows() == 0:
        return set()
    got = table.search().where(where).select(["triplet_id"]).limit(None).to_arrow()
    return set(got.column("triplet_id").to_pylist())


def run_shard(
    *,
    jobs: Sequence[TripletJob],
    table: Any,
    solve: Solver,
    batch_size: int,
    teacher: str,
    solver: SolverSpec,
    shard: int,
    run_id: str,
    done_filter: str,
    write: Callable[[Any, pa.Table], Any],
    noise: NoiseFn | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    async_write: bool = False,
) -> ShardResult:
    """Make the triplets of one shard that the table does not hold yet, one merged commit per batch.

    `done_filter` selects this shard's rows in `table` (by prompt-id range, independent of shard numbering) so a
    rerun skips ids already written; `write(table, rows)` must merge on triplet_id. `on_batch(done, total)`
    reports progress in triplets. X0 is stored only when the table has an x0 column and `noise` is given.
    `async_write`: `write` runs on a worker thread while the next batch is solved (generation/writer.py); the
    shard is reported done once its last write has landed.
    """
    t0 = time.perf_counter()
    schema = table.schema
    have = existing_ids(table, done_filter)
    todo = [j for j in jobs if j.triplet_id not in have]
    skipped = len(jobs) - len(todo)
    store_x0 = "x0" in schema.names
    if store_x0 and noise is None:
        raise ValueError("the table stores x0: pass noise=")
    written = 0
    if async_write:  # a drop-in for `write`: same calls, same order, on one worker thread
        write = AsyncLatentWriter(write)
    if on_batch:
        on_batch(skipped, len(jobs))
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        prompts = [j.prompt for j in batch]
        seeds = [j.seed for j in batch]
        x1 = _to_numpy(solve(prompts, seeds))
        if not np.isfinite(x1).all() or np.abs(x1).max(initial=0.0) > FP16_MAX:
            raise DataError(
                f"shard {shard}: the solver produced latents that are not finite in float16 "
                "(check the teacher's dtype / mixed precision)"
            )
        x0 = _to_numpy(noise(seeds)) if store_x0 and noise is not None else None
        rows = build_rows(
            batch, x1, schema=schema, teacher=teacher, solver=solver, shard=shard, run_id=run_id, x0=x0
        )
        write(table, rows)
        written += len(batch)
        if on_batch:
            on_batch(skipped + written, len(jobs))
    if async_write:
        write.close()  # waits for the last write; a failed one raises here
    return ShardResult(shard, len(jobs), skipped, written, time.perf_counter() - t0)
