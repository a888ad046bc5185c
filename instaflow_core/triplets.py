"""Triplets (prompt, X0 seed, X1): ids, seeds, the Arrow schema, row building, shard planning, the shard worker.

Exactly-once (contract 3 of DESIGN.md) rests on three deterministic functions:

- `triplet_seed(base_seed, prompt_id, k)`: the k-th image of a prompt gets a 63-bit seed derived from the run's
  base seed and the prompt id, so the same prompt set always asks for the same noise, whatever the sharding;
- `triplet_id(prompt_id, seed, teacher, solver)`: a hash of everything that determines X1, so a rerun recognises
  rows it already wrote and a changed teacher or solver setting makes new ids (never overwrites old rows);
- `plan_shards(prompt_ids, shard_size)`: sorted ids cut into contiguous id ranges, identical on every rerun.

`run_shard` is the worker every stage that makes pairs shares (teacher triplets, the 2-RF's distillation pairs):
it reads a shard's prompts, skips ids already in the output table, solves the rest in batches through a `Solver`
callable and merges each batch on `triplet_id`, one Lance commit per batch. A killed worker therefore leaves
whole committed batches and nothing half-written; the rerun writes only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from instaflow_core.errors import DataError
from instaflow_core.store.tables import from_tensor_column, tensor_field

SEED_MASK = (1 << 63) - 1  # seeds are stored as int64 and fed to torch.Generator.manual_seed
FP16_MAX = 65504.0  # latents are stored as float16


# ------------------------------------------------------------------------------------------ ids and seeds
def _digest(*parts: Any) -> bytes:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).digest()


def triplet_seed(base_seed: int, prompt_id: str, index: int) -> int:
    """The noise seed of image `index` of a prompt: a 63-bit int from (base seed, prompt id, index)."""
    return int.from_bytes(_digest("seed", int(base_seed), str(prompt_id), int(index))[:8], "big") & SEED_MASK


class SolverSpec(BaseModel):
    """How X1 is made from X0 and a prompt: the settings that enter `triplet_id` and the `solver` column.

    kind "teacher": the teacher's probability-flow ODE via a diffusers scheduler with classifier-free guidance;
    kind "rf": Euler steps along a rectified-flow model's velocity (the 2-RF making distillation pairs).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["teacher", "rf"] = "teacher"
    scheduler: str = "dpmsolver++"
    steps: int
    guidance: float
    negative_prompt: str = ""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"

    def settings(self) -> dict[str, Any]:
        """The output-determining settings (guidance has its own column but is part of the id too)."""
        return {
            "kind": self.kind,
            "scheduler": self.scheduler,
            "steps": self.steps,
            "guidance": float(self.guidance),
            "negative_prompt": self.negative_prompt,
            "mixed_precision": self.mixed_precision,
        }

    def column(self) -> str:
        """The `solver` column: canonical JSON of the settings, comparable as a string in filters."""
        return json.dumps(self.settings(), sort_keys=True, separators=(",", ":"))


def triplet_id(prompt_id: str, seed: int, teacher: str, solver: SolverSpec | dict[str, Any]) -> str:
    """32 hex chars identifying one triplet: equal inputs give equal ids on any machine, in any run."""
    settings = solver.settings() if isinstance(solver, SolverSpec) else solver
    return _digest("triplet", str(prompt_id), int(seed), str(teacher), settings)[:16].hex()


class PairsJob(BaseModel):
    """One pair-making stage: which table, how X1 is solved, how many images per prompt, shards and batches.

    `from_generation` gives the teacher's triplets (stage 2); the distillation stage builds one with
    `SolverSpec(kind="rf", scheduler="euler", ...)` and table="distill_pairs" and reuses the same flow pieces.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    table: str = "triplets"
    solver: SolverSpec
    images_per_prompt: int = 1
    seed: int = 0
    shard_size: int = 256
    batch_size: int = 8
    store_noise: bool = False
    split: Literal["train", "holdout", "all"] = "train"
    max_prompts: int | None = None
    compile: bool = False
    device: str = "auto"  # auto = cuda when available, else cpu

    @classmethod
    def from_generation(cls, gen: Any, table: str = "triplets") -> PairsJob:
        """From config.GenerationConfig."""
        return cls(
            table=table,
            solver=SolverSpec(
                kind="teacher",
                scheduler=gen.scheduler,
                steps=gen.num_inference_steps,
                guidance=gen.guidance_scale,
                negative_prompt=gen.negative_prompt,
                mixed_precision=gen.mixed_precision,
            ),
            images_per_prompt=gen.images_per_prompt,
            seed=gen.seed,
            shard_size=gen.shard_size,
            batch_size=gen.batch_size,
            store_noise=gen.store_noise,
            split=gen.split,
            max_prompts=gen.max_prompts,
            compile=gen.compile,
        )

    @classmethod
    def from_distill_pairs(cls, pairs: Any, table: str = "distill_pairs", split: str = "train") -> PairsJob:
        """From config.DistillPairsConfig: the 2-RF's own Euler solutions with light guidance."""
        return cls(
            table=table,
            solver=SolverSpec(
                kind="rf", scheduler="euler", steps=pairs.num_inference_steps, guidance=pairs.guidance_scale
            ),
            images_per_prompt=pairs.images_per_prompt,
            seed=pairs.seed,
            shard_size=pairs.shard_size,
            batch_size=pairs.batch_size,
            split=split,
            max_prompts=pairs.max_prompts,
        )

    def split_filter(self) -> str | None:
        return None if self.split == "all" else f"split = {sql_str(self.split)}"


@dataclass(frozen=True)
class TripletJob:
    """One triplet to make: the prompt, its noise seed and the id its row will carry."""

    triplet_id: str
    prompt_id: str
    prompt: str
    seed: int


def expand_jobs(
    prompts: Iterable[tuple[str, str]],
    *,
    images_per_prompt: int,
    base_seed: int,
    teacher: str,
    solver: SolverSpec,
) -> list[TripletJob]:
    """(prompt_id, text) pairs -> `images_per_prompt` jobs each, ordered by (prompt_id, image index)."""
    jobs = []
    for pid, text in sorted(prompts):
        for k in range(images_per_prompt):
            seed = triplet_seed(base_seed, pid, k)
            jobs.append(TripletJob(triplet_id(pid, seed, teacher, solver), pid, text, seed))
    return jobs


def run_filter(teacher: str, solver: SolverSpec) -> str:
    """A Lance SQL filter selecting the rows one teacher + solver produced (a table may hold several)."""
    return f"teacher = {sql_str(teacher)} AND solver = {sql_str(solver.column())}"


def sql_str(value: str) -> str:
    """A SQL string literal (single quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


# ------------------------------------------------------------------------------------------------ schema
def latent_numel(shape: Sequence[int]) -> int:
    return int(np.prod([int(s) for s in shape]))


def triplet_schema(latent_shape: Sequence[int], *, store_noise: bool = False) -> pa.Schema:
    """The triplets table schema; X1 (and X0 when stored) as flat fixed-size float16 lists of C*h*w values.

    The per-row shape is kept in the tensor fields' metadata (store.tensor_field) and, per row, in
    `latent_shape`, so readers without our code can reshape.
    """
    shape = tuple(int(s) for s in latent_shape)
    fields = [
        pa.field("triplet_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string()),
        pa.field("seed", pa.int64(), nullable=False),
        tensor_field("x1", shape, pa.float16(), nullable=False),
        pa.field("latent_shape", pa.list_(pa.int32())),
    ]
    if store_noise:
        fields.append(tensor_field("x0", shape, pa.float16(), nullable=True))
    fields += [
        pa.field("teacher", pa.string()),
        pa.field("solver", pa.string()),
        pa.field("guidance", pa.float32()),
        pa.field("shard", pa.int32()),
        pa.field("run_id", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
    return pa.schema(fields)


def schema_latent_numel(schema: pa.Schema) -> int:
    """C*h*w of a triplets table's x1 column."""
    if "x1" not in schema.names:
        raise DataError("table has no x1 column: not a triplets table")
    return int(schema.field("x1").type.list_size)


def check_table_schema(schema: pa.Schema, latent_shape: Sequence[int], store_noise: bool, table: str) -> None:
    """An existing table must hold latents of this shape (and an x0 column when noise is to be stored)."""
    n = latent_numel(latent_shape)
    have = schema_latent_numel(schema)
    if have != n:
        raise DataError(
            f"table {table!r} holds latents of {have} values, this teacher makes {tuple(latent_shape)} "
            f"({n} values): write to another table or storage root"
        )
    if store_noise and "x0" not in schema.names:
        raise DataError(
            f"table {table!r} was created without an x0 column: set generation.store_noise=false "
            "(the seed reproduces X0) or write to another table"
        )


def _fixed_list(values: np.ndarray, n: int) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(values, dtype=np.float16).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float16()), n)


def build_rows(
    jobs: Sequence[TripletJob],
    x1: np.ndarray,
    *,
    schema: pa.Schema,
    teacher: str,
    solver: SolverSpec,
    shard: int,
    run_id: str,
    x0: np.ndarray | None = None,
    created_at: datetime | None = None,
) -> pa.Table:
    """One Arrow table of rows for `jobs`; x1 / x0 are (B, C, h, w) arrays (any float dtype, stored float16)."""
    b = len(jobs)
    if x1.shape[0] != b:
        raise ValueError(f"{b} jobs but {x1.shape[0]} latents")
    shape = [int(s) for s in x1.shape[1:]]
    n = latent_numel(shape)
    if n != schema_latent_numel(schema):
        raise DataError(
            f"latents of shape {tuple(shape)} do not fit the table's x1 of {schema_latent_numel(schema)}"
        )
    now = created_at or datetime.now(timezone.utc)
    cols: dict[str, pa.Array] = {
        "triplet_id": pa.array([j.triplet_id for j in jobs], pa.string()),
        "prompt_id": pa.array([j.prompt_id for j in jobs], pa.string()),
        "prompt": pa.array([j.prompt for j in jobs], pa.string()),
        "seed": pa.array([j.seed for j in jobs], pa.int64()),
        "x1": _fixed_list(x1, n),
        "latent_shape": pa.array([shape] * b, pa.list_(pa.int32())),
    }
    if "x0" in schema.names:
        cols["x0"] = _fixed_list(x0, n) if x0 is not None else pa.nulls(b, schema.field("x0").type)
    cols |= {
        "teacher": pa.array([teacher] * b, pa.string()),
        "solver": pa.array([solver.column()] * b, pa.string()),
        "guidance": pa.array([float(solver.guidance)] * b, pa.float32()),
        "shard": pa.array([int(shard)] * b, pa.int32()),
        "run_id": pa.array([run_id] * b, pa.string()),
        "created_at": pa.array([now] * b, pa.timestamp("us", tz="UTC")),
    }
    return pa.Table.from_arrays([cols[name] for name in schema.names], schema=schema)


def rows_to_latents(column: pa.ChunkedArray | pa.Array, shape: Sequence[int]) -> np.ndarray:
    """A fixed-size-list float16 column -> (B, *shape) float16 array."""
    return from_tensor_column(column, shape)


# -------------------------------------------------------------------------------------------- sharding
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


# ------------------------------------------------------------------------------------------ the shard worker
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
) -> ShardResult:
    """Make the triplets of one shard that the table does not hold yet, one merged commit per batch.

    `done_filter` selects this shard's rows in `table` (by prompt-id range, independent of shard numbering) so a
    rerun skips ids already written; `write(table, rows)` must merge on triplet_id. `on_batch(done, total)`
    reports progress in triplets. X0 is stored only when the table has an x0 column and `noise` is given.
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
    return ShardResult(shard, len(jobs), skipped, written, time.perf_counter() - t0)
