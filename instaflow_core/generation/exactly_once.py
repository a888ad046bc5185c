"""The exactly-once pieces of a pair-making job: table upgrade, shard claims, expected ids, the final check.

- `upgrade_table`: a triplets table made before the key declaration gets it in place (and loses a BTree on
  triplet_id, whose indexed merge path would bypass conflict detection for clients that leave use_index on);
- `shard_claim`: where a shard's lease and done marker live: `<root>/coord/<table>/<plan key>/`, the plan key
  hashing everything that decides which triplet ids the shard holds (not the run, not the commit size);
- `expected_triplet_ids`: the ids the whole job must end with, recomputed from the planned prompt ids;
- `verify_pairs`: under the table's finish lease, remove surplus copies (a writer that broke the rules), then
  count: a missing or still duplicated id fails loudly (docs/exactly-once.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from instaflow_core.config import stable_hash
from instaflow_core.errors import DataError
from instaflow_core.generation.shards import ShardClaim, ShardSpec
from instaflow_core.generation.triplets import PairsJob, run_filter, triplet_id, triplet_seed
from instaflow_core.store.claims import Claims
from instaflow_core.store.commits import declare_key, retry_commit, verify_and_dedupe
from instaflow_core.store.leases import Holding
from instaflow_core.store.uri import Store

log = logging.getLogger("instaflow.generation.exactly_once")
KEY = "triplet_id"
FINISH = "_finish"  # the table-level lease name


def upgrade_table(table: Any) -> list[str]:
    """Make an existing pairs table safe for concurrent writers, in place; returns what was changed."""
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


def plan_key(job: PairsJob, teacher: str, prompts_key: str) -> str:
    """A hash of what decides the shards' triplet ids (table, teacher, solver, prompts version, split, seeds,
    shard size); the commit size, the run and the task runner stay out of it."""
    p = job.pairs
    return stable_hash(
        {
            "table": job.table,
            "teacher": teacher,
            "solver": job.solver.column(),
            "prompts": prompts_key,
            "split": job.split,
            "seed": p.seed,
            "images_per_prompt": p.images_per_prompt,
            "shard_size": p.shard_size,
            "max_prompts": p.max_prompts,
        }
    )[:16]


def job_claims(store: Store, job: PairsJob, teacher: str, prompts_key: str, ttl: float) -> Claims:
    return Claims(store, job.table, plan_key(job, teacher, prompts_key), ttl=ttl)


def shard_claim(claims: Claims, shard: ShardSpec, task_run: str | None) -> ShardClaim:
    """The claim of one shard; `task_run` (the Prefect task run id) lets a re-run of the same task run (Ray
    retrying a task whose worker died) take the lease over at once instead of waiting for it to expire."""
    name = f"shard-{shard.index:06d}-of-{shard.count:06d}"
    info = {"shard": shard.index, "first_id": shard.first_id, "last_id": shard.last_id}
    if task_run:
        info["task_run"] = task_run
    return ShardClaim(claims, name, info)


def expected_triplet_ids(prompt_ids: Iterable[str], job: PairsJob, teacher: str) -> set[str]:
    """Every triplet id the job must produce for these (planned) prompt ids."""
    p = job.pairs
    return {
        triplet_id(pid, triplet_seed(p.seed, pid, k), teacher, job.solver)
        for pid in prompt_ids
        for k in range(p.images_per_prompt)
    }


def verify_pairs(
    table: Any, claims: Claims, expected: set[str], teacher: str, job: PairsJob
) -> dict[str, Any]:
    """Dedupe and count this job's rows under the finish lease; DataError on missing or duplicated ids."""
    where = run_filter(teacher, job.solver)
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
            "table %r: removed %d surplus copies of duplicated triplet ids (a writer without the declared key "
            "or with an indexed merge wrote them); one copy of each is kept", table.name, res["removed"],
        )  # fmt: skip
    if res["missing_count"]:
        raise DataError(
            f"table {table.name!r} lacks {res['missing_count']} of {res['expected']} expected triplets after all "
            f"shards (e.g. {res['missing'][0]}): rerun to make them"
        )
    if res["duplicates"]:
        raise DataError(
            f"table {table.name!r} still holds {res['duplicates']} duplicate triplet rows after dedupe: "
            "another writer is still adding copies; rerun the finish once it stops"
        )
    return res
