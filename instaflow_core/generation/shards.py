"""Shards: sorted prompt ids cut into contiguous ranges, and the worker that fills one shard exactly once.

Exactly-once across any number of writers (docs/exactly-once.md): the rows are merged on the table's declared
key (store/commits.py), which alone makes every triplet land once; a shard lease (store/claims.py) only keeps
two writers from solving the same shard twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from instaflow_core.errors import ConfigError, DataError
from instaflow_core.generation.triplets import FP16_MAX, SolverSpec, TripletJob, build_rows, sql_str
from instaflow_core.generation.writer import AsyncLatentWriter
from instaflow_core.store.claims import Claims
from instaflow_core.store.commits import has_declared_key
from instaflow_core.store.leases import Holding, LeaseLost

log = logging.getLogger("instaflow.generation.shards")


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


def parse_shard_slice(shard_slice: str | None) -> tuple[int, int] | None:
    """'i/N' -> (i, N): this run makes only the shards whose index % N == i (None: all shards)."""
    if not shard_slice:
        return None
    try:
        i, n = (int(x) for x in shard_slice.split("/"))
    except ValueError as err:
        raise ConfigError(f"--shard-slice {shard_slice!r}: use i/N, e.g. 0/8") from err
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard-slice {shard_slice!r}: need 0 <= i < N")
    return i, n


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
class ShardClaim:
    """Where a shard's lease and done marker live (`claims`), its name there, and what the lease records."""

    claims: Claims
    name: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ShardResult:
    shard: int
    expected: int  # triplets the shard should hold
    skipped: int  # already in the table before this run (or written meanwhile by another writer)
    written: int  # rows merged by this run
    seconds: float
    status: str = "done"  # done | already-done | done-by-other (another writer held the lease and finished)

    @property
    def rate(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def existing_ids(table: Any, where: str) -> set[str]:
    """triplet_ids in the table's LATEST version that match `where` (only the id column is read).

    A LanceDB table object keeps the version it last saw: checking out the latest first is what makes rows
    committed by other processes visible (S3 and local folders are read-after-write consistent).
    """
    table.checkout_latest()
    if table.count_rows() == 0:
        return set()
    got = table.search().where(where).select(["triplet_id"]).limit(None).to_arrow()
    return set(got.column("triplet_id").to_pylist())


@dataclass
class ShardWorker:
    """Makes the triplets of one shard that the table does not hold yet, merged in commits of whole batches.

    table     the pairs table (it must declare triplet_id its key: `PairGeneration.prepare_table`)
    solve     solve(prompts, seeds) -> X1 (B, C, h, w): `solvers.make_solver`
    noise     seeds -> X0, only needed when the table stores x0
    teacher / solver   the identity columns every row carries (and the ids are made of)
    write     write(table, rows): must merge on the table's declared key (`store.merge_rows`)
    rows_per_commit    None: a commit per batch; more: batches buffered into fewer, larger commits (what keeps a
                       table's commit rate low with many writers)
    async_write        `write` runs on a worker thread while the next batch is solved (generation/writer.py);
                       each fill waits for its last write to land before the shard is marked done
    on_batch  on_batch(done, total): progress in triplets
    """

    table: Any
    solve: Solver
    teacher: str
    solver: SolverSpec
    batch_size: int
    run_id: str
    write: Callable[[Any, pa.Table], Any]
    noise: NoiseFn | None = None
    rows_per_commit: int | None = None
    async_write: bool = False
    on_batch: Callable[[int, int], None] | None = None

    def run(
        self, jobs: Sequence[TripletJob], shard: int, done_filter: str, claim: ShardClaim | None = None
    ) -> ShardResult:
        """Fill the shard. `done_filter` selects this shard's rows in the table (by prompt-id range, independent of
        shard numbering), so a rerun skips ids already written. With a `claim`, the shard is solved under its
        lease: a shard another live writer holds is waited for (and its rows skipped), the ids are re-read at
        the latest version once the lease is ours, and the lease is checked before every commit."""
        t0 = time.perf_counter()
        table = self.table
        if not has_declared_key(table, "triplet_id"):
            raise DataError(
                f"table {table.name!r} has no declared key on triplet_id: prepare it first (prepare_table)"
            )
        if "x0" in table.schema.names and self.noise is None:
            raise ValueError("the table stores x0: give the worker noise=")
        total = len(jobs)
        tally = [0]  # rows written by this call, also when a lost lease interrupts a fill
        have = existing_ids(table, done_filter)
        if self.on_batch:
            self.on_batch(sum(j.triplet_id in have for j in jobs), total)

        def result(status: str, written: int) -> ShardResult:
            return ShardResult(shard, total, total - written, written, time.perf_counter() - t0, status)

        if claim is None or all(j.triplet_id in have for j in jobs):
            todo = [j for j in jobs if j.triplet_id not in have]
            self._fill(todo, shard=shard, done=total - len(todo), total=total, check=None, tally=tally)
            return ShardResult(
                shard, total, total - len(todo), tally[0], time.perf_counter() - t0,
                "done" if todo else "already-done",
            )  # fmt: skip
        while True:
            written = tally[0]
            lease = claim.claims.wait(claim.name, claim.info)
            if lease is None:  # another writer finished it while we waited: the table must say so too
                have = existing_ids(table, done_filter)
                if all(j.triplet_id in have for j in jobs):
                    return result("done-by-other" if not written else "done", written)
                log.warning("shard %d: done marker but rows missing (table replaced?): making them", shard)
                claim.claims.clear_done(claim.name)
                continue
            try:
                with Holding(lease):
                    have = existing_ids(table, done_filter)  # at the latest version, once the lease is ours
                    todo = [j for j in jobs if j.triplet_id not in have]
                    self._fill(
                        todo, shard=shard, done=total - len(todo), total=total, check=lease.check, tally=tally
                    )
                    claim.claims.mark_done(
                        claim.name, {"holder": lease.holder, "written": tally[0], "shard": shard}
                    )
            except (
                LeaseLost
            ) as err:  # only costs work: the rows merged so far stay, the new holder skips them
                log.warning("shard %d: %s after %d rows; waiting for the new holder", shard, err, tally[0])
                continue
            written = tally[0]
            return result("done" if written or total == 0 else "done-by-other", written)

    def _fill(
        self,
        todo: Sequence[TripletJob],
        *,
        shard: int,
        done: int,
        total: int,
        check: Callable[[], None] | None,
        tally: list[int],
    ) -> None:
        """Solve `todo` in batches and write them (after `check()`, when given), counting rows in `tally[0]`.

        With `async_write` the writes go through one AsyncLatentWriter (a drop-in for `write`: same calls, same
        order, one worker thread), closed here so the shard is marked done only once its last write has landed."""
        writer = AsyncLatentWriter(self.write) if self.async_write and todo else None
        write = writer or self.write
        schema = self.table.schema
        store_x0 = "x0" in schema.names
        pending: list[pa.Table] = []
        written = 0

        def flush() -> None:
            nonlocal written
            if not pending:
                return
            rows = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
            if check is not None:
                check()  # best-effort fencing: stop before committing once the lease may be someone else's
            write(self.table, rows)
            written += rows.num_rows
            tally[0] += rows.num_rows
            pending.clear()
            if self.on_batch:
                self.on_batch(done + written, total)

        try:
            for start in range(0, len(todo), self.batch_size):
                batch = todo[start : start + self.batch_size]
                seeds = [j.seed for j in batch]
                x1 = _to_numpy(self.solve([j.prompt for j in batch], seeds))
                if not np.isfinite(x1).all() or np.abs(x1).max(initial=0.0) > FP16_MAX:
                    raise DataError(
                        f"shard {shard}: the solver produced latents that are not finite in float16 "
                        "(check the teacher's dtype / mixed precision)"
                    )
                x0 = _to_numpy(self.noise(seeds)) if store_x0 and self.noise is not None else None
                pending.append(
                    build_rows(
                        batch, x1, schema=schema, teacher=self.teacher, solver=self.solver, shard=shard,
                        run_id=self.run_id, x0=x0,
                    )
                )  # fmt: skip
                if sum(t.num_rows for t in pending) >= (self.rows_per_commit or 1):
                    flush()
            flush()
        finally:
            if writer is not None:
                writer.close()  # waits for the last write; a failed one raises here
