"""Query latency on a 100k-row triplets table: SQL filter, full-text search, vector search (p50 / p95 in ms).

Goal: p50 <= 50 ms per query on a 100k-row table. Prints ratios, asserts nothing.

The table has the generation stage's schema. Latents are the tiny preset's (4x8x8 float16, 128 B a row) rather
than SD's 4x64x64 (32 KB a row = 3.2 GB for 100k rows, too big for this machine's disk and time budget); the
queries below never read the latent column, so its width changes only the bytes Lance skips over. Prompts are
realistic caption strings (templated, 8 to 20 words); the embedding column is 32-dim by default (the tiny
text encoder's pooled output) or `--dim 768` (SD 1.5's CLIP ViT-L), searched brute force unless
`--vector-index`. Latency is measured in-process on an open table (what the CLI does after start-up; the CLI's
own Python start-up, ~2-9 s, is not a query cost).

    .venv/bin/python benchmarks/query_latency.py [--rows 100000] [--dim 32|768] [--vector-index] [--root DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from instaflow_core.config import StorageConfig
from instaflow_core.curation.prompts import prompt_id
from instaflow_core.generation.triplets import SolverSpec, build_rows, expand_jobs, triplet_schema
from instaflow_core.store import Store, create_table, open_table
from instaflow_core.store.query import (
    EMBEDDING_COLUMN,
    ensure_fts_index,
    ensure_indexes,
    query_rows,
    search_text,
    search_vector,
)

GOAL_MS = 50.0
SHAPE = (4, 8, 8)

_SUBJECTS = (
    "a red car|a golden retriever|an old lighthouse|a bowl of ramen|a snowy mountain|a vintage bicycle|a city "
    "skyline|a tabby cat|a wooden cabin|a sailing boat|a bouquet of tulips|a steam locomotive|a hot air balloon|"
    "a medieval castle|a cup of coffee|a portrait of a woman|an astronaut|a robot|a fox|a waterfall"
).split("|")
_PLACES = (
    "on a rainy street|in a misty forest|at sunset|under a starry sky|in a busy market|on a quiet beach|"
    "in the desert|inside a cozy kitchen|on the moon|in tokyo at night|by a frozen lake|in a field of flowers"
).split("|")
_STYLES = (
    "oil painting|watercolor|35mm photograph|studio lighting|digital art|trending on artstation|pencil sketch|"
    "cinematic lighting|8k detailed|low poly|isometric illustration|film grain"
).split("|")
_EXTRAS = (
    "highly detailed|soft focus|wide angle|close-up|bokeh|dramatic clouds|pastel colors|high contrast".split(
        "|"
    )
)


def make_prompts(n: int, rng: np.random.Generator) -> list[str]:
    out = []
    for i in range(n):
        parts = [rng.choice(_SUBJECTS), rng.choice(_PLACES), rng.choice(_STYLES)]
        parts += list(rng.choice(_EXTRAS, size=int(rng.integers(0, 3)), replace=False))
        out.append(", ".join(parts) + f" #{i}")  # unique prompts, like a deduped caption set
    return out


def build(
    store: Store, rows: int, dim: int, vector_index: bool, rng: np.random.Generator
) -> tuple[object, dict]:
    t0 = time.perf_counter()
    schema = triplet_schema(SHAPE).append(pa.field(EMBEDDING_COLUMN, pa.list_(pa.float32(), dim)))
    table = create_table(store, "triplets", schema)
    solver = SolverSpec(scheduler="dpmsolver++", steps=25, guidance=5.0)
    prompts = make_prompts(rows // 2, rng)  # two images per prompt, as the presets make
    # Prompt embeddings: clustered (similar captions are near), unit norm.
    centers = rng.standard_normal((64, dim)).astype(np.float32)
    chunk = 20_000
    for start in range(0, len(prompts), chunk // 2):
        part = prompts[start : start + chunk // 2]
        jobs = expand_jobs(
            [(prompt_id(p), p) for p in part],
            images_per_prompt=2,
            base_seed=0,
            teacher="tiny-bench",
            solver=solver,
        )
        x1 = rng.standard_normal((len(jobs), *SHAPE)).astype(np.float16)
        run = f"run-{start // (chunk // 2)}"
        batch = build_rows(
            jobs, x1, schema=triplet_schema(SHAPE), teacher="tiny-bench", solver=solver, shard=0, run_id=run
        )
        emb = centers[rng.integers(0, len(centers), len(jobs))] + 0.3 * rng.standard_normal(
            (len(jobs), dim)
        ).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        batch = batch.append_column(
            EMBEDDING_COLUMN, pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)
        )
        table.add(batch)  # plain appends: the benchmark is about reading
    t_write = time.perf_counter() - t0
    t1 = time.perf_counter()
    ensure_indexes(table)
    ensure_fts_index(table, "prompt")
    if vector_index:
        from lancedb.index import IvfPq

        table.create_index(
            EMBEDDING_COLUMN,
            config=IvfPq(distance_type="cosine", num_partitions=64, num_sub_vectors=max(1, dim // 8)),
        )
    t_index = time.perf_counter() - t1
    table = open_table(store, "triplets")
    return table, {"write_s": t_write, "index_s": t_index, "prompts": prompts, "centers": centers}


def timeit(fn: Callable[[int], object], repeats: int, warmup: int = 3) -> list[float]:
    for i in range(warmup):
        fn(i)
    out = []
    for i in range(repeats):
        t = time.perf_counter()
        fn(warmup + i)
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument(
        "--vector-index", action="store_true", help="IVF_PQ index on the embedding (else brute force)"
    )
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--root", default=None, help="storage root (default: a temp folder)")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    tmp = tempfile.TemporaryDirectory(prefix="instaflow-qbench-")
    store = Store(StorageConfig(root=args.root or f"file://{tmp.name}"))
    table, info = build(store, args.rows, args.dim, args.vector_index, rng)
    rows = table.count_rows()
    ids = table.search().select(["triplet_id"]).limit(None).to_arrow().column(0).to_pylist()
    ids = [ids[i] for i in rng.integers(0, len(ids), 200)]
    words = [
        "lighthouse",
        "red car",
        "watercolor fox",
        "tokyo night",
        "ramen",
        "castle sunset",
        "astronaut moon",
    ]
    n_runs = len({f"run-{i}" for i in range(10)})
    queries = {
        "filter: triplet_id = <id> (BTree)": lambda i: query_rows(
            table, f"triplet_id = '{ids[i % len(ids)]}'", 20
        ),
        "filter: run_id = .. AND seed > .. limit 20": lambda i: query_rows(
            table, f"run_id = 'run-{i % n_runs}' AND seed > {int(i) * 10**15}", 20
        ),
        "full text: top 20": lambda i: search_text(table, words[i % len(words)], 20)[0],
        f"vector ({args.dim}-d, {'IVF_PQ' if args.vector_index else 'brute force'}): top 20": lambda i: (
            search_vector(table, info["centers"][i % len(info["centers"])], 20)
        ),
    }
    disk = sum(
        v.get("size", 0)
        for v in store.fs.find(store.fs_path(store.uri("lance", "triplets.lance")), detail=True).values()
    )
    print(
        f"table: {rows:,} rows, {disk / 2**20:.1f} MiB on disk; built in {info['write_s']:.1f} s, indexed in {info['index_s']:.1f} s"
    )
    print(
        f"latents {SHAPE} float16 (tiny preset), prompt embedding {args.dim}-d float32; {args.repeats} queries each\n"
    )
    print(f"{'query':52s} {'p50 ms':>8s} {'p95 ms':>8s} {'p50/goal':>9s}  rows")
    for name, fn in queries.items():
        ms = timeit(fn, args.repeats)
        n = len(fn(0))
        p50 = statistics.median(ms)
        p95 = float(np.percentile(ms, 95))
        print(f"{name:52s} {p50:8.1f} {p95:8.1f} {p50 / GOAL_MS:8.2f}x  {n}")
    print(f"\ngoal: p50 <= {GOAL_MS:.0f} ms (ratio <= 1.00x)")
    tmp.cleanup()


if __name__ == "__main__":
    main()
