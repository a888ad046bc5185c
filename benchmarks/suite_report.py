"""The printed table, the goals and the JSON of gpu_suite.py."""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from suite_harness import Row, Suite, fmt_value


def print_table(s: Suite) -> None:
    hdr = f"{'section':7s} {'row':44s} {'value':>18s} {'MFU':>6s} {'peak GiB':>8s}  {'ratio':22s} note"
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in s.rows:
        mfu = f"{100 * r.mfu:5.1f}%" if r.mfu is not None else "-"
        mem = f"{r.peak_gib:8.1f}" if r.peak_gib is not None else "-"
        ratio = f"{r.ratio:.2f}x vs {r.vs}" if r.ratio is not None else ""
        note = r.note if r.status == "ok" else f"[{r.status}] {r.note}"
        print(
            f"{r.section:7s} {r.name[:44]:44s} {fmt_value(r):>18s} {mfu:>6s} {mem:>8s}  {ratio[:22]:22s} {note}"
        )


OURS = {  # the rows that measure our path (with any fast path on), per section
    "gen": ("ours b", "switch compile on (teacher UNet)"),
    "train": ("ours micro", "ours largest micro"),
    "infer": ("ours b", "switch compile on (UNet+VAE dec)"),
}


def best(s: Suite, section: str, unit: str, batch: int | None = None) -> Row | None:
    """The fastest ok row of our path in `section` (at `batch` if given)."""
    rows = [
        r
        for r in s.rows
        if r.section == section
        and r.name.startswith(OURS[section])
        and r.status == "ok"
        and r.unit == unit
        and r.value is not None
        and (batch is None or r.extra.get("batch") == batch)
    ]
    if not rows:
        return None
    return min(rows, key=lambda r: r.value) if unit == "ms" else max(rows, key=lambda r: r.value)


def goals(s: Suite) -> list[dict[str, Any]]:
    """The issue's targets (H100/H200) against the best measured rows of our path."""
    b1 = s.preset.infer_batches[0]
    g, t, i1 = best(s, "gen", "triplets/s"), best(s, "train", "samples/s"), best(s, "infer", "ms", b1)
    gd = g and s.get("gen", f"diffusers b{g.extra.get('batch')}")
    m = s.preset.train_micro
    tr, tp = s.get("train", f"ours micro {m}"), s.get("train", f"plain micro {m}")
    sd1 = s.get("infer", f"sd{s.preset.steps} b{b1}")
    out: list[dict[str, Any]] = []

    def add(name: str, target: float, measured: float | None, how: str, higher: bool = True) -> None:
        measured = measured or None
        ok = None if measured is None else (measured >= target if higher else measured <= target)
        ratio = None if measured is None else (measured / target if higher else target / measured)
        out.append(
            {"goal": name, "target": target, "measured": measured, "ratio": ratio, "met": ok, "how": how}
        )

    add("generation triplets/s", 10, g and g.value, g.name if g else "no row")
    add("generation triplets per GPU-day", 850e3, g and g.value * 86400, "triplets/s x 86400")
    add("generation MFU", 0.50, g and g.mfu, "vs achievable peak")
    add("generation vs diffusers (same batch)", 2.0, gd and g.value / gd.value, f"vs {gd.name}" if gd else "")
    add("training samples/s at 512 px", 100, t and t.value, t.name if t else "no row")
    add("training MFU", 0.40, t and t.mfu, "model FLOPs (fwd+bwd), vs achievable peak")
    add("training vs plain loop (same micro-batch)", 1.5, tr and tp and tr.value / tp.value, f"micro {m}")
    add("one-step latency, batch 1 (ms)", 15, i1 and i1.value, i1.name if i1 else "no row", higher=False)
    add(f"one-step vs {s.preset.steps}-step SD end to end", 9.0, i1 and sd1 and sd1.value / i1.value,
        "latency ratio, batch 1")  # fmt: skip
    return out


def print_goals(s: Suite, gl: list[dict[str, Any]]) -> None:
    print(
        f"\ngoals (H100/H200 targets; this run: {s.peak['device']}, preset {s.preset.name}"
        + (", tiny CPU run: not comparable" if s.preset.name == "tiny" else "")
        + ")"
    )
    for x in gl:
        m = "-" if x["measured"] is None else f"{x['measured']:.4g}"
        r = "-" if x["ratio"] is None else f"{x['ratio']:.2f} of goal"
        met = {None: "n/a", True: "MET", False: "not met"}[x["met"]]
        print(
            f"  {x['goal']:44s} target {x['target']:<8g} measured {m:>10s}  {r:>14s}  {met:8s} ({x['how']})"
        )
    pk = s.peak
    if pk.get("spec"):
        meas = (
            f", measured 8192^3 bf16 matmul {pk['measured_matmul'] / 1e12:.0f} TFLOP/s"
            if "measured_matmul" in pk
            else ""
        )
        print(
            f"  peak: {pk['device']}: spec {pk['spec'] / 1e12:.0f} TFLOP/s, MFU against {pk['achievable'] / 1e12:.0f} "
            f"TFLOP/s ({pk['source']}){meas}"
        )
    else:
        print(f"  peak: {pk['source']}")


def print_profiles(s: Suite) -> None:
    for key, top in s.profiles.items():
        print(
            f"\nprofile {key} (top {len(top)} by self {'device' if s.device.type == 'cuda' else 'CPU'} time)"
        )
        for e in top:
            print(f"  {e['self_ms']:9.2f} ms {100 * e['share']:5.1f}% {e['calls']:6d}x  {e['name']}")


def write_json(s: Suite, gl: list[dict[str, Any]]) -> Path:
    import diffusers
    import transformers

    path = Path(s.args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "meta": {
            "preset": asdict(s.preset),
            "device": str(s.device),
            "peak": s.peak,
            "quick": s.args.quick,
            "time_budget_s": s.args.time_budget,
            "elapsed_s": time.perf_counter() - s.t0,
            "versions": {
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
            "flops": s.flops,
            "argv": sys.argv[1:],
        },
        "rows": [asdict(r) for r in s.rows],
        "goals": gl,
        "profiles": s.profiles,
    }
    path.write_text(json.dumps(doc, indent=1, default=str))
    return path


ACHIEVABLE_H100 = 790e12  # bf16 dense FLOP/s an 8192^3 matmul reaches on an H100 / H200 (the figure)


def predictions(flops: dict[str, int], peak: float = ACHIEVABLE_H100) -> dict[str, Any]:
    """What the FLOP counts predict on an H100/H200 at the goal MFUs (and the MFU each goal implies)."""
    trip, samp, one, sd = flops["triplet"], flops["train_sample"], flops["one_step_image"], flops["sd_image"]
    return {
        "peak_flops": peak,
        "generation": {"at_50pct_mfu_triplets_s": 0.5 * peak / trip, "at_50pct_mfu_per_gpu_day": 0.5 * peak / trip * 86400,
                       "floor_ms_per_triplet": 1e3 * trip / peak, "mfu_for_10_per_s": 10 * trip / peak},
        "training": {"at_40pct_mfu_samples_s": 0.4 * peak / samp, "floor_ms_per_sample": 1e3 * samp / peak,
                     "mfu_for_100_per_s": 100 * samp / peak},
        "one_step": {"floor_ms": 1e3 * one / peak, "at_50pct_mfu_ms": 1e3 * one / (0.5 * peak),
                     "mfu_for_15ms": one / 0.015 / peak, "sd_over_one_step_flops": sd / one},
    }  # fmt: skip


def print_predictions(flops: dict[str, int], pred: dict[str, Any]) -> None:
    tf = {k: v / 1e12 for k, v in flops.items()}
    g, t, o = pred["generation"], pred["training"], pred["one_step"]
    print(f"FLOPs per sample (torch FlopCounterMode): UNet forward {tf['unet_forward']:.3f} TFLOP, text encoder "
          f"{tf['text_encoder']:.4f}, VAE decode {tf['vae_decode']:.3f}, training sample (fwd+bwd) "
          f"{tf['train_sample']:.3f}; triplet (steps x 2 CFG) {tf['triplet']:.2f}, one-step image "
          f"{tf['one_step_image']:.3f}, SD image {tf['sd_image']:.2f}")  # fmt: skip
    print(f"at {pred['peak_flops'] / 1e12:.0f} TFLOP/s: generation {g['at_50pct_mfu_triplets_s']:.2f} triplets/s at 50% "
          f"MFU ({g['at_50pct_mfu_per_gpu_day'] / 1e3:.0f}k/GPU-day; 10/s needs {100 * g['mfu_for_10_per_s']:.0f}% MFU); "
          f"training {t['at_40pct_mfu_samples_s']:.0f} samples/s at 40% (100/s needs {100 * t['mfu_for_100_per_s']:.0f}%); "
          f"one-step floor {o['floor_ms']:.1f} ms, {o['at_50pct_mfu_ms']:.1f} ms at 50% (15 ms needs "
          f"{100 * o['mfu_for_15ms']:.0f}%); SD {s_steps(flops)}-step/one-step FLOPs {o['sd_over_one_step_flops']:.1f}x")  # fmt: skip


def s_steps(flops: dict[str, int]) -> int:
    return round(
        (flops["sd_image"] - 2 * flops["text_encoder"] - flops["vae_decode"]) / (2 * flops["unet_forward"])
    )
