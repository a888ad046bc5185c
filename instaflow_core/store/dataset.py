"""A torch IterableDataset over one version of a triplets table (local folder or S3), for reflow / distillation.

Reading plan, per epoch:
- the table's row positions (those matching `where`; by default the teacher + solver that wrote the version,
  from the table metadata), in (shard, seed) order whatever order the writers committed in, are cut into
  blocks of `block_rows` rows;
- blocks are shuffled with `seed + epoch`, then dealt round-robin to `world_size * num_workers` readers, so each
  (rank, DataLoader worker) reads a disjoint share and together they cover every row once;
- each reader takes windows of about `block_rows * window_blocks` rows (a whole number of batches) with one
  Lance `take` of sorted positions (large, mostly sequential reads, also on S3), shuffles the rows inside the
  window and builds its batches. `threads` reader threads build the next windows while the current one is
  consumed (prefetching); Lance, randn and the float conversion release the GIL, so threads scale without
  DataLoader worker processes, their start-up and their inter-process copies.

X0 is regenerated from each row's seed exactly as `teacher.noise_from_seeds` draws it (CPU generators: identical on any
device), unless the table stores x0 and `regenerate_noise=False`.

Fork safety: Lance starts a thread pool when a dataset is opened and is not fork-safe. Nothing is opened in
`__init__`; each process opens its own handle on first use (a handle opened before a fork is dropped). Use
`make_loader`, which starts DataLoader workers with `spawn`, when num_workers > 0.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from instaflow_core.config import StorageConfig
from instaflow_core.errors import DataError
from instaflow_core.rectified_flow import noise_from_seeds
from instaflow_core.refs import TableRef
from instaflow_core.store.tables import from_tensor_column
from instaflow_core.store.uri import Store

AUTO = "auto"


def _open_lance(ref: TableRef, storage_cfg: StorageConfig) -> Any:
    """The Lance dataset of a TableRef at its version (a fresh handle: call after any fork)."""
    import lance

    store = Store(storage_cfg)
    uri = f"{store.resolve(ref.db_uri).rstrip('/')}/{ref.table}.lance"
    with store.guard(f"open {ref.key()}"):
        try:
            return lance.dataset(
                uri, version=int(ref.version), storage_options=store.storage_options() or None
            )
        except ValueError as err:  # lance reports a missing dataset / version as ValueError
            raise DataError(f"cannot open triplets table {ref.key()}: {str(err).splitlines()[0]}") from err


def default_filter(ds: Any) -> str | None:
    """The filter recorded in the table metadata by the run that wrote this version (teacher + solver)."""
    meta = ds.metadata or {}
    return meta.get("filter") or None


# The plan's row order is canonical, not the table's: shards commit in whatever order their writers finish (and
# a resumed shard appends late), so in table order the same seed would give other batches on every rebuild of
# the same triplets. Sorting by (shard, seed) fixes the order by content alone; rows of a shard are written
# together, so blocks of it still read mostly sequential ranges. The noise seed is a 63-bit hash of (base seed,
# prompt, index), so within a shard this order mixes the shard's prompts (a block is not one prompt's rows). Not
# by triplet_id: it hashes the teacher's name, and a trained teacher's name is its model key, which holds the
# store's location, so the same rebuild in another folder or bucket would read its batches in another order.
_ORDER_KEYS = ("shard", "seed", "prompt_id", "triplet_id")  # the last two only break ties


def _positions(ds: Any, where: str | None) -> np.ndarray:
    """Row positions (0..count-1, the offsets `take` accepts) of the rows matching `where`, in canonical
    (shard, seed) order."""
    import pyarrow.compute as pc

    keys = [k for k in _ORDER_KEYS if k in ds.schema.names]
    cols = {k: k for k in keys}
    if where is not None:
        cols["m"] = f"({where})"  # a projected boolean column keeps every row in order: positions are offsets
    if not cols:
        return np.arange(ds.count_rows(), dtype=np.int64)
    table = ds.to_table(columns=cols)
    pos = np.arange(table.num_rows, dtype=np.int64)
    if where is not None:
        keep = table.column("m").to_numpy(zero_copy_only=False).astype(bool)
        pos, table = pos[keep], table.filter(pa.array(keep))
    if not keys:
        return pos
    order = pc.sort_indices(table, sort_keys=[(k, "ascending") for k in keys], null_placement="at_end")
    return pos[order.to_numpy()]


def latent_shape_of(ds: Any) -> tuple[int, ...]:
    """(C, h, w) of the x1 column, from the first row's latent_shape (falls back to the field metadata)."""
    if ds.count_rows() == 0:
        raise DataError(f"triplets table {ds.uri} is empty")
    first = ds.take([0], columns=["latent_shape"]).column("latent_shape")[0].as_py()
    if first:
        return tuple(int(s) for s in first)
    from instaflow_core.store.tables import tensor_shape

    return tensor_shape(ds.schema.field("x1"))


def table_latents(ref: TableRef, storage_cfg: StorageConfig) -> tuple[tuple[int, ...], int | None]:
    """(latent shape, resolution in px or None) of a triplets table version: the per-row shape and the
    `resolution` its writer recorded in the table metadata (tables written before it was recorded: None)."""
    ds = _open_lance(ref, storage_cfg)
    res = (ds.metadata or {}).get("resolution")
    return latent_shape_of(ds), (int(res) if res else None)


def _f32(column: pa.ChunkedArray | pa.Array, shape: Sequence[int]) -> torch.Tensor:
    """A float16 tensor column -> (B, *shape) float32 (torch's half->float is ~8x numpy's astype)."""
    with warnings.catch_warnings():
        # Arrow's buffers are read-only; .float() copies, so the tensor never aliases them for writing.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(from_tensor_column(column, shape)).float()


class TripletDataset(IterableDataset):
    """Batches `{"x0": (B,4,h,w) f32, "x1": (B,4,h,w) f32, "prompt": list[str], "triplet_id": list[str],
    "seed": list[int]}`.

    Use with `DataLoader(ds, batch_size=None)` (the dataset batches) or `make_loader(ds, num_workers)`.
    Call `set_epoch(e)` between epochs for a new shuffle. `where=AUTO` selects the rows of the teacher + solver
    that wrote the version (the table can hold triplets of earlier configs); `where=None` reads every row.
    Extra `columns` (e.g. "seed", "prompt_id") are added to each batch as lists.
    """

    def __init__(
        self,
        table_ref: TableRef,
        storage_cfg: StorageConfig,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        columns: Sequence[str] = (),
        where: str | None = AUTO,
        regenerate_noise: bool = True,
        drop_last: bool = False,
        block_rows: int = 64,
        window_blocks: int = 8,
        prefetch: bool = True,
        threads: int = 2,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataError("batch_size must be >= 1")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        self.table_ref = table_ref
        self.storage_cfg = storage_cfg
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle, self.seed, self.epoch = bool(shuffle), int(seed), int(epoch)
        self.columns = list(columns)
        self.where = where
        self.regenerate_noise = regenerate_noise
        self.drop_last = drop_last
        self.block_rows = max(1, int(block_rows))
        self.window_blocks = max(1, int(window_blocks))
        self.prefetch = prefetch
        self.threads = max(1, int(threads))
        self._ds: Any = None
        self._pid: int | None = None
        self._positions: np.ndarray | None = None
        self._shape: tuple[int, ...] | None = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------------- process-local state
    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers get a copy without the Lance handle (it is not picklable and not fork-safe).
        state = self.__dict__.copy()
        state.update(_ds=None, _pid=None, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _dataset(self) -> Any:
        with self._lock:
            if self._ds is None or self._pid != os.getpid():  # opened before a fork: open our own
                self._ds = _open_lance(self.table_ref, self.storage_cfg)
                self._pid = os.getpid()
                if self._positions is None:
                    where = default_filter(self._ds) if self.where == AUTO else self.where
                    self._positions = _positions(self._ds, where)
                    self._shape = latent_shape_of(self._ds) if len(self._positions) else None
            return self._ds

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def num_rows(self) -> int:
        """Rows this dataset reads across all ranks and workers."""
        self._dataset()
        return len(self._positions)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        self._dataset()
        if self._shape is None:
            raise DataError(f"triplets table {self.table_ref.key()} has no rows to read")
        return self._shape

    def __len__(self) -> int:
        """Batches this rank yields per epoch (all its workers together; approximate with drop_last)."""
        n = len(self._rank_positions(num_readers=self.world_size, reader=self.rank))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    # ---------------------------------------------------------------------------------- the plan
    def _rank_positions(self, num_readers: int, reader: int) -> np.ndarray:
        """This reader's positions, in reading order: blocks shuffled per epoch, dealt round-robin."""
        self._dataset()
        pos = self._positions
        n_blocks = -(-len(pos) // self.block_rows)
        order = np.arange(n_blocks)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n_blocks)
        mine = order[reader::num_readers]
        if len(mine) == 0:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([pos[b * self.block_rows : (b + 1) * self.block_rows] for b in mine])

    def reader_positions(self, worker: int = 0, num_workers: int = 1) -> np.ndarray:
        """The positions one (rank, worker) reads this epoch (disjoint across readers, together covering)."""
        readers = self.world_size * num_workers
        return self._rank_positions(num_readers=readers, reader=self.rank * num_workers + worker)

    # ---------------------------------------------------------------------------------- reading
    def _read_window(self, positions: np.ndarray, window_index: int) -> pa.Table:
        ds = self._dataset()
        order = np.argsort(positions, kind="stable")
        cols = ["triplet_id", "prompt", "seed", "x1", *self.columns]
        if not self.regenerate_noise:
            cols.append("x0")
        cols = list(dict.fromkeys(cols))
        with Store(self.storage_cfg).guard(f"read {self.table_ref.key()}"):
            table = ds.take(pa.array(positions[order]), columns=cols)  # sorted: sequential I/O
        # back to the (shuffled) plan order, then shuffle inside the window
        table = table.take(pa.array(np.argsort(order, kind="stable")))
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, window_index, 7])
            table = table.take(pa.array(rng.permutation(table.num_rows)))
        return table

    def _batch(self, table: pa.Table) -> dict[str, Any]:
        shape = self._shape
        x1 = _f32(table.column("x1"), shape)
        seeds = table.column("seed").to_pylist()
        if self.regenerate_noise:
            x0 = noise_from_seeds(seeds, shape)
        else:
            col = table.column("x0")
            if col.null_count:
                raise DataError(
                    f"{self.table_ref.key()}: x0 is not stored for every row; use regenerate_noise=True"
                )
            x0 = _f32(col, shape)
        out: dict[str, Any] = {
            "x0": x0,
            "x1": x1,
            "prompt": table.column("prompt").to_pylist(),
            "triplet_id": table.column("triplet_id").to_pylist(),
            "seed": seeds,
        }
        for c in self.columns:
            if c not in out:
                out[c] = seeds if c == "seed" else table.column(c).to_pylist()
        return out

    def _window_batches(self, positions: np.ndarray, window_index: int) -> list[dict[str, Any]]:
        """Read one window and build its batches (runs in a reader thread: Lance, randn and the half->float
        conversion all release the GIL, so `threads` windows are built in parallel without processes)."""
        table = self._read_window(positions, window_index)
        n = table.num_rows
        full = n // self.batch_size * self.batch_size
        out = [self._batch(table.slice(s, self.batch_size)) for s in range(0, full, self.batch_size)]
        if full < n and not self.drop_last:  # only the reader's last window has a remainder
            out.append(self._batch(table.slice(full)))
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        positions = self.reader_positions(worker, num_workers)
        # windows hold whole batches, so every window but the last is cut into batches on its own
        rows = self.block_rows * self.window_blocks
        window = max(1, -(-rows // self.batch_size)) * self.batch_size
        starts = list(range(0, len(positions), window))
        if not starts:
            return
        if not self.prefetch:
            for i, s in enumerate(starts):
                yield from self._window_batches(positions[s : s + window], i)
            return
        pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="triplet-reader")
        try:
            pending: deque[Future] = deque()
            nxt = 0
            while nxt < len(starts) or pending:
                # keep threads + 1 windows in flight: all threads busy while the oldest is consumed
                while nxt < len(starts) and len(pending) <= self.threads:
                    pending.append(
                        pool.submit(self._window_batches, positions[starts[nxt] : starts[nxt] + window], nxt)
                    )
                    nxt += 1
                yield from pending.popleft().result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


def make_loader(dataset: TripletDataset, num_workers: int = 0, **kwargs: Any) -> DataLoader:
    """A DataLoader for a TripletDataset: batching by the dataset, `spawn` workers (Lance is not fork-safe).

    The row plan is computed here once and shipped to the workers. Workers are not persistent, so each epoch's
    iterator sees the dataset's current `set_epoch`.
    """
    dataset.num_rows  # noqa: B018 - computes the row positions in this process, before workers copy the dataset
    args: dict[str, Any] = {"batch_size": None, "num_workers": num_workers}
    if num_workers > 0:
        args |= {"multiprocessing_context": "spawn", "persistent_workers": False, "prefetch_factor": 2}
    args.update(kwargs)
    return DataLoader(dataset, **args)


def validate_triplets(
    table_ref: TableRef,
    storage_cfg: StorageConfig,
    expected_latent_shape: Sequence[int] | None,
    where: str | None = AUTO,
) -> int:
    """Check a triplets table version before training: rows exist and latents have the model's shape
    (`expected_latent_shape`; None: any, the caller checks it against the model itself).

    Returns the number of rows the training stage will read; raises DataError otherwise.
    """
    ds = _open_lance(table_ref, storage_cfg)
    missing = [c for c in ("triplet_id", "prompt", "seed", "x1", "latent_shape") if c not in ds.schema.names]
    if missing:
        raise DataError(f"{table_ref.key()} is not a triplets table (missing columns {missing})")
    flt = default_filter(ds) if where == AUTO else where
    n = ds.count_rows(filter=flt) if flt else ds.count_rows()
    if n == 0:
        raise DataError(
            f"triplets table {table_ref.key()} has no rows{f' matching {flt}' if flt else ''}: run generation first"
        )
    if expected_latent_shape is None:
        return int(n)
    have = latent_shape_of(ds)
    want = tuple(int(s) for s in expected_latent_shape)
    if tuple(have) != want:
        raise DataError(
            f"triplets table {table_ref.key()} holds latents of shape {tuple(have)} but the model expects {want}: "
            "generate triplets with this teacher"
        )
    return int(n)
