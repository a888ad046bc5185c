"""Exactly-once with concurrent writers on SeaweedFS S3 (docs/exactly-once.md), without Ray.

- leases: racing creators and takers get exactly one winner; a stalled holder loses its lease and cannot
  delete its successor's; a dead holder (same machine, pid gone) or a re-run of the same task run is taken over
  at once; local-folder leases are released by the kernel when the holder is SIGKILLed;
- four writer processes on one table: three run the real shard worker under leases, in rotated shard orders,
  and a fourth merges half the shards from scratch with no lease at all and compacts between them: every id
  lands exactly once (0 lost, 0 duplicated), and the finish check has nothing to repair;
- verify_and_dedupe repairs a table written without the key (it never deletes the last copy of an id);
- a table made before the key declaration (with a BTree on triplet_id) is upgraded in place by the prepare task.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from instaflow_core.generation.triplets import triplet_schema
from instaflow_core.store import Store, create_table, open_table
from instaflow_core.store.claims import Claims, s3_client
from instaflow_core.store.commits import has_declared_key, verify_and_dedupe
from instaflow_core.store.leases import Holding, LeaseLost, LocalLease, S3Lease
from tests.support import eo_writer

pytestmark = pytest.mark.s3


def _lease(cfg, key: str, ttl: float, **info) -> S3Lease:
    store = Store(cfg)
    return S3Lease(s3_client(store), store.bucket, f"{store.prefix}/{key}", ttl=ttl, info=info)


def test_s3_leases_one_winner_takeover_and_stalled_holder(s3_storage_cfg):
    # 6 racers x 10 rounds for fresh leases: exactly one winner per round
    wins = {r: 0 for r in range(10)}
    lock = threading.Lock()
    go = threading.Event()

    def racer() -> None:
        mine = [_lease(s3_storage_cfg, f"race/{r}", 30) for r in range(10)]
        go.wait()
        for r, lease in enumerate(mine):
            if lease.acquire():
                with lock:
                    wins[r] += 1

    threads = [threading.Thread(target=racer) for _ in range(6)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join()
    assert set(wins.values()) == {1}, wins

    # a stalled holder (ttl 1 s, no heartbeat) is taken over; its heartbeat then fails and its release
    # leaves the new holder's lease alone
    a, b = _lease(s3_storage_cfg, "stall", 1), _lease(s3_storage_cfg, "stall", 30)
    assert a.acquire() and not b.acquire()
    time.sleep(3.2)  # > ttl + LastModified's 1 s resolution
    assert b.acquire()
    with pytest.raises(LeaseLost):
        a.heartbeat()
    a.release()
    assert b.current()["holder"] == b.holder
    with Holding(b, interval=0.3):
        time.sleep(0.8)
        b.check()
    assert b.current() is None  # released at exit

    # a holder on this machine whose pid is gone is taken over at once (no ttl wait)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    ghost = _lease(s3_storage_cfg, "ghost", 600)
    host, boot, _, rnd = ghost.holder.split(":")
    ghost.holder = f"{host}:{boot}:{dead.stdout.strip()}:{rnd}"
    assert ghost.acquire()
    assert _lease(s3_storage_cfg, "ghost", 600).acquire()

    # a re-run of the same Prefect task run (Ray retrying a task whose worker died) takes over at once;
    # another task run waits
    first = _lease(s3_storage_cfg, "retry", 600, task_run="run-1")
    assert first.acquire()
    assert not _lease(s3_storage_cfg, "retry", 600, task_run="run-2").acquire()
    assert _lease(s3_storage_cfg, "retry", 600, task_run="run-1").acquire()


def test_local_lease_released_when_its_holder_is_killed(tmp_path):
    path = tmp_path / "coord" / "lease" / "s.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from instaflow_core.store.leases import LocalLease; from pathlib import Path;"
         f"assert LocalLease(Path({str(path)!r})).acquire(); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not LocalLease(path).acquire()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        mine = LocalLease(path)
        assert mine.acquire() and not LocalLease(path).acquire()  # ours now, and exclusive in-process too
        mine.release()
        assert LocalLease(path).acquire()
    finally:
        if holder.poll() is None:
            holder.kill()


def test_four_writer_processes_on_one_table(s3_storage_cfg, tmp_path):
    shards, per_shard = 8, 24
    store = Store(s3_storage_cfg)
    name, coord = "triplets", uuid.uuid4().hex[:8]
    create_table(store, name, triplet_schema(eo_writer.SHAPE))
    spec = {
        "storage": s3_storage_cfg.model_dump(), "table": name, "coord": coord, "shards": shards,
        "per_shard": per_shard, "batch": 6, "ttl": 20.0, "sleep": 0.05,
    }  # fmt: skip
    roles = [("leased", {**spec, "order": [(s + 3 * w) % shards for s in range(shards)]}) for w in range(3)]
    roles.append(("rogue", {**spec, "order": [1, 3, 5, 7]}))  # overlaps every leased writer, no lease
    outs = eo_writer.run_writers(roles, str(tmp_path / "barrier"))

    table = open_table(store, name)
    ids = table.to_lance().to_table(columns=["triplet_id"]).column("triplet_id").to_pylist()
    expected = eo_writer.all_ids(shards, per_shard)
    print({o["role"] + str(o["pid"]): o["shards"] for o in outs}, len(ids), "rows")
    assert len(ids) == len(set(ids)) == len(expected), "duplicated or lost rows"
    assert set(ids) == expected
    res = verify_and_dedupe(table, "triplet_id", expected=expected)
    assert (res["missing_count"], res["duplicates"], res["removed"]) == (0, 0, 0), res  # the key alone held
    # the leases saved work: no shard was solved by two leased writers (the others waited and skipped it),
    # and each shard the rogue left alone was solved by exactly one
    done = [s for o in outs if o["role"] == "leased" for s, status, _ in o["shards"] if status == "done"]
    assert len(done) == len(set(done)) and {0, 2, 4, 6} <= set(done), outs


def test_dedupe_repairs_a_table_without_the_key(local_storage_cfg):
    import pyarrow as pa

    store = Store(local_storage_cfg)
    schema = triplet_schema(eo_writer.SHAPE)
    plain = pa.schema([pa.field(f.name, f.type, f.nullable) for f in schema])  # no key metadata
    table = create_table(store, "old", plain)
    jobs = eo_writer.shard_jobs(0, 30)
    from instaflow_core.generation.triplets import build_rows

    x1 = eo_writer.solve_fn(0.0)([j.prompt for j in jobs], [j.seed for j in jobs])
    rows = build_rows(jobs, x1, schema=plain, teacher="t", solver=eo_writer.SOLVER, shard=0, run_id="r")
    table.add(rows)
    table.add(rows.slice(0, 12))  # 12 ids twice
    table.add(rows.slice(0, 5))  # 5 of them three times
    table.to_lance().optimize.compact_files()  # row ids move: the (id, _rowid) predicates must stay safe
    res = verify_and_dedupe(table, "triplet_id", expected={j.triplet_id for j in jobs})
    assert (res["rows"], res["duplicates"], res["missing_count"], res["removed"]) == (30, 0, 0, 17), res


def test_an_old_table_is_upgraded_in_place(local_storage_cfg):
    """A triplets table made before the key declaration, with the BTree the old finish built on triplet_id:
    `upgrade_table` (what the prepare task runs) declares the key and drops the index, keeping every row and
    version; merges into it are keyed from then on."""
    import pyarrow as pa
    from lancedb.index import BTree

    from instaflow_core.generation.pairs import upgrade_table
    from instaflow_core.generation.triplets import build_rows
    from instaflow_core.store import merge_rows

    store = Store(local_storage_cfg)
    schema = triplet_schema(eo_writer.SHAPE)
    plain = pa.schema([f.remove_metadata() if f.name == "triplet_id" else f for f in schema])
    old = create_table(store, "triplets", plain)
    jobs = eo_writer.shard_jobs(0, 10)
    x1 = eo_writer.solve_fn(0.0)([j.prompt for j in jobs], [j.seed for j in jobs])
    rows = build_rows(jobs, x1, schema=plain, teacher="t", solver=eo_writer.SOLVER, shard=0, run_id="r")
    merge_rows(old, rows, "triplet_id")
    old.create_index("triplet_id", config=BTree())
    before = old.version
    assert not has_declared_key(old, "triplet_id")

    assert upgrade_table(old) == ["declared triplet_id the primary key", "dropped index triplet_id_idx"]
    table = open_table(store, "triplets")
    assert has_declared_key(table, "triplet_id") and table.list_indices() == []
    assert table.count_rows() == 10 and open_table(store, "triplets", before).count_rows() == 10
    assert upgrade_table(table) == []  # idempotent
    merge_rows(table, rows, "triplet_id")  # the same rows again: updates
    assert table.count_rows() == 10


def test_claims_wait_returns_when_the_holder_marks_done(s3_storage_cfg):
    store = Store(s3_storage_cfg)
    claims = Claims(store, "t", "plan", ttl=30, poll_s=0.2)
    holder = claims.wait("shard-0")
    assert holder is not None
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(claims.wait("shard-0", timeout_s=60)))
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive()  # a live holder: the waiter waits
    with Holding(holder):
        claims.mark_done("shard-0", {"rows": 1})
    waiter.join(timeout=30)
    assert got == [None]  # done by the other: nothing to acquire
