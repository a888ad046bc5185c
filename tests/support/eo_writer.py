"""A writer process for the exactly-once tests and benchmarks: `python eo_writer.py ROLE SPEC_JSON`.

SPEC_JSON: {"storage": StorageConfig dump, "table": name, "coord": plan key, "shards": S, "per_shard": P,
"batch": B, "ttl": seconds, "order": [shard indices], "sleep": solve seconds per batch}. Roles:

- `leased`: the real shard worker (`ShardWorker`) with a claim per shard, taking the shards in `order`;
- `rogue`: merges every shard of `order` from scratch with `merge_rows`, no lease, no skip (a writer that knows
  nothing about leases: an old client, or a slice re-run by hand), compacting the table between shards;
- `commits`: `merge_rows` of disjoint (or, with "overlap", shared) ids in batches, for the commit-rate benchmark.

Rows are deterministic (ids from `expand_jobs`, latents from the seeds), like the teacher's.
Prints one JSON line with what it did.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from instaflow_core.config import StorageConfig
from instaflow_core.generation.shards import ShardClaim, ShardWorker
from instaflow_core.generation.triplets import SolverSpec, build_rows, expand_jobs, triplet_schema
from instaflow_core.store import Store, merge_rows, open_table
from instaflow_core.store.claims import Claims
from instaflow_core.store.commits import retry_commit

SHAPE = (4, 2, 2)
SOLVER = SolverSpec(steps=2, guidance=1.0)
TEACHER = "fake-teacher"


def shard_jobs(shard: int, per_shard: int) -> list:
    prompts = [(f"s{shard:03d}-p{i:04d}", f"prompt {shard} {i}") for i in range(per_shard)]
    return expand_jobs(prompts, images_per_prompt=1, base_seed=0, teacher=TEACHER, solver=SOLVER)


def all_ids(shards: int, per_shard: int) -> set[str]:
    return {j.triplet_id for s in range(shards) for j in shard_jobs(s, per_shard)}


def solve_fn(sleep: float):
    def solve(prompts: list[str], seeds: list[int]) -> np.ndarray:
        time.sleep(sleep)  # the teacher's solve
        return np.stack([np.random.default_rng(s).standard_normal(SHAPE).astype(np.float32) for s in seeds])

    return solve


def shard_filter(shard: int) -> str:
    return f"prompt_id >= 's{shard:03d}-' AND prompt_id < 's{shard:03d}.'"


def main(role: str, spec: dict) -> dict:
    store = Store(StorageConfig(**spec["storage"]))
    table = open_table(store, spec["table"])
    out: dict = {"role": role, "pid": os.getpid(), "shards": []}
    t0 = time.perf_counter()
    if role == "leased":
        claims = Claims(store, spec["table"], spec["coord"], ttl=spec["ttl"], poll_s=0.3)
        worker = ShardWorker(
            table=table, solve=solve_fn(spec["sleep"]), teacher=TEACHER, solver=SOLVER, batch_size=spec["batch"],
            run_id=role, write=lambda t, r: merge_rows(t, r, "triplet_id"),
        )  # fmt: skip
        for s in spec["order"]:
            res = worker.run(
                shard_jobs(s, spec["per_shard"]), s, shard_filter(s),
                ShardClaim(claims, f"shard-{s}", {"shard": s}),
            )  # fmt: skip
            out["shards"].append([s, res.status, res.written])
    elif role == "rogue":
        schema = triplet_schema(SHAPE)
        for s in spec["order"]:
            jobs = shard_jobs(s, spec["per_shard"])
            for b in range(0, len(jobs), spec["batch"]):
                part = jobs[b : b + spec["batch"]]
                x1 = solve_fn(spec["sleep"])([j.prompt for j in part], [j.seed for j in part])
                rows = build_rows(
                    part, x1, schema=schema, teacher=TEACHER, solver=SOLVER, shard=s, run_id=role
                )
                merge_rows(table, rows, "triplet_id")
            table.checkout_latest()
            retry_commit(
                lambda: table.to_lance().optimize.compact_files(), "compact", on_retry=table.checkout_latest
            )
            out["shards"].append([s, "merged", len(jobs)])
    elif role == "commits":
        schema = triplet_schema(SHAPE)
        s = 0 if spec.get("overlap") else spec["order"][0]
        jobs = shard_jobs(s, spec["per_shard"])
        n = 0
        for b in range(0, len(jobs), spec["batch"]):
            part = jobs[b : b + spec["batch"]]
            x1 = solve_fn(0.0)([j.prompt for j in part], [j.seed for j in part])
            merge_rows(
                table,
                build_rows(part, x1, schema=schema, teacher=TEACHER, solver=SOLVER, shard=s, run_id=role),
                "triplet_id",
            )
            n += 1
        out["commits"] = n
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def run_writers(roles: list[tuple[str, dict]], folder: str, timeout: float = 600.0) -> list[dict]:
    """Start one process per (role, spec), release them together once all imported, return their outputs."""
    import subprocess
    from pathlib import Path

    Path(folder).mkdir(parents=True, exist_ok=True)
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "EO_BARRIER": folder, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, role, json.dumps(spec)],
            cwd=repo,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for role, spec in roles
    ]
    try:
        end = time.monotonic() + 300
        while len(list(Path(folder).glob("ready.*"))) < len(procs):
            if time.monotonic() > end or any(p.poll() is not None for p in procs):
                break
            time.sleep(0.1)
        Path(folder, "go").touch()
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise RuntimeError(f"writer {p.args[2]} exited {p.returncode}: {err[-3000:]}")
            outs.append(json.loads(out.strip().splitlines()[-1]))
        return outs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def barrier(folder: str | None) -> None:
    """Say we are ready (imports done), then wait for the test's go: the writers start together."""
    if not folder:
        return
    from pathlib import Path

    Path(folder, f"ready.{os.getpid()}").touch()
    while not Path(folder, "go").exists():
        time.sleep(0.02)


if __name__ == "__main__":
    barrier(os.environ.get("EO_BARRIER"))
    print(json.dumps(main(sys.argv[1], json.loads(sys.argv[2]))), flush=True)
