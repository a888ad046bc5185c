"""The digits rebuild at a smaller budget (one seed): the pipeline trains its own teacher on real images and the
paper's orderings hold. A smaller version of `make demo` / benchmarks/digits.py; it asserts orderings, never
absolute numbers (the margins over seeds are in docs/what-ran.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from instaflow_core.config import load
from instaflow_core.store import Store
from tasks.caching import prefect_settings

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

# the demo's teacher (a weaker one, 600 steps, drew digits the classifier read right only ~82% of the time at 25
# steps), fewer triplets and pairs, a smaller evaluation: the orderings hold (one with a smaller margin, below)
CI_BUDGET = [
    "generation.images_per_prompt=38",
    "reflow.stages.0.steps=600",
    "distillation.pairs.images_per_prompt=25",
    "distillation.stages.0.steps=40",
    "distillation.warmup_steps=10",
    "evaluation.num_samples=600",
    "evaluation.batch_size=600",
    "evaluation.latency_repeats=1",
]


def test_digits_rebuild_trains_its_teacher_and_the_orderings_hold(tmp_path: Path, prefect_api: None) -> None:
    from flows.rebuild import rebuild_flow

    cfg = load("digits", [f"storage.root=file://{tmp_path / 'store'}", *CI_BUDGET])
    with prefect_settings(cfg.storage, cfg.orchestration):
        summary = rebuild_flow(cfg)
    assert summary["stages"]["pretrain"] == "ran"
    assert summary["refs"]["teacher"]["kind"] == "1rf"
    ev = summary["evaluation"]
    assert ev["classifier_accuracy"] >= 0.95
    assert not ev["networks"]["fid_paper_comparable"] and "not FID" in ev["networks"]["fid_features"]
    checks = {c["claim"]: c for c in ev["paper_checks"]}
    assert len(checks) == 4, checks
    # At this third of the budget the teacher is weaker (its 1-step FD ~19 vs ~9 at the demo's budget) and the
    # 2-RF's 1-step gain is ~2.8x, not the benchmark's >= 1/0.35 (which holds 3/3 seeds at the demo's budget,
    # benchmarks/digits.py): here that claim is checked as an ordering with a 2x margin, the others as claimed.
    ratio_claim = "1-step FD(2-RF) <= 0.35 x 1-step FD(1-RF)"
    failed = {k: (c["value"], c["against"]) for k, c in checks.items() if not c["holds"] and k != ratio_claim}
    assert not failed, failed
    m = ev["metrics"]
    assert m["2rf_1step"]["fid"] < 0.5 * m["1rf_1step"]["fid"], (m["2rf_1step"]["fid"], m["1rf_1step"]["fid"])
    assert (
        m["1rf_25step"]["clip_score"] > 0.9 and m["instaflow_1step"]["clip_score"] > 0.9
    )  # prompt alignment
    assert m["1rf_25step"]["fid"] > ev["floor"] * 0.9  # nothing beats real digits by much
    names = [r["model"] for r in ev["paper_table"]]
    assert names[0] == "1-RF (teacher)" and names[-1] == "real train images (floor)"
    grid = Store(cfg.storage).local_path(ev["grid"]["uri"])  # a store-relative ref (store://eval/grids/...)
    assert ev["grid"]["rows"] == ["teacher 25-step", "1-RF 1-step", "2-RF 1-step", "InstaFlow 1-step"]
    with Image.open(grid) as im:
        assert im.size[0] > 10 * 48 and im.size[1] > 4 * 48
    assert summary["registered"]["version"] == "1"
