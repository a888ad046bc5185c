"""The commit-level pieces of exactly-once (no services): conflict retries, the declared key, the shard worker
under a claim on a local folder, the Ray task options."""

from __future__ import annotations

import threading
import time

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from instaflow_core.config import OrchestrationConfig
from instaflow_core.errors import InstaflowError
from instaflow_core.generation.shards import ShardClaim, ShardWorker
from instaflow_core.generation.triplets import SolverSpec, expand_jobs, triplet_schema
from instaflow_core.store import Store, merge_rows
from instaflow_core.store.claims import Claims
from instaflow_core.store.commits import (
    CommitContention,
    has_declared_key,
    is_conflict,
    key_field,
    retry_commit,
)

SOLVER = SolverSpec(steps=2, guidance=1.0)


def test_retry_commit_retries_conflicts_and_ends_in_one_clear_line():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("Retryable commit conflict for version 9: This Rewrite transaction was preempted")
        return "ok"

    assert retry_commit(flaky, "compact t", base_s=0.001) == "ok" and len(calls) == 3

    def always():
        raise RuntimeError("lance error: Retryable commit conflict ... CreateIndex transaction was preempted")

    with pytest.raises(
        CommitContention, match=r"^index t: still conflicting with other writers after \d+ tries"
    ):
        retry_commit(always, "index t", budget_s=0.05, base_s=0.001, cap_s=0.01)
    assert issubclass(CommitContention, InstaflowError)  # the CLI prints it as one line

    def other():
        raise ValueError("bad filter")

    with pytest.raises(ValueError, match="bad filter"):  # anything else is not retried
        retry_commit(other, "x")
    assert not is_conflict(ValueError("Invalid input")) and is_conflict(OSError("commit conflict"))


def test_the_triplet_schema_declares_its_key(tmp_path):
    schema = triplet_schema((4, 2, 2))
    assert has_declared_key(schema, "triplet_id") and not has_declared_key(schema, "prompt_id")
    table = lancedb.connect(str(tmp_path)).create_table("t", schema=schema)
    assert has_declared_key(table, "triplet_id")  # kept by Lance
    assert key_field("k").nullable is False


def _fake_solver(calls):
    def solve(prompts, seeds):
        calls.append(len(prompts))
        return np.stack([np.full((4, 2, 2), s % 97, np.float32) for s in seeds])

    return solve


def test_shard_worker_under_a_claim_commits_in_larger_batches_and_skips_a_shard_done_elsewhere(tmp_path):
    store = Store(f"file://{tmp_path}/store")
    table = lancedb.connect(str(tmp_path / "db")).create_table("triplets", schema=triplet_schema((4, 2, 2)))
    jobs = expand_jobs(
        [(f"p{i}", f"t{i}") for i in range(6)], images_per_prompt=2, base_seed=0, teacher="t", solver=SOLVER
    )
    claims = Claims(store, "triplets", "plan", poll_s=0.05)
    commits: list[int] = []

    def write(t, rows):
        commits.append(rows.num_rows)
        merge_rows(t, rows, "triplet_id")

    calls: list[int] = []
    kwargs = dict(table=table, batch_size=2, teacher="t", solver=SOLVER, run_id="r", write=write)
    claim0 = ShardClaim(claims, "shard-0")
    res = ShardWorker(solve=_fake_solver(calls), rows_per_commit=5, **kwargs).run(jobs, 0, "true", claim0)
    assert (res.status, res.written, res.skipped) == ("done", 12, 0)
    assert calls == [2] * 6 and commits == [6, 6]  # 3 batches buffered per commit (>= 5 rows)
    assert claims.done("shard-0")["written"] == 12
    again = ShardWorker(solve=_fake_solver(calls), **kwargs).run(jobs, 0, "true", claim0)
    assert (again.status, again.written) == ("already-done", 0) and len(calls) == 6

    # a second writer holds shard 1's lease: ours waits, then finds the rows and solves nothing
    more = expand_jobs([("q0", "u0")], images_per_prompt=3, base_seed=0, teacher="t", solver=SOLVER)
    other = claims.wait("shard-1")
    out: list = []
    done1 = "prompt_id = 'q0'"
    waiter = threading.Thread(
        target=lambda: out.append(
            ShardWorker(solve=_fake_solver(calls), **kwargs).run(
                more, 1, done1, ShardClaim(claims, "shard-1")
            )
        )
    )
    waiter.start()
    time.sleep(1.0)  # the waiter has read the (empty) shard and waits on the lease
    ShardWorker(solve=_fake_solver(calls), **kwargs).run(more, 1, done1, None)  # the holder's work
    claims.mark_done("shard-1", {"written": 3})
    other.release()
    waiter.join(timeout=30)
    assert out and out[0].status == "done-by-other" and out[0].written == 0
    assert table.count_rows() == 15


def test_shard_worker_refuses_a_table_without_the_declared_key(tmp_path):
    plain = pa.schema([pa.field(f.name, f.type, f.nullable) for f in triplet_schema((4, 2, 2))])
    table = lancedb.connect(str(tmp_path)).create_table("t", schema=plain)
    jobs = expand_jobs([("a", "A")], images_per_prompt=1, base_seed=0, teacher="t", solver=SOLVER)
    with pytest.raises(InstaflowError, match="declared key"):
        ShardWorker(
            table=table, solve=_fake_solver([]), teacher="t", solver=SOLVER, batch_size=1, run_id="r",
            write=lambda t, r: None,
        ).run(jobs, 0, "true")  # fmt: skip


def test_ray_task_options_from_config():
    from tasks.runners import task_options

    cfg = OrchestrationConfig(task_runner="ray")
    assert task_options(cfg, {"CPU": 2}) == {"num_cpus": 1.0, "max_calls": 0, "max_retries": 3}
    assert task_options(cfg, {"CPU": 64, "GPU": 8})["num_gpus"] == 1  # a GPU cluster: one GPU per shard
    forced = OrchestrationConfig(task_runner="ray", ray_task_gpus=0.5, ray_task_cpus=4, ray_max_retries=5)
    assert task_options(forced, {"GPU": 8}) == {
        "num_cpus": 4.0,
        "num_gpus": 0.5,
        "max_calls": 0,
        "max_retries": 5,
    }
    with pytest.raises(ValueError):
        OrchestrationConfig(ray_max_retries=0)  # a killed worker must be re-run
