"""The method on a problem whose answer is known: conditional Gaussian mixtures in 2-4 dimensions.

    .venv/bin/python benchmarks/method_gmm.py [--seed 0] [--dim 2] [--json out.json]

Pipeline (all training through instaflow_core.training.train, all sampling through rectified_flow):
  1-RF     trained on independent (noise, data) pairs, t ~ U[0, 1], 10% null-class dropout (CFG-ready)
  triplets (x0, class, x1 = the 1-RF's 100-step Euler ODE output)
  2-RF     initialised from the 1-RF, reflow on the triplets
  distill  one-step students of the 1-RF and of the 2-RF: each starts from its teacher, learns that
           teacher's own ODE map (fresh pairs), the same number of steps for both
Each model: straightness (0 = straight), and the error of its 1-, 2- and N-step Euler samples against exact
samples of the mixture (sliced Wasserstein-1 per class, averaged over classes), next to the metric's noise
floor (two exact sample sets). Expected: straightness(2-RF) << 1-RF; 1-step error 2-RF << 1-RF;
distill(2-RF) better than distill(1-RF) at the limited budget (see INSTAFLOW.md on the regime).
~1-3 min on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import fields

import torch

from instaflow_core.experiments.gmm import (
    GMMSettings,
    distill_student,
    make_mixture,
    run_gmm_experiment,
    sample_error,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("-v", "--verbose", action="store_true", help="training logs")
    parser.add_argument(
        "--distill-sweep",
        default="",
        help="comma-separated distillation budgets (steps) to rerun both students at, e.g. 30,100,1000",
    )
    kinds = {"int": int, "float": float}  # the settings' annotations are strings (postponed evaluation)
    for f in fields(GMMSettings):
        if f.type in kinds:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=kinds[f.type], default=f.default)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    settings = GMMSettings(
        **{f.name: getattr(args, f.name) for f in fields(GMMSettings) if hasattr(args, f.name)}
    )

    if settings.threads:  # the sweep below runs outside run_gmm_experiment's own thread setting
        torch.set_num_threads(settings.threads)
    t0 = time.perf_counter()
    report = run_gmm_experiment(settings)
    total = time.perf_counter() - t0

    s = settings
    print(
        f"GMM dim {s.dim}, {s.num_classes} classes x {s.modes_per_class} modes; budgets: 1-RF {s.rf_steps}, "
        f"2-RF {s.reflow_steps}, distill {s.distill_steps} steps each, batch {s.batch_size}; "
        f"ODE {s.ode_steps} Euler steps; seed {s.seed}"
    )
    print(report.table())
    r = report.rows
    checks = {
        "straightness 2-RF < 1-RF / 10": r["2-RF"]["straightness"] < r["1-RF"]["straightness"] / 10,
        "1-step error 2-RF < 1-RF / 2": r["2-RF"]["err_1"] < r["1-RF"]["err_1"] / 2,
        "1-step error distill(2-RF) < distill(1-RF)": r["distill(2-RF)"]["err_1"]
        < r["distill(1-RF)"]["err_1"],
    }
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    print("seconds:", report.seconds, f"total {total:.1f}")

    sweep: dict[int, list[float]] = {}
    budgets = [int(x) for x in args.distill_sweep.split(",") if x.strip()]
    if budgets:
        # the regime: students start from their teachers, so a small budget favours the straight teacher;
        # with enough steps either student learns its teacher's map and the distillation ordering fades
        print("\n| distill steps | distill(1-RF) 1-step SW1 | distill(2-RF) 1-step SW1 |\n|---|---|---|")
        mixture = make_mixture(s.dim, s.num_classes, s.modes_per_class, s.radius, s.std, seed=s.seed)
        with tempfile.TemporaryDirectory(prefix="gmm-sweep-") as tmp:
            for steps in budgets:
                for name in ("1-RF", "2-RF"):
                    student = distill_student(
                        report.models[name], report.pairs[name], s, steps, f"{tmp}/{name}-{steps}"
                    )
                    sweep.setdefault(steps, []).append(
                        sample_error(student, mixture, 1, s.eval_per_class, s.seed)
                    )
                print(f"| {steps} | {sweep[steps][0]:.4f} | {sweep[steps][1]:.4f} |", flush=True)
    if args.json:
        out = {"settings": report.settings, "rows": report.rows, "floor": report.floor,
               "seconds": report.seconds, "checks": checks, "distill_sweep": sweep}  # fmt: skip
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
