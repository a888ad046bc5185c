"""The issue's scenario: two `instaflow generate` runs on the same store, the second started 3 s after the first.

Tiny preset, `generation.images_per_prompt=12`, `generation.shard_size=8`: 160 prompts x 12 = 1,920 triplets in
20 shards. Before the declared key and the shard leases this left 3,280 rows (1,360 duplicate ids), one run
died with a raw Lance commit conflict. Now both exit 0, the table holds every expected id exactly once, the
final check found nothing to repair, and the two runs shared the shards instead of solving them twice.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from instaflow_core.config import load
from instaflow_core.store import Store, get_metadata, open_table
from tests.integration.test_generate_flow import expected_ids
from tests.support import REPO

SETS = ["generation.images_per_prompt=12", "generation.shard_size=8"]


def _cli() -> list[str]:
    exe = shutil.which("instaflow", path=str(Path(sys.executable).parent))
    return [exe, "generate"] if exe else [sys.executable, "-m", "flows.cli", "generate"]


def test_two_overlapping_generate_runs_make_every_triplet_once(prefect_api, tmp_path):
    from prefect.settings import PREFECT_API_URL

    from flows.curate import curate_flow
    from tasks.caching import prefect_settings
    from tasks.lineage import remember_refs

    sets = [f"storage.root=file://{tmp_path / 'store'}", *SETS]
    cfg = load("tiny", sets)
    with prefect_settings(cfg.storage, cfg.orchestration):
        prompts = curate_flow(cfg)
    remember_refs(
        cfg.storage, {"prompts": prompts}
    )  # what `instaflow curate` records for `instaflow generate`

    cmd = _cli() + [a for s in sets for a in ("--set", s)]
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    procs, logs = [], []
    for i in range(2):
        logs.append(tmp_path / f"run{i}.log")
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logs[-1].open("wb"), stderr=subprocess.STDOUT)
        )
        if i == 0:
            time.sleep(3)
    try:
        codes = [p.wait(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n\n".join(t[-3000:] for t in texts)
    # a conflict between the two writers is retried (a log line saying so), never shown raw
    raw = [
        ln
        for t in texts
        for ln in t.splitlines()
        if "commit conflict" in ln.lower() and "retry" not in ln.lower()
    ]
    assert not raw and not any("Traceback" in t for t in texts), raw

    table = open_table(Store(cfg.storage), "triplets")
    ids = table.to_lance().to_table(columns=["triplet_id"]).column("triplet_id").to_pylist()
    teacher = table.to_lance().to_table(columns=["teacher"], limit=1).column("teacher")[0].as_py()
    assert len(ids) == len(set(ids)) == 1920, f"{len(ids)} rows, {len(ids) - len(set(ids))} duplicated"
    assert set(ids) == expected_ids(cfg, prompts, teacher)
    verified = json.loads(get_metadata(table)["verified"])
    assert verified == {"expected": 1920, "rows": 1920, "duplicates": 0, "removed": 0, "missing_count": 0}
    for t in texts:  # both report the complete table
        assert "(1920 rows)" in t, t[-2000:]
    runs = table.to_lance().to_table(columns=["run_id"]).column("run_id").value_counts().to_pylist()
    print(
        "rows written per run:", {r["values"][:8]: r["counts"] for r in runs}
    )  # the split depends on timing
