"""benchmarks/gpu_suite.py --tiny: the GPU suite's own code on tiny models on this CPU, as CI runs it.

It asserts that the suite runs, prints every row of its table and that no row errored (the torch.compile rows
are skipped by design with --tiny: dynamo's tracing alone takes minutes on a shared CPU). Never a timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

EXPECTED = {  # every row of a --tiny run on a CPU (tiny preset: batches 1/2/4, micro-batch 2, 2 steps)
    "gen": [
        *[f"{side} b{b}" for b in (1, 2, 4) for side in ("diffusers", "ours")],
        "check: relative difference",
        "switch dtype: fp16 weights",
        "switch dtype: bf16 weights",
        "switch sdpa off (classic attention)",
        "switch channels_last on",
        "switch CFG as two forwards",
        "switch VAE decode every batch",
        "switch async writer on",
        "switch compile on (teacher UNet) b2",
    ],
    "infer": [
        "sd2 b1",
        "ours b1",
        "sd2 b4",
        "ours b4",
        "switch compile on (UNet+VAE dec) b1",
        "switch sdpa off b1",
        "switch channels_last on b1",
        "switch compile on (UNet+VAE dec) b4",
    ],
    "train": [
        "plain micro 2",
        "ours micro 2",
        "switch AdamW fused",
        "switch AdamW foreach",
        "switch AdamW for-loop",
        "switch EMA per-tensor loop",
        "switch pinned prefetch on",
        "switch text-embedding cache off",
        "switch channels_last on",
        "switch sdpa off",
        *[f"{k} largest micro, {g} grad ckpt" for k in ("ours", "plain") for g in ("no", "with")],
    ],
    "family": [  # the tiny hub-shaped SDXL and FLUX.1 repos' configs (benchmarks/suite_family.py)
        "sdxl reflow step, grad ckpt",
        "flux reflow step, reduced depth, grad ckpt",
    ],
}


def test_gpu_suite_tiny_prints_every_row_without_errors(tmp_path):
    out = tmp_path / "gpu_suite.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # a budget no loaded CI machine reaches: every row runs (the suite would skip rows it has no time for)
    cmd = [sys.executable, "benchmarks/gpu_suite.py", "--tiny", "--time-budget", "1200", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    got = {sec: [r["name"] for r in rows if r["section"] == sec] for sec in EXPECTED}
    assert got == EXPECTED
    errors = [f"{r['section']} {r['name']}: {r['note']}" for r in rows if r["status"] == "error"]
    assert not errors
    skipped = [r["name"] for r in rows if r["status"] == "skipped"]
    assert all("compile" in name for name in skipped) and len(skipped) == 3
    measured = [r for r in rows if r["status"] == "ok"]
    assert all(r["value"] is not None and r["value"] >= 0 for r in measured)
    # the printed table has a line per row, and the goals
    table = proc.stdout.split("\nsection ", 1)[1]
    for r in rows:
        assert any(line.startswith(f"{r['section']:7s} {r['name'][:44]}") for line in table.splitlines()), r
    assert "goals (H100/H200 targets" in proc.stdout
    # ours and diffusers solve the same ODE from the same noise (float32 on the CPU)
    check = next(r for r in rows if r["name"] == "check: relative difference")
    assert check["value"] < 1e-4
    assert doc["meta"]["flops"]["triplet"] == 2 * 2 * doc["meta"]["flops"]["unet_forward"]
    # the family rows: the formula's bytes beside the step (no device peak on a CPU); FLUX extrapolated to its depth
    sdxl, flux = (next(r for r in rows if r["name"] == name) for name in EXPECTED["family"])
    assert (
        "formula" in sdxl["note"] and sdxl["extra"]["formula_gib"] > 0 and sdxl["extra"]["micro_batch"] == 2
    )
    assert flux["extra"]["full_params"] > flux["extra"]["params"] and flux["extra"]["flops_ratio"] > 1
