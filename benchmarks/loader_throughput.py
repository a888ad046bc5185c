"""Training-loader throughput of SD-size triplets: TripletDataset on Lance (SeaweedFS S3 and local disk) vs the
per-sample `.pth` layout public SD pair generators write (one torch.save per sample). Prints ratios, asserts
nothing. Goal: >= 10x the baseline and >= 3000 samples/s.

Both sides deliver the same batches: x0 and x1 as (B, 4, 64, 64) float32 plus the prompts. The baseline files
hold noise and latent in float16 (`{"noise", "latent", "caption", "seed"}`) and are read by a map-style dataset
with a shuffling DataLoader (the usual script); ours stores x1 (float16) and the seed, regenerates X0 from the
seed in the loader, and reads shuffled blocks of rows with one Lance `take` per window. Every layout is read
once to warm up (page cache, S3 server cache) and timed on the second pass; DataLoader worker start-up is not
timed (the first batch is excluded).

    .venv/bin/python benchmarks/loader_throughput.py [--samples 4000] [--batch 64] [--workers 2] [--threads 2] [--no-s3]
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from instaflow_core.config import StorageConfig
from instaflow_core.generation.triplets import SolverSpec, build_rows, expand_jobs, run_filter, triplet_schema
from instaflow_core.store import Store, create_table, merge_rows, table_ref
from instaflow_core.store.dataset import TripletDataset, make_loader

SHAPE = (4, 64, 64)
SOLVER = SolverSpec(steps=25, guidance=5.0)


# ------------------------------------------------------------------------------------------------ baseline
class PthFiles(Dataset):
    """One .pth per sample, as SD pair-generation scripts write them (a local folder or an S3 prefix)."""

    def __init__(self, n: int, folder: Path | None = None, s3: dict | None = None) -> None:
        self.n, self.folder, self.s3 = n, folder, s3
        self._client = None

    def __len__(self) -> int:
        return self.n

    def _bytes(self, i: int) -> bytes | Path:
        name = f"{i:07d}.pth"
        if self.s3 is None:
            return self.folder / name
        if self._client is None:  # one client per worker process
            import boto3

            self._client = boto3.client(
                "s3",
                endpoint_url=self.s3["endpoint"],
                aws_access_key_id=self.s3["key"],
                aws_secret_access_key=self.s3["secret"],
                region_name="us-east-1",
            )
        obj = self._client.get_object(Bucket=self.s3["bucket"], Key=f"{self.s3['prefix']}/{name}")
        return obj["Body"].read()

    def __getitem__(self, i: int) -> dict:
        src = self._bytes(i)
        d = torch.load(io.BytesIO(src) if isinstance(src, bytes) else src, weights_only=True)
        return {"x0": d["noise"].float(), "x1": d["latent"].float(), "prompt": d["caption"]}


def write_pth(folder: Path, prompts: list[str], seeds: list[int], x1: np.ndarray) -> int:
    from instaflow_core.rectified_flow import noise_from_seeds

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(len(prompts)):
        noise = noise_from_seeds([seeds[i]], SHAPE)[0].half()
        torch.save(
            {"noise": noise, "latent": torch.from_numpy(x1[i]), "caption": prompts[i], "seed": seeds[i]},
            folder / f"{i:07d}.pth",
        )
    return sum(p.stat().st_size for p in folder.iterdir())


# ------------------------------------------------------------------------------------------------ ours
def write_table(
    storage_cfg: StorageConfig,
    prompts: list[str],
    x1: np.ndarray,
    chunk: int = 1024,
    store_noise: bool = False,
):
    from instaflow_core.rectified_flow import noise_from_seeds

    store = Store(storage_cfg)
    schema = triplet_schema(SHAPE, store_noise=store_noise)
    table = create_table(store, "triplets", schema, metadata={"filter": run_filter("bench", SOLVER)})
    jobs = expand_jobs(
        [(f"{i:08x}", p) for i, p in enumerate(prompts)],
        images_per_prompt=1,
        base_seed=0,
        teacher="bench",
        solver=SOLVER,
    )
    for s in range(0, len(jobs), chunk):  # big fragments, as a compacted table has
        part = jobs[s : s + chunk]
        x0 = noise_from_seeds([j.seed for j in part], SHAPE).numpy() if store_noise else None
        rows = build_rows(
            part, x1[s : s + chunk], schema=schema, teacher="bench", solver=SOLVER, shard=0, run_id="b", x0=x0
        )
        merge_rows(table, rows, "triplet_id")
    # compact and drop the pre-compaction files, so the byte count is the table's (nobody else reads it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        table.optimize(cleanup_older_than=timedelta(seconds=0), delete_unverified=True)
    return table_ref(store, "triplets"), [j.seed for j in jobs]


def table_bytes(storage_cfg: StorageConfig) -> int:
    store = Store(storage_cfg)
    path = store.fs_path(store.uri("lance", "triplets.lance", "data"))
    return int(sum(info["size"] for info in store.fs.find(path, detail=True).values()))


# ------------------------------------------------------------------------------------------------ timing
def timed_pass(loader) -> float:
    """samples/s over one full pass of the loader."""
    n, t0 = 0, time.perf_counter()
    for batch in loader:
        n += len(batch["prompt"])
        assert batch["x0"].shape[1:] == SHAPE and batch["x1"].dtype == torch.float32
    return n / (time.perf_counter() - t0)


def measure(make) -> float:
    """One loader with persistent workers: a warm-up pass (worker start-up, page cache, S3 server cache), then
    the timed pass."""
    loader = make()
    timed_pass(loader)
    return timed_pass(loader)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (0: read in-process)")
    ap.add_argument("--threads", type=int, default=2, help="TripletDataset reader threads per process")
    ap.add_argument("--no-s3", action="store_true")
    args = ap.parse_args()
    if args.workers == 0:
        torch.set_num_threads(1)  # what a DataLoader worker runs with: the per-core rate

    rng = np.random.default_rng(0)
    prompts = [f"a photo of thing {i} in style {i % 17}" for i in range(args.samples)]
    x1 = rng.standard_normal((args.samples, *SHAPE), dtype=np.float32).astype(np.float16)
    work = Path(tempfile.mkdtemp(prefix="instaflow-loader-bench-"))
    print(
        f"{args.samples} samples of {SHAPE} float16, batch {args.batch}, {args.workers} spawned DataLoader workers, "
        f"{args.threads} reader threads, "
        f"{os.cpu_count()} cpus (load average {os.getloadavg()[0]:.1f})"
    )

    local = StorageConfig(root=f"file://{work / 'store'}")
    local_x0 = StorageConfig(root=f"file://{work / 'store-x0'}")
    ref, seeds = write_table(local, prompts, x1)
    ref_x0, _ = write_table(local_x0, prompts, x1, store_noise=True)
    pth_bytes = write_pth(work / "pth", prompts, seeds, x1)
    n = args.samples

    def pth_loader(**src) -> DataLoader:
        return DataLoader(
            PthFiles(n, **src),
            batch_size=args.batch,
            shuffle=True,
            num_workers=args.workers,
            multiprocessing_context="spawn" if args.workers else None,
            persistent_workers=args.workers > 0,
        )

    def ours(cfg: StorageConfig, r, regen: bool = True) -> DataLoader:
        ds = TripletDataset(r, cfg, args.batch, seed=1, regenerate_noise=regen, threads=args.threads)
        return make_loader(ds, num_workers=args.workers, persistent_workers=args.workers > 0)

    rows: list[tuple[str, str, float]] = []  # (storage, loader, samples/s)
    rows.append(("local", "baseline: .pth per sample", measure(lambda: pth_loader(folder=work / "pth"))))
    rows.append(("local", "Lance, X0 from seeds (default)", measure(lambda: ours(local, ref))))
    rows.append(("local", "Lance, X0 stored (store_noise)", measure(lambda: ours(local_x0, ref_x0, False))))

    if not args.no_s3:
        from infra import seaweed

        key, secret = "bench", secrets.token_hex(16)
        server = seaweed.start(work / "seaweed", access_key=key, secret_key=secret, bucket="bench")
        os.environ["BENCH_S3_KEY"], os.environ["BENCH_S3_SECRET"] = key, secret

        def s3_cfg(prefix: str) -> StorageConfig:
            return StorageConfig(
                root=f"s3://bench/{prefix}",
                s3_endpoint=server.endpoint,
                access_key_env="BENCH_S3_KEY",
                secret_key_env="BENCH_S3_SECRET",
            )

        try:
            s3, s3_x0 = s3_cfg("lance"), s3_cfg("lance-x0")
            s3_ref, _ = write_table(s3, prompts, x1)
            s3_ref_x0, _ = write_table(s3_x0, prompts, x1, store_noise=True)
            Store(s3_cfg("pth")).put_dir(work / "pth", "s3://bench/pth")
            src = {
                "endpoint": server.endpoint,
                "key": key,
                "secret": secret,
                "bucket": "bench",
                "prefix": "pth",
            }
            rows.append(("S3", "baseline: .pth per sample", measure(lambda: pth_loader(s3=src))))
            rows.append(("S3", "Lance, X0 from seeds (default)", measure(lambda: ours(s3, s3_ref))))
            rows.append(
                ("S3", "Lance, X0 stored (store_noise)", measure(lambda: ours(s3_x0, s3_ref_x0, False)))
            )
        finally:
            server.stop()

    base_local = rows[0][2]
    print()
    print(
        f"{'storage':8s} {'loader':34s} {'samples/s':>10s} {'vs .pth same store':>19s} {'vs .pth local':>14s}"
    )
    for where, name, rate in rows:
        same = next(r for w, nm, r in rows if w == where and nm.startswith("baseline"))
        print(f"{where:8s} {name:34s} {rate:10.0f} {rate / same:18.1f}x {rate / base_local:13.1f}x")
    b_seed = table_bytes(local) / n
    b_x0 = table_bytes(local_x0) / n
    b_pth = pth_bytes / n
    print()
    print("bytes per triplet (on disk):")
    print(
        f"  Lance, x1 fp16 + seed + prompt + ids   {b_seed:9,.0f} B  ({b_pth / b_seed:.2f}x smaller than .pth)"
    )
    print(f"  Lance, x0 and x1 stored                {b_x0:9,.0f} B  ({b_pth / b_x0:.2f}x)")
    print(f"  per-sample .pth (noise + latent fp16)  {b_pth:9,.0f} B")
    print("goal: >= 10x the baseline and >= 3000 samples/s")


if __name__ == "__main__":
    main()
