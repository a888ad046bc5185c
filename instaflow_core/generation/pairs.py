"""The pair-making stage: a model turns (prompt, seed) into (X0 seed, X1) rows, sharded and exactly once.

`PairGeneration` owns the protocol both pair-making stages share (the teacher's triplets, `generation`; the
2-RF's own pairs, `distillation.pairs`):

    plan()            the prompts table version -> sorted prompt ids of the job's split (first max_prompts)
                      -> shards of `shard_size` prompts (deterministic: the same plan on every rerun)
    prepare_table()   create the output table (or check the existing one fits), declare triplet_id its key,
                      record the lineage; -> the latent shape
    shard(spec)       one shard under its lease: its prompts -> the ids not in the table yet -> solved in
                      batches by the model (`solvers.make_solver`) -> merged on the declared key
    encode_conditions()   every planned prompt's text condition (and "", the negative prompt) computed once into
                      the store's conditions table of the model's text encoders (generation/conditions.py)
    finish(expected)  under the table's finish lease: surplus copies from rule-breaking writers removed, every
                      expected id checked present exactly once, files compacted, indexes, lineage metadata
                      -> the TableRef
    slice_ref()       after one `--shard-slice i/N` run: the table as it is, without the completeness check

Exactly-once across any number of writers (overlapping runs, shard slices, Ray workers, a retried task whose
first attempt still lives; docs/exactly-once.md) rests on the declared key: every commit merges on triplet_id
(store/commits.py), so a triplet lands once whoever writes it; a shard's lease (store/claims.py, under
`<root>/coord/<table>/<plan key>/`) only keeps two writers from solving the same shard twice, and the plan key
hashes everything that decides which ids a shard holds (not the run, not the commit size).

The Prefect tasks (`tasks/generation.py`) are one call each into this object; progress reaches them through
`on_batch`.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from instaflow_core.config import ModelsConfig, StorageConfig, stable_hash
from instaflow_core.errors import DataError
from instaflow_core.generation.conditions import META_KEY as CONDITIONS_META
from instaflow_core.generation.conditions import ConditionTable, encoder_identity
from instaflow_core.generation.shards import (
    ShardClaim,
    ShardResult,
    ShardSpec,
    ShardWorker,
    plan_shards,
    select_prompt_ids,
)
from instaflow_core.generation.solvers import make_solver, resolve_device
from instaflow_core.generation.triplets import (
    PairsJob,
    check_table_schema,
    expand_jobs,
    run_filter,
    triplet_id,
    triplet_schema,
    triplet_seed,
)
from instaflow_core.models.loading import load_model_cached, model_geometry, times_loaded
from instaflow_core.models.sources import local_model_path
from instaflow_core.rectified_flow import noise_from_seeds
from instaflow_core.refs import ModelRef, TableRef
from instaflow_core.store import Store, create_table, merge_rows, open_ref, open_table, set_metadata
from instaflow_core.store.claims import Claims
from instaflow_core.store.commits import declare_key, retry_commit, verify_and_dedupe
from instaflow_core.store.leases import Holding

log = logging.getLogger("instaflow.generation")
KEY = "triplet_id"
FINISH = "_finish"  # the table-level lease name
FINISH_TTL_S = 120.0


def _and(*parts: str | None) -> str | None:
    kept = [f"({p})" for p in parts if p]
    return " AND ".join(kept) if kept else None


def upgrade_table(table: Any) -> list[str]:
    """Make an existing pairs table safe for concurrent writers, in place; returns what was changed: a table made
    before the key declaration gets it, and loses a BTree on triplet_id (whose indexed merge path would bypass
    conflict detection for clients that leave use_index on)."""
    changed = []
    if declare_key(table, KEY):
        changed.append(f"declared {KEY} the primary key")
    for ix in list(table.list_indices()):
        if list(getattr(ix, "columns", []) or []) == [KEY]:
            retry_commit(lambda n=ix.name: table.drop_index(n), f"drop index {ix.name} of {table.name!r}")
            table.checkout_latest()
            changed.append(f"dropped index {ix.name}")
    if changed:
        log.warning("table %r upgraded for concurrent writers: %s", table.name, "; ".join(changed))
    return changed


@dataclass
class PairGeneration:
    """One pair-making job on one model and one prompts table version (see the module docstring)."""

    job: PairsJob
    model: ModelRef
    prompts: TableRef
    storage: StorageConfig
    models_cfg: ModelsConfig | None = None

    def __post_init__(self) -> None:
        self.store = Store(self.storage)

    # ---- identity -------------------------------------------------------------------------------------
    @property
    def teacher(self) -> str:
        """The model's identity in triplet ids (`ModelRef.source`)."""
        return self.model.source

    def job_hash(self) -> str:
        return stable_hash(self.job.model_dump(mode="json"))

    def plan_key(self) -> str:
        """A hash of what decides the shards' triplet ids (table, teacher, solver, prompts version, split, seeds,
        shard size); the commit size, the run and the task runner stay out of it."""
        p = self.job.pairs
        return stable_hash(
            {
                "table": self.job.table,
                "teacher": self.teacher,
                "solver": self.job.solver.column(),
                "prompts": self.prompts.key(),
                "split": self.job.split,
                "seed": p.seed,
                "images_per_prompt": p.images_per_prompt,
                "shard_size": p.shard_size,
                "max_prompts": p.max_prompts,
            }
        )[:16]

    def claims(self, ttl: float) -> Claims:
        return Claims(self.store, self.job.table, self.plan_key(), ttl=ttl)

    def lineage_metadata(self) -> dict[str, str]:
        """What the table's metadata records about the run that wrote it (Lance keeps it per version)."""
        return {
            "teacher": self.teacher,
            "teacher_uri": self.model.uri,
            "solver": self.job.solver.column(),
            "config_hash": self.job_hash(),
            "prompts_table": self.prompts.table,
            "prompts_version": str(self.prompts.version),
            "prompts_ref": self.prompts.key(),
            "filter": run_filter(self.teacher, self.job.solver),
        }

    # ---- 1. plan --------------------------------------------------------------------------------------
    def prompt_ids(self) -> Any:
        """The sorted prompt ids of the job's split, first max_prompts: what the plan shards (and finish expects)."""
        table = open_ref(self.store, self.prompts)
        with self.store.guard(f"read prompt ids of {self.prompts.key()}"):
            ids = (
                table.to_lance()
                .to_table(columns=["prompt_id"], filter=self.job.split_filter())
                .column("prompt_id")
            )
        return select_prompt_ids(ids, self.job.pairs.max_prompts)

    def plan(self) -> list[ShardSpec]:
        ids = self.prompt_ids()
        if len(ids) == 0:
            raise DataError(
                f"prompts table {self.prompts.key()} has no prompts in split {self.job.split!r}: run curation first"
            )
        shards = plan_shards(ids, self.job.pairs.shard_size)
        log.info(
            "%d prompts x %d images -> %d shards", len(ids), self.job.pairs.images_per_prompt, len(shards)
        )
        return shards

    def expected_ids(self, prompt_ids: Iterable[str]) -> set[str]:
        """Every triplet id the job must produce for these (planned) prompt ids."""
        p, solver = self.job.pairs, self.job.solver
        return {
            triplet_id(pid, triplet_seed(p.seed, pid, k), self.teacher, solver)
            for pid in prompt_ids
            for k in range(p.images_per_prompt)
        }

    # ---- 2. prepare the table -------------------------------------------------------------------------
    def prepare_table(self) -> list[int]:
        """Create the output table (or check the existing one fits) and record the lineage; -> latent shape."""
        job = self.job
        geometry = model_geometry(self.model.uri, self.storage, self.models_cfg, kind=str(self.model.kind))
        shape = list(geometry.latent_shape(job.pairs.resolution, f"{job.table} resolution"))
        schema = triplet_schema(shape, store_noise=job.store_noise)
        try:
            existing = open_table(self.store, job.table)
        except DataError:
            existing = None
        if existing is not None:
            check_table_schema(existing.schema, shape, job.store_noise, job.table)
            if "x0" in existing.schema.names and not job.store_noise:
                schema = triplet_schema(shape, store_noise=True)  # keep the table's x0 column; rows get nulls
        at = {"resolution": str(geometry.resolution_of(shape)), "latent_shape": json.dumps(shape)}
        table = create_table(self.store, job.table, schema, metadata={**self.lineage_metadata(), **at})
        with self.store.guard(f"upgrade {job.table!r}"):  # a table made before the key declaration
            upgrade_table(table)
        return shape

    # ---- 3. the text conditions, once -----------------------------------------------------------------
    def encode_conditions(self, on_batch: Callable[[int, int], None] | None = None) -> TableRef:
        """The conditions of every planned prompt, "" and the negative prompt, written once per text encoder
        set (a rerun, or the 2-RF's pairs with the teacher's encoders, finds them there)."""
        folder = local_model_path(self.model.uri, self.storage, self.models_cfg, kind=str(self.model.kind))
        ids = set(self.prompt_ids().to_pylist())
        table = open_ref(self.store, self.prompts)
        with self.store.guard(f"read prompts of {self.prompts.key()}"):
            rows = table.to_lance().to_table(columns=["prompt_id", "text"], filter=self.job.split_filter())
        texts = sorted(
            t
            for pid, t in zip(
                rows.column("prompt_id").to_pylist(), rows.column("text").to_pylist(), strict=True
            )
            if pid in ids
        )
        texts += ["", self.job.solver.negative_prompt]
        model = load_model_cached(self.model, self.storage, self.models_cfg)
        conditions = ConditionTable(self.store, encoder_identity(folder), self.job.pairs.conditions_dtype)
        return conditions.write(model, texts, on_batch=on_batch)

    # ---- 4. one shard ---------------------------------------------------------------------------------
    def shard(
        self,
        spec: ShardSpec,
        *,
        run_id: str,
        task_run: str | None = None,
        lease_ttl_s: float = 60.0,
        rows_per_commit: int | None = None,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """One shard, under its lease: its prompts -> triplets not yet in the table -> solved in batches, merged on
        the declared key. `task_run` (the orchestrator's id of this attempt) lets a re-run of the same task run
        (Ray retrying a task whose worker died) take the lease over at once. Returns the shard's JSON record."""
        from instaflow_core.models.switches import switch_on

        job, store = self.job, self.store
        where = _and(spec.prompt_filter(), job.split_filter())
        with store.guard(f"read prompts of shard {spec.index}"):
            rows = (
                open_ref(store, self.prompts).to_lance().to_table(columns=["prompt_id", "text"], filter=where)
            )
        pairs = list(zip(rows.column("prompt_id").to_pylist(), rows.column("text").to_pylist(), strict=True))
        jobs = expand_jobs(
            pairs, images_per_prompt=job.pairs.images_per_prompt, base_seed=job.pairs.seed,
            teacher=self.teacher, solver=job.solver,
        )  # fmt: skip
        table = open_table(store, job.table)
        device = resolve_device(job.device)
        model = load_model_cached(self.model, self.storage, self.models_cfg)
        shape = model.latent_shape(job.pairs.resolution)
        worker = ShardWorker(
            table=table,
            solve=make_solver(job, model, device),
            teacher=self.teacher,
            solver=job.solver,
            batch_size=job.pairs.batch_size,
            run_id=run_id,
            write=lambda t, r: merge_rows(t, r, KEY),
            noise=lambda seeds: noise_from_seeds(seeds, shape),
            rows_per_commit=rows_per_commit,
            async_write=switch_on(job.async_write, device),
            on_batch=on_batch,
        )
        info = {"shard": spec.index, "first_id": spec.first_id, "last_id": spec.last_id}
        if task_run:
            info["task_run"] = task_run
        claim = ShardClaim(self.claims(lease_ttl_s), f"shard-{spec.index:06d}-of-{spec.count:06d}", info)
        done_filter = _and(spec.prompt_filter(), run_filter(self.teacher, job.solver)) or "true"
        res: ShardResult = worker.run(jobs, spec.index, done_filter, claim)
        return {
            "shard": res.shard,
            "expected": res.expected,
            "skipped": res.skipped,
            "written": res.written,
            "seconds": round(res.seconds, 3),
            "rate": round(res.rate, 3),
            "status": res.status,
            # which process ran it, and how often that process has loaded the model
            "pid": os.getpid(),
            "model_loads": times_loaded(self.model, self.storage, self.models_cfg),
            "run_id": run_id,  # a cached result from an earlier run carries that run's id
        }

    # ---- 5. finish ------------------------------------------------------------------------------------
    def finish(self, expected: int, conditions: TableRef | None = None) -> TableRef:
        """The final check (every expected triplet id exactly once, under the table's finish lease; surplus copies
        from rule-breaking writers removed), compaction, indexes, lineage metadata, and the reference."""
        from instaflow_core.store.query import ensure_indexes

        job, store = self.job, self.store
        table = open_table(store, job.table)
        ids = self.expected_ids(self.prompt_ids().to_pylist())
        if len(ids) != expected:
            raise DataError(
                f"{job.table!r}: the plan expects {expected} triplets, its prompts give {len(ids)}"
            )
        with store.guard(f"verify {job.table!r}"):
            check = self._verify(table, ids)
        # One small fragment per committed batch: compact them so training reads large sequential ranges. No
        # cleanup of old versions: references to earlier versions (lineage of trained models) stay readable.
        with store.guard(f"compact {job.table!r}"):
            retry_commit(lambda: table.to_lance().optimize.compact_files(), f"compact {job.table!r}",
                         on_retry=table.checkout_latest)  # fmt: skip
            table.checkout_latest()
            # the query module owns the index list (none on the merge key)
            retry_commit(
                lambda: ensure_indexes(table), f"index {job.table!r}", on_retry=table.checkout_latest
            )
        verified = {k: check[k] for k in ("expected", "rows", "duplicates", "removed", "missing_count")}
        meta = {**self.lineage_metadata(), "rows": str(check["rows"]), "verified": verified}
        if conditions is not None:  # where training finds the prompts' conditions (lineage as data)
            meta[CONDITIONS_META] = conditions.model_dump_json()
        set_metadata(table, meta)
        return self._ref(check["rows"])

    def _verify(self, table: Any, expected: set[str]) -> dict[str, Any]:
        """Dedupe and count this job's rows under the finish lease; DataError on missing or duplicated ids."""
        claims = self.claims(FINISH_TTL_S)
        where = run_filter(self.teacher, self.job.solver)
        lease = claims.wait(FINISH, {"role": "finish"})
        if lease is None:  # a finish lease never gets a done marker; be safe if one appears
            claims.clear_done(FINISH)
            lease = claims.wait(FINISH, {"role": "finish"})
        if lease is None:
            raise DataError(f"table {table.name!r}: cannot take its finish lease under {claims.base}")
        with Holding(lease):
            res = verify_and_dedupe(table, KEY, expected=expected, where=where)
        if res["removed"]:
            log.warning(
                "table %r: removed %d surplus copies of duplicated triplet ids (a writer without the declared "
                "key or with an indexed merge wrote them); one copy of each is kept", table.name, res["removed"],
            )  # fmt: skip
        if res["missing_count"]:
            raise DataError(
                f"table {table.name!r} lacks {res['missing_count']} of {res['expected']} expected triplets after "
                f"all shards (e.g. {res['missing'][0]}): rerun to make them"
            )
        if res["duplicates"]:
            raise DataError(
                f"table {table.name!r} still holds {res['duplicates']} duplicate triplet rows after dedupe: "
                "another writer is still adding copies; rerun the finish once it stops"
            )
        return res

    def preview(self, ref: TableRef, n_shards: int) -> tuple[str, bytes, list[str]] | None:
        """A decoded sample from up to 16 shards of the finished table as a PNG grid, written to the store:
        (uri, png, captions), or None when the table has no rows."""
        import numpy as np
        import torch

        from instaflow_core.generation.triplets import rows_to_latents
        from instaflow_core.inference.images import decode_latents, image_grid, png_bytes

        table = open_ref(self.store, ref)
        shards = list(range(min(n_shards, 16)))
        rows = (
            table.search()
            .where(f"shard IN ({','.join(map(str, shards))})")
            .select(["shard", "prompt", "x1", "latent_shape"])
            .limit(None)
            .to_arrow()
        )
        if rows.num_rows == 0:
            return None
        first: dict[int, int] = {}
        for i, s in enumerate(rows.column("shard").to_pylist()):
            first.setdefault(s, i)
        rows = rows.take(sorted(first.values()))
        shape = rows.column("latent_shape")[0].as_py()
        x1 = torch.from_numpy(rows_to_latents(rows.column("x1"), shape).astype(np.float32))
        model = load_model_cached(self.model, self.storage, self.models_cfg)
        images = decode_latents(model, x1)  # (n, H, W, 3)
        png = png_bytes(image_grid(images, min(len(images), 8), min_side=64))
        uri = self.store.uri("previews", f"{ref.table}-v{ref.version}.png")
        self.store.write_bytes(uri, png)
        return uri, png, rows.column("prompt").to_pylist()

    def slice_ref(self) -> TableRef:
        """The table after one slice's shards (rows = this job's rows so far); no indexes, no completeness check."""
        table = open_table(self.store, self.job.table)
        return self._ref(int(table.count_rows(run_filter(self.teacher, self.job.solver))))

    def _ref(self, rows: int) -> TableRef:
        table = open_table(self.store, self.job.table)
        return TableRef(
            db_uri=self.store.ref("lance"),
            table=self.job.table,
            version=int(table.version),
            rows=rows,
            config_hash=self.job_hash(),
        )


def local_run_id() -> str:
    """A run id outside an orchestrator (the `run_id` column of rows written by a plain script)."""
    return f"local-{uuid.uuid4().hex[:12]}"
