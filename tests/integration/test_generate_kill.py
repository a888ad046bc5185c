"""Exactly-once under SIGKILL: kill `instaflow generate` midway, rerun, and check the table row by row.

The generation runs in a subprocess (the CLI a user would run, thread task runner, so that process is the
worker); the test polls the Lance table and SIGKILLs the process once some rows are committed but not all.
The rerun must end with exactly the expected triplet ids, each once, and every stored seed must regenerate the
noise whose teacher solution is the stored latent.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from instaflow_core.config import load
from instaflow_core.generation.triplets import rows_to_latents
from instaflow_core.store import Store, open_ref, open_table
from tests.integration.test_generate_flow import expected_ids
from tests.support import REPO

SETS = [
    "generation.max_prompts=30",
    "generation.shard_size=5",
    "generation.images_per_prompt=2",
    "generation.num_inference_steps=6",
    "generation.batch_size=2",
]


def _rows(storage_cfg) -> int:
    try:
        return open_table(Store(storage_cfg), "triplets").count_rows()
    except Exception:  # noqa: BLE001 - not created yet
        return 0


def _cli() -> list[str]:
    exe = shutil.which("instaflow", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "flows.cli"]


def test_sigkill_midway_then_rerun_is_exactly_once(prefect_api, tmp_path):
    from prefect.settings import PREFECT_API_URL

    from flows.curate import curate_flow
    from flows.generate import generate_flow
    from tasks.caching import prefect_settings
    from tasks.lineage import remember_refs

    root = f"file://{tmp_path / 'store'}"
    sets = [f"storage.root={root}", *SETS]
    cfg = load("tiny", sets)
    with prefect_settings(cfg.storage, cfg.orchestration):
        prompts = curate_flow(cfg)
    remember_refs(
        cfg.storage, {"prompts": prompts}
    )  # what `instaflow curate` records for `instaflow generate`
    total = 60

    cmd = _cli()
    cmd += ["generate"] if cmd[0].endswith("instaflow") else []
    for s in sets:
        cmd += ["--set", s]
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    log = (tmp_path / "generate.log").open("wb")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    seen = 0
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            seen = _rows(cfg.storage)
            if seen >= total // 3:  # well into the run, far from its end
                break
            time.sleep(0.05)
        assert proc.poll() is None, (
            "generation ended before it could be killed:\n" + (tmp_path / "generate.log").read_text()[-3000:]
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL

    after_kill = open_table(Store(cfg.storage), "triplets").to_arrow()
    killed_ids = after_kill.column("triplet_id").to_pylist()
    print(f"SIGKILL after {len(killed_ids)} of {total} rows were committed")
    assert 0 < len(killed_ids) < total, f"kill was not midway: {len(killed_ids)} of {total} rows"
    assert len(set(killed_ids)) == len(killed_ids)

    with prefect_settings(cfg.storage, cfg.orchestration):
        ref = generate_flow(cfg, prompts)
    table = open_ref(Store(cfg.storage), ref).to_arrow()
    ids = table.column("triplet_id").to_pylist()
    teacher = table.column("teacher")[0].as_py()
    assert len(ids) == len(set(ids)) == total == ref.rows
    assert set(ids) == expected_ids(cfg, prompts, teacher)
    assert set(killed_ids) <= set(ids)
    assert len(set(table.column("run_id").to_pylist())) == 2  # resumed: rows of the killed run were kept

    # every stored seed regenerates the noise that produced its latent (re-solved with the teacher)
    from instaflow_core.generation.solvers import teacher_latents
    from instaflow_core.models.loading import load_model
    from tasks.teacher import teacher_model

    with prefect_settings(cfg.storage, cfg.orchestration):
        model = load_model(teacher_model(cfg.models, cfg.storage), cfg.storage, cfg.models)
    x1 = teacher_latents(
        model,
        table.column("prompt").to_pylist(),
        table.column("seed").to_pylist(),
        steps=cfg.generation.num_inference_steps,
        guidance=cfg.generation.guidance_scale,
        scheduler=cfg.generation.scheduler,
    )
    stored = torch.from_numpy(rows_to_latents(table.column("x1"), (4, 8, 8)).astype(np.float32))
    torch.testing.assert_close(stored, x1, atol=2e-2, rtol=2e-3)
