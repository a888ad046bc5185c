"""The summary and the README's commands stay true: full sample-grid paths on any terminal width, the
registry's current aliases after a promote (not the cached register result), and `models promote NAME` right
after a rebuild whose auto-promotion already moved champion."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from instaflow_core.config import load


def _registry(tmp_path: Path, versions: int = 2):
    from tasks.tracking.client import mlflow_client

    cfg = load("tiny", [f"storage.root={tmp_path / 'store'}"])
    with mlflow_client(cfg.registration, cfg.storage) as client:
        name = cfg.registration.model_name
        client.create_registered_model(name)
        for _ in range(versions):
            client.create_model_version(name, source=(tmp_path / "m").as_uri(), tags={"metric.fid": "1.0"})
        client.set_registered_model_alias(name, "champion", "1")
    return cfg, name


def test_summary_prints_whole_paths_and_current_aliases(tmp_path, monkeypatch) -> None:
    from flows.cli import run
    from tasks.tracking.client import mlflow_client

    cfg, name = _registry(tmp_path)
    deep = tmp_path / ("very-long-folder-name-" * 6) / "eval" / "runs" / ("k" * 40) / "instaflow-1step.png"
    summary = {
        "refs": {"prompts": {"db_uri": "store://lance", "table": "prompts", "version": 3, "rows": 40}},
        "evaluation": {
            "uri": "store://eval/results/x.json",
            "metrics": {"instaflow-1step": {"grid_uri": f"file://{deep}"}},
        },
        "registered": {
            "model_name": name,
            "version": "1",
            "aliases": ["champion"],
            "tracking_uri": "sqlite:///x",
        },
        "stages": {"evaluate": "cached"},
    }
    with mlflow_client(cfg.registration, cfg.storage) as client:  # `models promote --version 2` since then
        client.set_registered_model_alias(name, "champion", "2")
    summary = run._resolved(cfg, summary)
    summary["registered"] = run._current_aliases(cfg, summary["registered"])
    assert summary["registered"]["aliases"] == []  # v1 is no longer champion, whatever the cache says
    out = io.StringIO()
    monkeypatch.setattr(run, "console", Console(file=out, width=80, force_terminal=False))
    monkeypatch.setattr("infra.stack.status", lambda: [])
    run._print_summary(cfg, summary)
    text = out.getvalue()
    assert f"sample grid instaflow-1step: {deep}" in text.splitlines()  # whole, on one line
    assert "…" not in text  # nothing cut with an ellipsis (the table folds long cells instead)
    assert "store://" not in text  # store-relative refs are shown where they are


def test_promote_right_after_auto_promotion_says_nothing_to_promote(tmp_path) -> None:
    from flows.cli.main import app

    cfg, name = _registry(tmp_path, versions=1)  # v1 champion, no candidate: what `make demo` leaves
    res = CliRunner().invoke(app, ["models", "promote", name, "--set", f"storage.root={tmp_path / 'store'}"])
    assert res.exit_code == 0, (res.output, repr(res.exception))
    assert "nothing to promote: version 1 is already champion" in res.output
