"""Triplets (prompt, X0 seed, X1): what a row is. Ids, seeds, the solver settings, the job, the Arrow schema, rows.

Exactly-once (contract 3 in docs/interfaces.md) rests on three deterministic functions:

- `triplet_seed(base_seed, prompt_id, k)`: the k-th image of a prompt gets a 63-bit seed derived from the run's
  base seed and the prompt id, so the same prompt set always asks for the same noise, whatever the sharding;
- `triplet_id(prompt_id, seed, teacher, solver)`: a hash of everything that determines X1, so a rerun recognises
  rows it already wrote and a changed teacher or solver setting makes new ids (never overwrites old rows);
- `shards.plan_shards(prompt_ids, shard_size)`: sorted ids cut into contiguous id ranges, identical on every rerun.

The shard worker (`shards.ShardWorker`) and the stage that drives it (`pairs.PairGeneration`) build on these.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from instaflow_core.config import GenerationConfig, PairsConfig
from instaflow_core.errors import DataError
from instaflow_core.store.commits import key_field
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
    resolution: int | None = None  # px; None = the model's native size

    def settings(self) -> dict[str, Any]:
        """The output-determining settings (guidance has its own column but is part of the id too).

        An explicit resolution is part of them; the native one (None) is left out, so the ids of tables made
        before the setting existed stay valid."""
        out = {
            "kind": self.kind,
            "scheduler": self.scheduler,
            "steps": self.steps,
            "guidance": float(self.guidance),
            "negative_prompt": self.negative_prompt,
            "mixed_precision": self.mixed_precision,
        }
        if self.resolution is not None:
            out["resolution"] = int(self.resolution)
        return out

    def column(self) -> str:
        """The `solver` column: canonical JSON of the settings, comparable as a string in filters."""
        return json.dumps(self.settings(), sort_keys=True, separators=(",", ":"))


def triplet_id(prompt_id: str, seed: int, teacher: str, solver: SolverSpec | dict[str, Any]) -> str:
    """32 hex chars identifying one triplet: equal inputs give equal ids on any machine, in any run."""
    settings = solver.settings() if isinstance(solver, SolverSpec) else solver
    return _digest("triplet", str(prompt_id), int(seed), str(teacher), settings)[:16].hex()


class PairsJob(BaseModel):
    """One pair-making stage: which table, how X1 is solved, and the shared pair settings (shards, batches,
    images per prompt, seeds: `config.PairsConfig`).

    `from_generation` gives the teacher's triplets (stage 2); `from_distill_pairs` the 2-RF's own Euler pairs
    (table "distill_pairs"); both run through the same flow pieces.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    table: str = "triplets"
    solver: SolverSpec
    pairs: PairsConfig
    store_noise: bool = False
    split: Literal["train", "holdout", "all"] = "train"
    compile: bool | Literal["auto"] = False
    device: str = "auto"  # auto = cuda when available, else cpu
    # speed switches (config.GenerationConfig; "auto" = on CUDA): they change how fast X1 comes, never its id
    channels_last: bool | Literal["auto"] = "auto"
    cfg_batched: bool = True
    async_write: bool | Literal["auto"] = "auto"

    @classmethod
    def from_generation(
        cls, gen: GenerationConfig, table: str = "triplets", rectified_flow: bool = False
    ) -> PairsJob:
        """The teacher's probability-flow ODE (diffusers scheduler, CFG) on the generation settings; a
        rectified-flow teacher (`rectified_flow`, e.g. a pretrained 1-RF) takes Euler steps along its velocity."""
        return cls(
            table=table,
            solver=SolverSpec(
                kind="rf" if rectified_flow else "teacher",
                scheduler=gen.scheduler,
                steps=gen.num_inference_steps,
                guidance=gen.guidance_scale,
                negative_prompt=gen.negative_prompt,
                mixed_precision=gen.mixed_precision,
                resolution=gen.resolution,
            ),
            pairs=PairsConfig.model_validate(gen.model_dump(include=set(PairsConfig.model_fields))),
            store_noise=gen.store_noise,
            split=gen.split,
            compile=gen.compile,
            channels_last=gen.channels_last,
            cfg_batched=gen.cfg_batched,
            async_write=gen.async_write,
        )

    @classmethod
    def from_distill_pairs(
        cls, pairs: PairsConfig, table: str = "distill_pairs", split: str = "train"
    ) -> PairsJob:
        """The 2-RF's own Euler solutions with light guidance (config.DistillationConfig.pairs)."""
        return cls(
            table=table,
            solver=SolverSpec(
                kind="rf",
                scheduler="euler",
                steps=pairs.num_inference_steps,
                guidance=pairs.guidance_scale,
                resolution=pairs.resolution,
            ),
            pairs=pairs,
            split=split,
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
    `latent_shape`, so readers without our code can reshape. `triplet_id` is the declared (unenforced) primary
    key: what makes concurrent merges exactly-once (store/commits.py, docs/exactly-once.md).
    """
    shape = tuple(int(s) for s in latent_shape)
    fields = [
        key_field("triplet_id"),
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
