"""Garbage never replaces data: garbage, empty, binary, mis-encoded and wrong-schema caption sources are refused
(one line, exit 1 at the CLI) and the prompts table keeps its version and rows; a mostly-good file is accepted and
its drop counts reach the terminal. Also the one-line errors of commands that never reach a flow."""

from __future__ import annotations

import gzip
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from instaflow_core.config import CaptionSource, load
from instaflow_core.errors import DataError
from instaflow_core.store import Store, list_versions, open_table
from tasks.caching import prefect_settings
from tests.support import REPO

GOOD = "\n".join(f"a photo of a {c} {n} on a table" for c in ("red", "blue", "green") for n in ("cup", "car"))


def _bad_inputs(folder: Path, rng: random.Random) -> dict[str, tuple[dict, str]]:
    """name -> (caption source, what the refusal must say)."""
    folder.mkdir(parents=True, exist_ok=True)

    def write(name: str, data: bytes) -> str:
        (folder / name).write_bytes(data)
        return str(folder / name)

    noise = rng.randbytes(2 << 20)  # 2 MB of random bytes (the 50 MB file fails the same way)
    # 120 good captions (more than batch_rows: the staging table is used), then garbage the 1 KiB sniff misses
    lines = "".join(f"a photo of object number {i} on a table\n" for i in range(120)).encode()
    text_then_noise = lines + rng.randbytes(400 << 10)
    latin1 = "\n".join(f"caf\xe9 cr\xe8me num\xe9ro {i} sur la table" for i in range(200)).encode("latin-1")
    png = b"\x89PNG\r\n\x1a\n" + rng.randbytes(5000)
    pq.write_table(pa.table({"caption": ["a cat on a sofa"] * 5}), folder / "wrong_column.parquet")
    pq.write_table(pa.table({"TEXT": [1, 2, 3]}), folder / "not_text.parquet")
    return {
        "random bytes": ({"path": write("noise.txt", noise)}, "not a text caption file: binary data"),
        "text then garbage": ({"path": write("mixed.txt", text_then_noise)}, "max_bad_fraction"),
        "empty file": ({"path": write("empty.txt", b"")}, "hold no rows"),
        "disguised gzip": ({"path": write("gz.txt", gzip.compress(GOOD.encode()))}, "gzip-compressed"),
        "PNG image": ({"path": write("img.jsonl", png)}, "a PNG image"),
        "mis-encoded (Latin-1)": ({"path": write("latin1.txt", latin1)}, "max_bad_fraction"),
        "wrong column": ({"path": str(folder / "wrong_column.parquet")}, "no column 'TEXT'"),
        "non-text column": ({"path": str(folder / "not_text.parquet")}, "not text"),
        "JSONL without the field": (
            {"path": write("nofield.jsonl", b'{"url": "x"}\n{"url": "y"}\n'), "column": "caption"},
            "no field 'caption'",
        ),
    }


def _cfg(root: Path, source: dict, *sets: str):
    cfg = load("tiny", [f"storage.root={root}", "curation.batch_rows=50", *sets])
    cfg.curation.sources = [CaptionSource(**source)]
    return cfg


def _snapshot(root: Path) -> tuple[int, list[str], list[str]]:
    store = Store(f"file://{root}")
    table = open_table(store, "prompts")
    ids = sorted(table.to_arrow().column("prompt_id").to_pylist())
    return len(list_versions(store, "prompts")), ids, sorted(store.db().list_tables().tables)


def test_bad_sources_never_replace_the_prompts_table(prefect_api, tmp_path, faults) -> None:
    from flows.curate import curate_flow

    root = tmp_path / "store"
    good = tmp_path / "good.txt"
    good.write_text(GOOD + "\n")
    cfg = _cfg(root, {"path": str(good)})
    with prefect_settings(cfg.storage, cfg.orchestration):
        ref = curate_flow(cfg)
    before = _snapshot(root)
    assert ref.rows == len(before[1]) == 6
    for name, (source, needle) in _bad_inputs(tmp_path / "bad", random.Random(14)).items():
        bad = _cfg(root, source)
        with pytest.raises(DataError, match=needle.replace("(", r"\(").replace(")", r"\)")) as info:
            with prefect_settings(bad.storage, bad.orchestration):
                curate_flow(bad)
        assert "\n" not in str(info.value), name
        after = _snapshot(root)
        lost = len(set(before[1]) - set(after[1]))
        faults.record(
            "test_bad_input", f"bad source: {name}", 1, expected=len(before[1]), lost=lost, note="refused"
        )
        assert after == before, f"{name}: the prompts table moved or a staging table was left behind"


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
    )


def _one_line(out: subprocess.CompletedProcess, needle: str) -> str:
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert out.returncode == 1, (out.returncode, out.stdout[-2000:], out.stderr[-3000:])
    assert len(errors) == 1 and needle in errors[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    return errors[0]


def test_cli_errors_inside_flows_are_one_line(prefect_api, children, tmp_path, faults) -> None:
    """`instaflow curate` on an empty file, on random bytes, with a missing teacher folder: one `error:` line
    (no Prefect traceback: those go to the run's log file, which the line names); on a mostly-good file with
    bad rows the counts per reason are printed."""
    from prefect.settings import PREFECT_API_URL

    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PYTHONPATH": str(REPO),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    root = tmp_path / "store"
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.txt"
    noise.write_bytes(random.Random(3).randbytes(1 << 20))
    mostly = tmp_path / "mostly.txt"
    extra = "".join(f"a drawing of house number {i} at night\n" for i in range(12))
    mostly.write_bytes((GOOD + "\n" + extra).encode() + b"caf\xe9 bad line\n" + b"nul \x00 line\n")

    def curate(path: Path, *sets: str):
        args = ["curate", "--set", f"storage.root={root}", "--set", f"curation.sources=[{{path: '{path}'}}]"]
        for s in sets:
            args += ["--set", s]
        return children.run_cli(args, env, tmp_path / "cli")

    ok = curate(mostly)
    assert ok.returncode == 0, ok.stderr[-3000:]
    # the counts per reason reach the terminal (they used to live only in an artifact)
    assert "curation: read 20, kept 18;" in ok.stdout and "bad rows: bad_encoding 1, nul_bytes 1" in ok.stdout
    versions = len(list_versions(Store(f"file://{root}"), "prompts"))

    line = _one_line(curate(empty), "hold no rows")
    assert "full log:" in line
    log = Path(line.rsplit("full log: ", 1)[1].rstrip(")"))
    assert log.is_file() and "Traceback" in log.read_text()  # the chain is in the file, not on screen
    _one_line(curate(noise), "binary data")
    # a missing teacher is the preflight's: one header line, then one line per problem, before any work
    missing = curate(mostly, "models.teacher=/nonexistent/teacher")
    head = _one_line(missing, "1 problem found before any work started")
    assert "/nonexistent/teacher" in missing.stderr.split(head, 1)[1].splitlines()[1], missing.stderr[-3000:]
    assert len(list_versions(Store(f"file://{root}"), "prompts")) == versions
    faults.record("test_bad_input", "CLI: empty / binary / missing teacher", 3, note="one error line each")


def test_cli_mistakes_outside_flows_are_one_line(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    reg = ["--set", f"registration.tracking_uri={tmp_path / 'mlflow.db'}"]
    _one_line(
        _cli(["models", "list", "--name", "../../etc", *reg], env, tmp_path), "not a registered model name"
    )
    _one_line(_cli(["lineage", "../../etc@champion", *reg], env, tmp_path), "not a registered model name")
    bad_ep = ["--set", "storage.root=s3://b/x", "--set", "storage.s3_endpoint=localhost:8333"]
    _one_line(_cli(["triplets", "stats", *bad_ep], env, tmp_path), "storage.s3_endpoint")
    _one_line(_cli(["rebuild", *bad_ep], env, tmp_path), "storage.s3_endpoint")
    assert not (tmp_path / "mlflow.db").exists()  # reads never create a registry
