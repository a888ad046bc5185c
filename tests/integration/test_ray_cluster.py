"""Triplet generation on a real two-node Ray cluster (head + worker node on loopback), writing to SeaweedFS S3.

- >= 16 shards through prefect-ray: every triplet exactly once, both nodes used, the teacher loaded once per
  worker process (not once per shard), the task resources from config;
- a Ray worker process SIGKILLed mid-shard (the one holding a shard's lease): Ray re-runs the task under the
  same Prefect task run, which takes the lease over at once, skips the rows the dead attempt committed and
  makes the rest; every triplet exactly once, each stored seed reproduces its stored noise, and the teacher's
  solution from that noise is the stored latent.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import numpy as np
import pytest
import torch

from instaflow_core.config import load
from instaflow_core.rectified_flow import noise_from_seeds
from instaflow_core.store import Store, open_ref, open_table
from tests.integration.test_generate_flow import _artifact, expected_ids

pytestmark = [pytest.mark.s3, pytest.mark.usefixtures("one_torch_thread"), pytest.mark.xdist_group("ray")]


def _cfg(storage_cfg, cluster, *sets):
    cfg = load(
        "tiny",
        [
            "orchestration.task_runner=ray",
            f"orchestration.ray_address={cluster.address}",
            "generation.num_inference_steps=2",
            *sets,
        ],
    )
    return cfg.model_copy(update={"storage": storage_cfg})


def _run(cfg, flow, *args):
    from tasks.caching import prefect_settings

    with prefect_settings(cfg.storage, cfg.orchestration):
        return flow(cfg, *args)


def test_generation_of_16_shards_on_a_ray_cluster(prefect_api, ray_cluster, s3_storage_cfg):
    from flows.curate import curate_flow
    from flows.generate import generate_flow
    from tasks.runners import connect_ray, task_options

    cfg = _cfg(
        s3_storage_cfg, ray_cluster,
        "generation.max_prompts=32", "generation.shard_size=2", "generation.images_per_prompt=1",
    )  # fmt: skip
    resources = connect_ray(cfg.orchestration)
    assert resources["CPU"] == 2  # two nodes, one CPU each
    assert task_options(cfg.orchestration, resources) == {"num_cpus": 1.0, "max_calls": 0, "max_retries": 3}
    assert task_options(cfg.orchestration, {"GPU": 8})["num_gpus"] == 1  # a GPU cluster: one GPU per shard

    prompts = _run(cfg, curate_flow)
    t0 = time.perf_counter()
    ref = _run(cfg, generate_flow, prompts)
    took = time.perf_counter() - t0
    table = open_ref(Store(cfg.storage), ref).to_arrow()
    ids = table.column("triplet_id").to_pylist()
    teacher = table.column("teacher")[0].as_py()
    assert len(ids) == len(set(ids)) == 32 == ref.rows
    assert set(ids) == expected_ids(cfg, prompts, teacher)
    assert len(set(table.column("shard").to_pylist())) == 16

    verified = json.loads(open_table(Store(cfg.storage), "triplets").to_lance().metadata["verified"])
    assert (verified["duplicates"], verified["removed"], verified["missing_count"]) == (0, 0, 0)
    # the shards ran in a few long-lived worker processes on both nodes, each loading the teacher once
    art = _artifact("instaflow-generate", ref.key())
    m = re.search(r"(\d+) worker processes, (\d+) model loads", art.data)
    procs, loads = int(m.group(1)), int(m.group(2))
    assert 2 <= procs <= 4 and loads == procs, art.data  # 16 shards, not 16 loads
    print(f"16 shards on 2 nodes in {took:.1f}s: {procs} worker processes, {loads} teacher loads")


def _lease_holders(store: Store) -> list[dict]:
    """The live shard leases under <root>/coord (who holds which shard now)."""
    out = []
    for uri in store.fs.glob(store.fs_path(store.uri("coord")) + "/triplets/*/lease/*.json"):
        try:
            out.append(json.loads(store.fs.cat_file(uri)))
        except FileNotFoundError:
            continue
    return out


def test_a_worker_killed_mid_shard_is_retried_exactly_once(prefect_api, ray_cluster, s3_storage_cfg):
    from flows.curate import curate_flow
    from flows.generate import generate_flow
    from tasks.runners import connect_ray

    cfg = _cfg(
        s3_storage_cfg, ray_cluster,
        "generation.max_prompts=8", "generation.shard_size=4", "generation.images_per_prompt=12",
        "generation.batch_size=4", "generation.num_inference_steps=12", "generation.store_noise=true",
    )  # fmt: skip
    connect_ray(cfg.orchestration)  # in this thread: the flow below runs in another
    prompts = _run(cfg, curate_flow)
    store = Store(cfg.storage)
    box: dict = {}

    def run() -> None:
        try:
            box["ref"] = _run(cfg, generate_flow, prompts)
        except BaseException as err:  # noqa: BLE001 - reported by the test below
            box["error"] = err

    flow_thread = threading.Thread(target=run, daemon=True)
    flow_thread.start()
    victim, seen = None, []
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and flow_thread.is_alive() and victim is None:
        holders = _lease_holders(store)
        if not holders:
            time.sleep(0.1)
            continue
        rows = open_table(store, "triplets").count_rows()
        workers = set(ray_cluster.worker_pids())
        seen.append((rows, [h["holder"] for h in holders], sorted(workers)))
        for lease in holders if rows else []:
            pid = int(lease["holder"].split(":")[2])
            if pid in workers:  # a worker that holds a shard, with part of the table committed
                victim = (pid, lease["shard"], rows)
                os.kill(pid, signal.SIGKILL)
                break
    assert victim is not None, f"no shard caught in flight: {box} {seen[-5:]} {ray_cluster._processes()}"
    flow_thread.join(timeout=600)
    assert not flow_thread.is_alive(), "the flow did not finish after the kill"
    assert "error" not in box, f"the run failed after the kill: {box.get('error')!r}"
    ref = box["ref"]
    print(f"SIGKILLed Ray worker {victim[0]} holding shard {victim[1]} at {victim[2]} rows")

    table = open_ref(store, ref).to_arrow()
    ids = table.column("triplet_id").to_pylist()
    teacher = table.column("teacher")[0].as_py()
    assert len(ids) == len(set(ids)) == 96 == ref.rows
    assert set(ids) == expected_ids(cfg, prompts, teacher)
    assert victim[0] not in ray_cluster.worker_pids()

    # each stored seed reproduces its stored noise, and the teacher's solution from it is the stored latent
    seeds = table.column("seed").to_pylist()
    x0 = torch.from_numpy(np.stack(table.column("x0").to_numpy(zero_copy_only=False)).astype(np.float32))
    torch.testing.assert_close(
        x0.reshape(96, 4, 8, 8), noise_from_seeds(seeds, (4, 8, 8)), atol=2e-3, rtol=1e-3
    )
    from instaflow_core.generation.solvers import teacher_latents
    from instaflow_core.generation.triplets import rows_to_latents
    from instaflow_core.models.loading import load_model
    from tasks.caching import prefect_settings
    from tasks.teacher import teacher_model

    with prefect_settings(cfg.storage, cfg.orchestration):
        model = load_model(teacher_model(cfg.models, cfg.storage), cfg.storage, cfg.models)
    some = table.slice(0, 6)
    x1 = teacher_latents(
        model, some.column("prompt").to_pylist(), some.column("seed").to_pylist(),
        steps=cfg.generation.num_inference_steps, guidance=cfg.generation.guidance_scale,
        scheduler=cfg.generation.scheduler,
    )  # fmt: skip
    stored = torch.from_numpy(rows_to_latents(some.column("x1"), (4, 8, 8)).astype(np.float32))
    torch.testing.assert_close(stored, x1, atol=2e-2, rtol=2e-3)


def test_ray_address_auto_and_ray_client(prefect_api, ray_cluster, s3_storage_cfg, monkeypatch):
    """`orchestration.ray_address=auto` (RAY_ADDRESS, as on a cluster node) and `ray://host:port` (the Ray
    client, as from a pod outside the cluster) reach the same cluster; a small generation runs through the
    client."""
    from flows.curate import curate_flow
    from flows.generate import generate_flow
    from instaflow_core.config import OrchestrationConfig
    from tasks.runners import connect_ray

    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.address)
    assert connect_ray(OrchestrationConfig(task_runner="ray", ray_address="auto"))["CPU"] == 2
    client = f"ray://127.0.0.1:{ray_cluster.client_port}"
    monkeypatch.delenv("RAY_ADDRESS")
    cfg = _cfg(
        s3_storage_cfg, ray_cluster, f"orchestration.ray_address={client}",
        "generation.max_prompts=4", "generation.shard_size=2", "generation.images_per_prompt=1",
    )  # fmt: skip
    assert connect_ray(cfg.orchestration)["CPU"] == 2
    prompts = _run(cfg, curate_flow)
    ref = _run(cfg, generate_flow, prompts)
    ids = open_ref(Store(cfg.storage), ref).to_arrow().column("triplet_id").to_pylist()
    assert len(ids) == len(set(ids)) == 4
