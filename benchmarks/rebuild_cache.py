"""A rebuild with nothing changed vs a full rebuild, in one run: flow time, process wall time, and the ratio.

The goal is a no-change rebuild under 10% of a full one. Its cost is fixed (Prefect orchestration of the stage
subflows and their cached tasks, first imports, the process and its embedded Prefect API), while a full
rebuild's cost grows with the models: `--set` heavier settings to see the ratio at larger sizes.

    python benchmarks/rebuild_cache.py                       # the tiny preset
    python benchmarks/rebuild_cache.py --set reflow.stages='[{steps: 400, batch_size: 8}]'
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rebuild(root: Path, sets: list[str], out: Path) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "flows.cli", "rebuild", "--set", f"storage.root={root}", "--json", str(out)]
    for item in sets:
        cmd += ["--set", item]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"rebuild failed:\n{proc.stderr[-3000:]}")
    return wall, json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], help="config override (repeatable)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        full_wall, full = rebuild(root, args.sets, Path(tmp) / "full.json")
        again_wall, again = rebuild(root, args.sets, Path(tmp) / "again.json")
    ran = [s for s, state in again["stages"].items() if state != "cached"]
    print(f"{'':22s}{'full':>10s}{'no change':>12s}{'ratio':>9s}")
    print(
        f"{'flow time (s)':22s}{full['elapsed_s']:10.1f}{again['elapsed_s']:12.1f}"
        f"{again['elapsed_s'] / full['elapsed_s']:9.1%}"
    )
    print(f"{'process wall (s)':22s}{full_wall:10.1f}{again_wall:12.1f}{again_wall / full_wall:9.1%}")
    print(f"stages re-run by the no-change rebuild: {ran or 'none'} (goal: none, ratio < 10%)")


if __name__ == "__main__":
    main()
