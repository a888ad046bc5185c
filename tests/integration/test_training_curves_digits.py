"""Quality curves on a small digits run (pretraining -> triplets -> reflow -> distillation through the real flows):
every training stage's MLflow run holds `eval/*` metric curves at the configured optimizer steps, in the digits
classifier's FD (not FID) and prompt alignment, read back from MLflow; keep_best keeps the best point's EMA."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from instaflow_core.config import load
from instaflow_core.evaluation.curves import BEST_DIR, BEST_FILE, MLFLOW_METRICS
from instaflow_core.refs import Stage
from instaflow_core.store import Store
from instaflow_core.training.checkpoint import tensors_from_bytes
from tasks.caching import prefect_settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = [
    "pretraining.stages=[{steps: 120, batch_size: 128, loss: l2}]",
    "pretraining.checkpoint_every=60",
    "pretraining.log_every=40",
    "generation.images_per_prompt=10",
    "reflow.stages=[{steps: 60, batch_size: 128, loss: l2}]",
    "reflow.checkpoint_every=30",
    "reflow.log_every=20",
    "distillation.pairs.images_per_prompt=4",
    "distillation.stages=[{steps: 20, batch_size: 128, loss: l2}]",
    "distillation.teacher_control=false",
    "evaluation.during_training.every_steps={pretraining: 40, reflow: 20, distillation: 5}",
    "evaluation.during_training.samples=200",
    "evaluation.during_training.keep_best=true",
]


def history(client, run_id: str, name: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))


def test_digits_stages_log_quality_curves_to_mlflow(tmp_path: Path, prefect_api: None) -> None:
    from mlflow import MlflowClient

    from flows.curate import curate_flow
    from flows.distill import distill_flow
    from flows.generate import generate_flow
    from flows.pretrain import pretrain_flow
    from flows.reflow import reflow_flow
    from tasks.tracking.client import tracking_uri

    cfg = load("digits", [f"storage.root=file://{tmp_path / 'store'}", *SMALL])
    t0 = time.perf_counter()
    with prefect_settings(cfg.storage, cfg.orchestration):
        prompts = curate_flow(cfg)
        teacher = pretrain_flow(cfg, prompts)
        triplets = generate_flow(cfg, prompts, teacher)
        rf = reflow_flow(cfg, triplets, teacher)
        distill_flow(cfg, rf, prompts, teacher=teacher)
    print(f"small digits run: {time.perf_counter() - t0:.1f}s")

    client = MlflowClient(tracking_uri=tracking_uri(cfg.registration, cfg.storage))
    store = Store(cfg.storage)
    points = {  # every_steps {pretraining: 40, reflow: 20, distillation: 5}, from step 0 to the end
        Stage.PRETRAIN: [0, 40, 80, 120],
        Stage.REFLOW: [0, 20, 40, 60],
        Stage.DISTILL: [0, 5, 10, 15, 20],
    }
    first_last = {}
    for stage, steps in points.items():
        summary = json.loads(_summary(store, stage))
        run_id, curves = summary["mlflow_run_id"], summary["curves"]
        fid = history(client, run_id, MLFLOW_METRICS["fid"])
        align = history(client, run_id, MLFLOW_METRICS["clip_score"])
        # one point per step, none missing, none twice
        assert [s for s, _ in fid] == steps == [s for s, _ in align], stage
        assert [p["step"] for p in curves["points"]] == steps
        assert [v for _, v in fid] == pytest.approx([p["fid"] for p in curves["points"]])
        assert all(0.0 <= v <= 1.0 for _, v in align)  # prompt alignment: a share of images
        straight = history(client, run_id, MLFLOW_METRICS["straightness"])
        assert [s for s, _ in straight] == ([] if stage == Stage.DISTILL else steps), stage  # flows only
        share = history(client, run_id, MLFLOW_METRICS["cost_share"])
        assert len(share) == len(steps) and all(0 < v < 1 for _, v in share)
        tags = client.get_run(run_id).data.tags
        assert tags["instaflow.curves.fid_metric"] == "FD (digits classifier)"
        assert tags["instaflow.curves.clip_metric"] == "prompt alignment"
        assert tags["instaflow.curves.protocol"] == "holdout-images-200"
        assert curves["samples"] == 200 and curves["floor"] > 0
        assert 0 < curves["cost_share"] < 1 and curves["eval_s"] > 0
        # keep_best: the best point's EMA weights beside the checkpoints, named in the summary and the run
        best = curves["best"]
        assert best["value"] == pytest.approx(min(v for _, v in fid)) and best["metric"] == "fid"
        assert tags["instaflow.curves.best_step"] == str(best["step"])
        ckpt_dir = best["uri"].rsplit(f"/{BEST_DIR}/", 1)[0]
        assert json.loads(store.read_bytes(f"{ckpt_dir}/{BEST_DIR}/{BEST_FILE}"))["step"] == best["step"]
        assert [u.rsplit("/", 1)[-1] for u in store.ls(f"{ckpt_dir}/{BEST_DIR}")].count(best["weights"]) == 1
        ema = tensors_from_bytes(store.read_bytes(best["uri"]))
        last = store.read_bytes(f"{ckpt_dir}/step-{steps[-1]:09d}/ema.safetensors")
        assert set(ema) == set(tensors_from_bytes(last))  # the checkpoints' EMA format
        print(stage, [(s, round(v, 3)) for s, v in fid], f"cost share {curves['cost_share']:.3f}")
        first_last[stage] = (fid[0][1], fid[-1][1])
    # the teacher learns to draw digits: its 25-step FD falls well below the random init's
    assert first_last[Stage.PRETRAIN][1] < 0.9 * first_last[Stage.PRETRAIN][0]


def _summary(store: Store, stage: Stage) -> bytes:
    """The stage's summary.json (one run of each stage in this store)."""
    for path in store.ls(store.uri("checkpoints")):
        if path.rstrip("/").rsplit("/", 1)[-1].startswith(f"{stage}-"):
            return store.read_bytes(f"{path.rstrip('/')}/summary.json")
    raise AssertionError(stage)
