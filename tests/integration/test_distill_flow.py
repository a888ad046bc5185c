"""Stage 4 end to end: the 2-RF makes distill_pairs through the generation machinery, a one-step student learns
them (L2 then LPIPS with the stand-in network), the folder loads in InstaFlowPipeline and generates in 1 step.
The whole chain also runs on the SeaweedFS S3 server. Plus the LPIPS interface on its own."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flows.distill import PAIRS_TABLE, distill_flow
from flows.reflow import reflow_flow
from instaflow_core.errors import ConfigError
from instaflow_core.models.family import STAGE_META
from instaflow_core.refs import Stage
from instaflow_core.store import Store, open_ref
from instaflow_core.training.job import TrainJob
from instaflow_core.training.lpips import TinyLPIPS, build_lpips, lpips_distance
from tasks.caching import prefect_settings
from tests.integration.test_reflow_flow import folder_pipeline, make_inputs, mlflow_run, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DISTILL_SETS = [
    "distillation.stages=[{steps: 2, batch_size: 4, loss: l2}, {steps: 2, batch_size: 4, loss: lpips}]",
    "distillation.lpips_weights=tiny",
]


def _chain(cfg):
    prompts, triplets, teacher = make_inputs(cfg)
    with prefect_settings(cfg.storage, cfg.orchestration):
        rf = reflow_flow(cfg, triplets, teacher)
        one = distill_flow(cfg, rf, prompts)
    return prompts, triplets, teacher, rf, one


def _check_chain(cfg, prompts, rf, one):
    store = Store(cfg.storage)
    assert one.kind == "instaflow" and store.resolve(one.uri).startswith(store.uri("models", "instaflow-"))

    # the pairs: one row per train prompt (images_per_prompt 1), solved by this 2-RF with Euler + guidance 1.5
    pairs_table = open_ref(store, _pairs_ref(cfg, store, rf, prompts))
    solver = {"kind": "rf", "scheduler": "euler", "steps": 2, "guidance": 1.5}
    rows = pairs_table.search().where(f"teacher = '{rf.source}'").limit(None).to_arrow()
    assert rows.num_rows == prompts.rows
    assert all(json.loads(s).items() >= solver.items() for s in rows.column("solver").to_pylist())

    meta = json.loads(store.read_bytes(f"{one.uri}/{STAGE_META}"))
    assert meta["kind"] == "instaflow" and meta["steps"] == 4 and meta["weights"] == "ema"
    pipe = folder_pipeline(store, one.uri)
    out = pipe(["a photo of a cat", "a red car"], num_inference_steps=1, output_type="np").images
    assert out.shape == (2, 16, 16, 3) and np.isfinite(out).all()

    job = TrainJob.make(Stage.DISTILL, cfg.distillation, cfg.storage, _pairs_ref(cfg, store, rf, prompts), rf)
    summary = job.summary()
    assert summary["steps"] == 4 and summary["sample_steps"] == 1
    assert [r["stage"] for r in summary["history"]] == [0, 1]  # l2 then lpips
    client, run = mlflow_run(cfg, summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["instaflow.stage"] == "distill"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == [
        "samples/samples_1step.png"
    ]


def _pairs_ref(cfg, store, rf, prompts):
    """The distill_pairs TableRef the flow trained on (its latest version)."""
    from instaflow_core.store import table_ref

    return table_ref(store, PAIRS_TABLE, config_hash=_job_hash(cfg, rf, prompts))


def _job_hash(cfg, rf, prompts):
    from instaflow_core.generation.pairs import PairGeneration
    from instaflow_core.generation.triplets import PairsJob

    job = PairsJob.from_distill_pairs(cfg.distillation.pairs, table=PAIRS_TABLE)
    return PairGeneration(job, rf, prompts, cfg.storage).job_hash()


def test_distill_flow_local(prefect_api, local_storage_cfg):
    cfg = tiny_cfg(local_storage_cfg, DISTILL_SETS)
    prompts, _triplets, _teacher, rf, one = _chain(cfg)
    _check_chain(cfg, prompts, rf, one)
    # rerun: every stage is a cache hit, the same references come back
    with prefect_settings(cfg.storage, cfg.orchestration):
        assert distill_flow(cfg, rf, prompts) == one


@pytest.mark.s3
def test_reflow_and_distill_on_s3(prefect_api, s3_storage_cfg):
    cfg = tiny_cfg(s3_storage_cfg, DISTILL_SETS)
    prompts, triplets, teacher, rf, one = _chain(cfg)
    assert all(Store(cfg.storage).resolve(m.uri).startswith("s3://") for m in (rf, one))
    store = Store(cfg.storage)
    job = TrainJob.make(Stage.REFLOW, cfg.reflow, cfg.storage, triplets, teacher)
    assert store.exists(f"{job.ckpt_dir}/latest") and store.exists(job.samples_uri)
    assert job.summary()["steps"] == cfg.reflow.stages[0].steps
    _check_chain(cfg, prompts, rf, one)


# ------------------------------------------------------------------------------------------ LPIPS
def test_tiny_lpips_is_a_distance_with_gradients():
    net = build_lpips("tiny")
    assert isinstance(net, TinyLPIPS) and not any(p.requires_grad for p in net.parameters())
    torch.manual_seed(0)
    a = torch.rand(3, 3, 16, 16) * 2 - 1
    b = torch.rand(3, 3, 16, 16) * 2 - 1
    dist = lpips_distance(net)
    same = dist(a, a)
    assert same.shape == (3,) and torch.allclose(same, torch.zeros(3), atol=1e-6)
    d_ab = dist(a, b)
    assert (d_ab > 0).all() and torch.allclose(d_ab, dist(b, a), atol=1e-6)
    near = dist(a, a + 0.01 * torch.randn_like(a))
    assert (near < d_ab).all()
    x = b.clone().requires_grad_(True)
    dist(x, a).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(build_lpips("tiny").slices[0][0].weight, net.slices[0][0].weight)  # fixed by the seed


def test_lpips_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="lpips_weights is not set"):
        build_lpips(None)
    with pytest.raises(ConfigError, match="does not exist"):
        build_lpips(str(tmp_path / "missing.pth"))
    weights = tmp_path / "vgg.pth"
    torch.save({"lin1.model.1.weight": torch.zeros(1, 128, 1, 1)}, weights)
    try:
        import lpips  # noqa: F401
    except Exception:  # noqa: BLE001 - the CPU machines here: no torchvision, so no lpips
        with pytest.raises(ConfigError, match="cannot be imported"):
            build_lpips(str(weights))
