"""Quality during training on the digits demo: the `eval/*` curves (evaluation.during_training) read back from the
MLflow runs of `instaflow rebuild --preset digits`, drawn as one PNG (docs/digits-curves.png) and printed as tables.

    .venv/bin/python benchmarks/digits_curves.py                      # after `make demo` (the preset's store)
    .venv/bin/python benchmarks/digits_curves.py --rebuild            # run the rebuild first, then draw
    .venv/bin/python benchmarks/digits_curves.py --set storage.root=file:///tmp/d --out /tmp/curves.png

For each training stage it takes the newest run of the experiment that has `eval/fid` points: pretraining (the
1-RF teacher at 25 Euler steps), reflow (the 2-RF at one step) and distillation (InstaFlow = distill(2-RF) at one
step, and the control distill(1-RF), told apart by the base model's kind). FD is the digits classifier's
(a digits metric, not FID) on the preset's fixed 200 samples against the held-out real digits; the dotted line
is what 200 real train images score (the floor at that sample size).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PANELS = [  # (title, stage tag, base kind, label)
    ("teacher pretraining (1-RF, 25 steps)", "pretrain", None, "1-RF teacher"),
    ("reflow (2-RF, 1 step)", "reflow", None, "2-RF"),
    ("distillation (1 step)", "distill", "2rf", "InstaFlow = distill(2-RF)"),
    ("distillation (1 step)", "distill", "1rf", "distill(1-RF) (control)"),
]
METRICS = ("fid", "clip_score", "straightness", "cost_share")


def newest_run(client: Any, exp_id: str, stage: str, base_kind: str | None) -> Any:
    """The newest run of the stage with eval/fid points (and, for distillation, the base of this kind)."""
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.`instaflow.stage` = '{stage}'", order_by=["attributes.start_time DESC"]
    )
    for run in runs:
        if base_kind and not run.data.tags.get("instaflow.base", "").startswith(f"{base_kind}:"):
            continue
        if "eval/fid" in run.data.metrics:
            return run
    return None


def read_curves(client: Any, run: Any) -> dict[str, Any]:
    from instaflow_core.evaluation.curves import MLFLOW_METRICS

    out: dict[str, Any] = {"run_id": run.info.run_id, "tags": run.data.tags}
    for name in METRICS:
        hist = client.get_metric_history(run.info.run_id, MLFLOW_METRICS[name])
        out[name] = sorted((int(m.step), float(m.value)) for m in hist)
    try:
        local = client.download_artifacts(run.info.run_id, "summary.json")
        out["summary"] = json.loads(Path(local).read_text()).get("curves") or {}
    except Exception:  # noqa: BLE001 - an unfinished run has no summary yet
        out["summary"] = {}
    return out


def draw(curves: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    titles = list(dict.fromkeys(t for t, *_ in PANELS))
    fig, axes = plt.subplots(1, len(titles), figsize=(4.2 * len(titles), 3.4), constrained_layout=True)
    ylabel = next((c["tags"].get("instaflow.curves.fid_metric") for c in curves.values()), "FD")
    for ax, title in zip(axes, titles, strict=True):
        floor = None
        for t, _, _, label in PANELS:
            c = curves.get(label)
            if t != title or c is None:
                continue
            steps, values = zip(*c["fid"], strict=True)
            ax.plot(steps, values, marker="o", ms=3, label=label, ls="--" if "control" in label else "-")
            floor = c["summary"].get("floor") or floor
        if floor:
            ax.axhline(floor, color="grey", ls=":", lw=1, label=f"real train images (floor, {floor:.2f})")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"{ylabel} (log)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    samples = next((c["tags"].get("instaflow.curves.samples") for c in curves.values()), "?")
    fig.suptitle(
        f"digits demo: quality of the EMA weights during training ({samples} fixed samples, MLflow eval/fid)",
        fontsize=10,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def table(curves: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for label, c in curves.items():
        names = c["tags"]
        lines += [
            "",
            f"{label} (MLflow run {c['run_id'][:8]}, {names.get('instaflow.curves.setting')}, "
            f"evaluations {100 * float(names.get('instaflow.curves.cost_share', 'nan')):.1f}% of the stage's time)",
            "",
            "| step | " + f"{names.get('instaflow.curves.fid_metric', 'FD')} | "
            f"{names.get('instaflow.curves.clip_metric', 'CLIP')} | straightness |",
            "|---|---|---|---|",
        ]
        align, straight = dict(c["clip_score"]), dict(c["straightness"])
        for step, fd in c["fid"]:
            s = f"{straight[step]:.5f}" if step in straight else ""
            lines.append(f"| {step} | {fd:.3f} | {align.get(step, float('nan')):.3f} | {s} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="config override (k=v)")
    parser.add_argument("--rebuild", action="store_true", help="run `instaflow rebuild` first")
    parser.add_argument("--out", default=str(REPO / "docs" / "digits-curves.png"))
    parser.add_argument("--json", default=None, help="also write the curves as JSON here")
    args = parser.parse_args()

    if args.rebuild:
        cmd = [sys.executable, "-m", "flows.cli", "rebuild", "--preset", args.preset]
        for s in args.sets:
            cmd += ["--set", s]
        subprocess.run(cmd, cwd=REPO, check=True)

    from mlflow import MlflowClient

    from instaflow_core.config import load
    from tasks.tracking.client import tracking_uri

    cfg = load(args.preset, args.sets)
    client = MlflowClient(tracking_uri=tracking_uri(cfg.registration, cfg.storage))
    exp = client.get_experiment_by_name(cfg.registration.experiment)
    if exp is None:
        raise SystemExit(
            f"no MLflow experiment {cfg.registration.experiment!r}: run `make demo` first (or --rebuild)"
        )
    curves = {}
    for _, stage, kind, label in PANELS:
        run = newest_run(client, exp.experiment_id, stage, kind)
        if run is not None:
            curves[label] = read_curves(client, run)
    if not curves:
        raise SystemExit(
            "no training run with eval/* curves: set evaluation.during_training (the digits preset does) and "
            "rebuild into a fresh store (a cached stage does not train again)"
        )
    draw(curves, Path(args.out))
    print("\n".join(table(curves)))
    if args.json:
        Path(args.json).write_text(
            json.dumps({k: {m: c[m] for m in (*METRICS, "run_id")} for k, c in curves.items()})
        )


if __name__ == "__main__":
    main()
