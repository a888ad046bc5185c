"""The documented multi-GPU recipes run: infra/GPU_CLUSTER.md's commands, taken from the file itself, on CPU
processes (one per "GPU", shard slices, a finishing run), against the test session's Prefect API."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

GPU_CLUSTER = REPO / "infra" / "GPU_CLUSTER.md"
COMMANDS = {"rebuild", "curate", "generate", "reflow", "distill", "evaluate", "register", "check", "triplets"}


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_every_instaflow_command_in_the_recipes_exists() -> None:
    """No module entry points that do nothing (`python -m flows.generate` exited 0 in 4 s having done nothing):
    every command line of the recipes is the `instaflow` CLI, accelerate, or a cluster tool's own."""
    text = "\n".join((REPO / "infra" / name).read_text() for name in ("GPU_CLUSTER.md", "ACCELERATE.md"))
    assert "python -m flows" not in text
    used = set(re.findall(r"\binstaflow ([a-z]+)", text))
    assert used and used <= COMMANDS, used - COMMANDS
    for module in re.findall(r"python -m ([\w.]+)", text):  # each one is a real entry point
        assert module in ("accelerate.commands.launch",), module


def test_one_run_per_gpu_recipe_on_two_cpu_processes(prefect_api, tmp_path: Path) -> None:
    """Section 1 of GPU_CLUSTER.md as written (8 GPUs -> 2 processes, the sd15 preset -> tiny on a local
    store): the slices write disjoint shards concurrently, the final `instaflow generate` finds every shard
    done and returns the complete table, with each triplet once."""
    from prefect.settings import PREFECT_API_URL

    block = next(b for b in _bash_blocks(GPU_CLUSTER.read_text()) if "--shard-slice $g/8" in b)
    store = tmp_path / "store"
    preset = (
        f"--preset tiny --set storage.root=file://{store} --set generation.max_prompts=24 "
        "--set generation.shard_size=6 --set generation.images_per_prompt=1"
    )
    script = block.replace("for g in 0 1 2 3 4 5 6 7", "for g in 0 1").replace("$g/8", "$g/2")
    script = script.replace("--preset sd15", preset)
    assert "instaflow generate --preset tiny" in script and "--shard-slice $g/2" in script
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "OMP_NUM_THREADS": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",  # the slice summary line is INFO (the test harness sets WARNING)
    }
    curate = subprocess.run(
        f"instaflow curate {preset}",
        shell=True,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert curate.returncode == 0, curate.stderr[-2000:]
    run = subprocess.run(
        ["bash", "-euc", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    logs = {g: (tmp_path / f"gen-{g}.log").read_text() for g in (0, 1)}
    assert run.returncode == 0, run.stderr[-2000:] + "\n".join(v[-1500:] for v in logs.values())
    for g, log in logs.items():
        assert f"slice {g}/2: 2 shards" in log, log[-2000:]

    from instaflow_core.config import load
    from instaflow_core.store import Store, open_table
    from tasks.lineage import latest_ref

    storage = load("tiny", [f"storage.root=file://{store}"]).storage
    triplets = latest_ref(storage, "triplets")
    ids = open_table(Store(storage), "triplets").to_arrow().column("triplet_id").to_pylist()
    assert triplets.rows == len(ids) == len(set(ids)) > 0


@pytest.mark.parametrize("name", ["GPU_CLUSTER.md", "ACCELERATE.md", "WORK_POOLS.md", "README.md"])
def test_recipes_name_no_missing_files(name: str) -> None:
    """Files the recipes point at exist in the repository (infra/fsdp.yaml is the user's own, named as such)."""
    text = (REPO / "infra" / name).read_text()
    for path in re.findall(r"`((?:flows|tasks|instaflow_core|infra)/[\w/.]+\.(?:py|yaml|md))", text):
        assert (REPO / path).exists() or path == "infra/fsdp.yaml", path
