"""Beyond the paper on digits: the same table for each training recipe later work proposed, over seeds, through
the real pipeline (each recipe is config: `instaflow rebuild --preset digits --set reflow.t_schedule=u_shaped`).

    .venv/bin/python benchmarks/digits_recipes.py [--seeds 0 1 2] [--recipes all] [--jobs 1] [--out DIR]

Recipes (per stage, in config):
  paper          uniform t, L2, the 2-RF initialised from the teacher (the InstaFlow paper)
  u_shaped       2-rectified flow++ (NeurIPS 2024): U-shaped timesteps for reflow (`reflow.t_schedule=u_shaped`)
  logit_normal   SD3's logit-normal timesteps for reflow (`reflow.t_schedule=logit_normal`)
  pseudo_huber   2-rectified flow++'s pseudo-Huber loss for reflow and distillation (`stages.*.loss=pseudo_huber`)
  scratch        the 2-RF trained from fresh weights instead of the teacher's (`reflow.init_from=scratch`)
Not run: LPIPS-Huber (2-RF++'s distillation loss) needs the LPIPS VGG weights, which this machine cannot get,
and LPIPS on 8x8 digits would not be perceptual anyway; `distillation.stages.*.loss=lpips` with
`distillation.lpips_weights=tiny` runs the code path with the project's random stand-in (not a metric).

The stores of benchmarks/digits.py are reused (--out): the teacher and its triplets are cache hits, so each
recipe costs its reflow, its distillations and the evaluation only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import REPO, load_summaries, mean_spread, report, run_all  # noqa: E402

RECIPES: dict[str, tuple[str, list[str]]] = {
    "paper": ("paper: uniform t, L2, 2-RF from the teacher", []),
    "u_shaped": ("U-shaped t for reflow (2-RF++)", ["reflow.t_schedule=u_shaped"]),
    "logit_normal": ("logit-normal t for reflow (SD3)", ["reflow.t_schedule=logit_normal"]),
    "pseudo_huber": (
        "pseudo-Huber loss, reflow + distillation (2-RF++)",
        ["reflow.stages.0.loss=pseudo_huber", "distillation.stages.0.loss=pseudo_huber"],
    ),
    "scratch": ("2-RF trained from scratch", ["reflow.init_from=scratch"]),
    # the paper's control at a longer distillation budget than the preset's 40 steps (the preset's earlier default)
    "distill_100": (
        "distillation (InstaFlow and the control) at 100 steps",
        ["distillation.stages.0.steps=100", "distillation.warmup_steps=25"],
    ),
}


def _metric(summary: dict, name: str, key: str = "fid") -> float:
    return float(summary["evaluation"]["metrics"][name][key])


def comparison(results: dict[str, list[dict]]) -> list[str]:
    """One line per recipe: the numbers a recipe can change (mean ± std over seeds)."""
    lines = [
        "| recipe | straightness 2-RF | 2-RF FD 1 step | 2-RF FD 2 steps | 2-RF FD 25 steps | InstaFlow FD 1 step "
        "| distill(1-RF) FD 1 step | InstaFlow alignment | claims held |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, runs in results.items():
        held = sum(c["holds"] for r in runs for c in r["evaluation"]["paper_checks"])
        total = sum(len(r["evaluation"]["paper_checks"]) for r in runs)
        lines.append(
            f"| {RECIPES[key][0]} | {mean_spread([_metric(r, '2rf_1step', 'straightness') for r in runs], 4)} | "
            f"{mean_spread([_metric(r, '2rf_1step') for r in runs])} | {mean_spread([_metric(r, '2rf_2step') for r in runs])} | "
            f"{mean_spread([_metric(r, '2rf_25step') for r in runs])} | {mean_spread([_metric(r, 'instaflow_1step') for r in runs])} | "
            f"{mean_spread([_metric(r, 'control_1step') for r in runs])} | "
            f"{mean_spread([_metric(r, 'instaflow_1step', 'clip_score') for r in runs])} | {held}/{total} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipes", default="all", help="'all' or comma-separated: " + ",".join(RECIPES))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / ".instaflow" / "bench-digits"))
    ap.add_argument("--aggregate-only", action="store_true")
    a = ap.parse_args()
    names = list(RECIPES) if a.recipes == "all" else a.recipes.split(",")
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}: choose from {list(RECIPES)} or 'all'")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not a.aggregate_only:
        # seeds first within a recipe, recipes in order: a seed's teacher and triplets are built once
        run_all([(s, RECIPES[n][1], n) for n in names for s in a.seeds], out, min(a.jobs, len(a.seeds)))
    results = {n: load_summaries(out, n) for n in names}
    results = {n: r for n, r in results.items() if r}
    if not results:
        raise SystemExit(f"no results in {out}")
    print("## recipes on digits (mean ± std over seeds)\n")
    print("\n".join(comparison(results)))
    for n, runs in results.items():
        print("\n" + report(runs, RECIPES[n][0]))


if __name__ == "__main__":
    main()
