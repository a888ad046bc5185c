"""The end-to-end rebuild: incremental by references (which stages run, which are cache hits), refresh, lineage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from instaflow_core.config import load
from instaflow_core.errors import ConfigError
from tasks.caching import prefect_settings

pytestmark = pytest.mark.slow

ALL = {"teacher", "curate", "generate", "reflow", "distill", "evaluate", "register"}

# the tiny preset, smaller still: the test is about which stages run, not about what they learn
FAST = [
    "generation.images_per_prompt=1",
    "generation.max_prompts=24",
    "generation.shard_size=12",
    "reflow.stages=[{steps: 6, batch_size: 4}]",
    "reflow.checkpoint_every=3",
    "distillation.stages=[{steps: 6, batch_size: 4}]",
    "distillation.checkpoint_every=3",
    "distillation.pairs.max_prompts=12",
    "evaluation.num_samples=4",
    "evaluation.batch_size=4",
    "evaluation.latency_repeats=1",
]


def _rebuild(root: Path, extra: list[str] = (), refresh: list[str] | None = None) -> dict:
    from flows.rebuild import rebuild_flow

    cfg = load("tiny", [f"storage.root={root}", *FAST, *extra])
    with prefect_settings(cfg.storage, cfg.orchestration):
        return rebuild_flow(cfg, refresh=refresh or [])


def _unet_digest(root: Path, uri: str) -> str:
    import hashlib

    files = sorted((root / uri.removeprefix("store://") / "unet").glob("*.safetensors"))
    assert files, uri
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def _ran(summary: dict) -> set[str]:
    assert set(summary["stages"]) == ALL, summary["stages"]
    return {s for s, state in summary["stages"].items() if state == "ran"}


def test_rebuild_is_incremental(tmp_path: Path, prefect_api: None) -> None:
    root = tmp_path / "store"
    first = _rebuild(root)
    assert _ran(first) == ALL
    reg = first["registered"]
    assert reg["version"] == "1" and "champion" in reg["aliases"]
    assert Path(first["config_uri"].removeprefix("file://")).is_file()
    assert "prompts" in first["lineage_markdown"] and "InstaFlow" in first["lineage_markdown"]
    # a later `instaflow register` (or any stage run alone) finds what this rebuild produced
    from tasks.lineage import latest_evaluation, latest_ref

    storage = load("tiny", [f"storage.root={root}"]).storage
    assert latest_evaluation(storage)["uri"] == first["evaluation"]["uri"]
    assert latest_ref(storage, "instaflow").model_dump() == first["refs"]["instaflow"]

    # the same config rebuilt from nothing in another store gives the same weights, bit for bit (shards commit
    # in whatever order their threads finish; training reads in an order fixed by the rows)
    again = _rebuild(tmp_path / "again")
    for kind in ("2rf", "instaflow"):
        theirs, ours = again["refs"][kind]["uri"], first["refs"][kind]["uri"]
        assert _unet_digest(tmp_path / "again", theirs) == _unet_digest(root, ours), kind

    # nothing changed: every stage is a cache hit, same references, no new model version
    second = _rebuild(root)
    assert _ran(second) == set()
    assert second["refs"] == first["refs"]
    assert second["registered"]["version"] == "1"

    # only the distillation config changed: distill and what depends on it run, nothing upstream
    third = _rebuild(root, ["distillation.lr=0.0004"])
    assert _ran(third) == {"distill", "evaluate", "register"}
    for name in ("prompts", "triplets", "2rf", "teacher"):
        assert third["refs"][name] == first["refs"][name]
    assert third["refs"]["instaflow"]["uri"] != first["refs"]["instaflow"]["uri"]
    assert third["registered"]["version"] == "2"

    # --refresh evaluate forces evaluate and register, and nothing before them
    fourth = _rebuild(root, ["distillation.lr=0.0004"], refresh=["evaluate"])
    assert _ran(fourth) == {"evaluate", "register"}


def test_refresh_rejects_unknown_stage() -> None:
    from instaflow_core.refs import parse_stages

    with pytest.raises(ConfigError, match="choose from"):
        parse_stages(["destill"])


def test_cli_rebuild_bad_input_is_one_line(tmp_path: Path) -> None:
    secret = "S3cr3t-must-not-leak"
    env = {
        **os.environ,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "AWS_ACCESS_KEY_ID": "AKIA-test",
        "AWS_SECRET_ACCESS_KEY": secret,
    }
    cli = [sys.executable, "-m", "flows.cli"]
    for args, needle in [
        (["rebuild", "--set", "reflow.lrr=1"], "reflow.lrr: unknown key"),
        (["rebuild", "--refresh", "destill"], "choose from"),
        (["rebuild", "--preset", "nope"], "unknown preset"),
        (
            ["rebuild", "--set", "storage.root=s3://b/x", "--set", "storage.s3_endpoint=http://127.0.0.1:9"],
            "127.0.0.1:9",
        ),
    ]:
        out = subprocess.run(cli + args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert needle in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr, out.stderr
        assert secret not in out.stderr + out.stdout


def test_summary_json_written_by_cli(tmp_path: Path) -> None:
    """`instaflow rebuild --json` from another directory (the bundled captions are found)."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    out_json = tmp_path / "summary.json"
    args = [sys.executable, "-m", "flows.cli", "rebuild", "--json", str(out_json)]
    args += ["--set", f"storage.root={tmp_path / 'store'}"]
    for item in FAST:
        args += ["--set", item]
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out_json.read_text())
    assert summary["registered"]["aliases"] == ["champion"]
    grids = [m["grid_uri"] for m in summary["evaluation"]["metrics"].values()]
    assert grids and all(
        Path(g.removeprefix("file://")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for g in grids
    )
    assert "Rebuild summary" in out.stdout and "sample grid" in out.stdout
