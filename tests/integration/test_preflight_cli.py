"""The preflight from the command line: `instaflow check`, and the checks `rebuild` and the stage commands run
first. A run that cannot succeed fails in seconds with every problem named, and writes nothing: no table, no
checkpoint, no MLflow run, not even the store folder or the sqlite file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO

CLI = [sys.executable, "-m", "flows.cli"]


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _instaflow(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, float]:
    full = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(REPO), **(env or {})}
    t0 = time.perf_counter()
    out = subprocess.run(CLI + args, capture_output=True, text=True, env=full, cwd=cwd, timeout=300)
    return out, time.perf_counter() - t0


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture
def work(tmp_path: Path) -> tuple[Path, Path]:
    """(an empty working directory, a caption file outside it)"""
    captions = tmp_path / "inputs" / "captions.txt"
    captions.parent.mkdir()
    captions.write_text("a photo of a cat\na red car on a street\n")
    (tmp_path / "work").mkdir()
    return tmp_path / "work", captions


def test_missing_teacher_and_lpips_without_weights_fail_in_seconds_writing_nothing(
    work, tmp_path: Path
) -> None:
    """The issue's scenario: sd15 with a teacher that is not there and the preset's lpips stage without
    weights. Both named, one line each, exit 1, nothing created, long before any GPU work would start."""
    cwd, captions = work
    args = ["rebuild", "--preset", "sd15"] + _sets(
        f"storage.root=file://{cwd / 'store'}",
        f"models.teacher={cwd / 'stable-diffusion-v1-5'}",
        f"curation.sources=[{{path: {captions}, format: txt}}]",
        f"registration.tracking_uri={cwd / 'mlflow' / 'mlflow.db'}",
        "evaluation.fid_features=tiny",
        "evaluation.clip_model=tiny",
    )
    out, seconds = _instaflow(args, cwd, {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1, out.stdout + out.stderr
    err = out.stderr
    assert "2 problems found before any work started" in err, err
    assert "models.teacher=" in err and "no such folder or file" in err
    assert "distillation.stages.1 uses loss lpips but distillation.lpips_weights is not set" in err
    assert "Traceback" not in err
    assert _tree(cwd) == [] and not (tmp_path / "hf").exists()  # no store, no sqlite, no .instaflow, no cache
    assert seconds < 60, seconds  # the interpreter and the CLI's imports; the checks take well under 5 s


def test_preflight_on_s3_writes_nothing_and_names_a_missing_bucket(work, s3_storage_cfg) -> None:
    from instaflow_core.store import Store

    cwd, captions = work
    s3 = s3_storage_cfg
    env = {s3.access_key_env: os.environ[s3.access_key_env], s3.secret_key_env: os.environ[s3.secret_key_env]}
    storage = [
        f"storage.s3_endpoint={s3.s3_endpoint}",
        f"storage.access_key_env={s3.access_key_env}",
        f"storage.secret_key_env={s3.secret_key_env}",
    ]
    ok = ["check", "--preset", "tiny"] + _sets(
        f"storage.root={s3.root}", *storage, f"registration.tracking_uri={cwd / 'm.db'}"
    )
    out, _ = _instaflow(ok, cwd, env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"all \d+ checks passed", out.stdout), out.stdout
    assert Store(s3).ls(s3.root) == [] and _tree(cwd) == []  # the write probe was deleted; no sqlite file
    bad = ["check", "--preset", "tiny"] + _sets("storage.root=s3://no-such-bucket-here/x", *storage)
    out, _ = _instaflow(bad, cwd, env)
    assert out.returncode == 1 and "no-such-bucket-here" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_stage_commands_run_their_own_checks_first(work) -> None:
    cwd, _ = work
    root = f"storage.root=file://{cwd / 'store'}"
    out, _ = _instaflow(
        ["register", "--preset", "tiny"] + _sets(root, "registration.model_name=team/model"), cwd
    )
    # refused when the config loads (the name rule is a config validator), before the stage looks for inputs
    assert out.returncode == 1 and "registration.model_name" in out.stderr and "'team/model'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "no evaluation" not in out.stderr, out.stderr
    lpips = _sets(root, "distillation.stages=[{steps: 1, batch_size: 2, loss: lpips}]")
    out, _ = _instaflow(["distill", "--preset", "tiny"] + lpips, cwd)
    assert out.returncode == 1 and "lpips_weights is not set" in out.stderr
    out, _ = _instaflow(["check", "--preset", "tiny", "--stage", "distill"] + lpips, cwd)
    assert out.returncode == 1 and "FAIL" in out.stdout and "lpips" in out.stdout
    assert _tree(cwd) == []
