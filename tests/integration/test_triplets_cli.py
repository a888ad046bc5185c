"""`instaflow triplets query|search|stats|export|show` on a small triplets table (file:// and S3).

The table is written here with the generation stage's own schema and row builder (random latents), so these
tests do not need a teacher run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from instaflow_core.config import StorageConfig
from instaflow_core.curation.prompts import prompt_id
from instaflow_core.errors import DataError
from instaflow_core.generation.triplets import SolverSpec, build_rows, expand_jobs, triplet_schema
from instaflow_core.store import Store, create_table, merge_rows, open_table
from instaflow_core.store.query import (
    EMBEDDING_COLUMN,
    embed_prompts,
    ensure_indexes,
    query_rows,
    search_text,
    search_vector,
    table_stats,
)
from tests.support import REPO

ROOT = REPO
SHAPE = (4, 8, 8)  # the tiny teacher's latents
SOLVER = SolverSpec(scheduler="dpmsolver++", steps=4, guidance=5.0)
TEXTS = [
    "a red car on a street",
    "a blue boat at sea",
    "a cat sleeping on a red sofa",
    "a lighthouse at sunset",
    "a bowl of fruit on a table",
    "a dog running in the park",
]


def _sets(storage: StorageConfig) -> list[str]:
    out = []
    for k, v in storage.model_dump(mode="json").items():
        if v is not None:
            out += ["--set", f"storage.{k}={v}"]
    return out


def _make_table(storage: StorageConfig, with_embedding: bool = False, name: str = "triplets") -> dict:
    """12 rows from run-a (teacher tiny-a) + 6 rows from run-b (teacher tiny-b), in two merges."""
    store = Store(storage)
    schema = triplet_schema(SHAPE)
    emb = None
    if with_embedding:
        from instaflow_core.models.sd import build_tiny

        model = build_tiny()
        emb = dict(zip(TEXTS, embed_prompts(model["text_encoder"], model["tokenizer"], TEXTS), strict=True))
        schema = schema.append(pa.field(EMBEDDING_COLUMN, pa.list_(pa.float32(), emb[TEXTS[0]].shape[0])))
    table = create_table(store, name, schema)
    rng = np.random.default_rng(0)
    for run, teacher, n_img in (("run-a", "tiny-a", 2), ("run-b", "tiny-b", 1)):
        jobs = expand_jobs(
            [(prompt_id(t), t) for t in TEXTS],
            images_per_prompt=n_img,
            base_seed=0,
            teacher=teacher,
            solver=SOLVER,
        )
        x1 = rng.standard_normal((len(jobs), *SHAPE)).astype(np.float32)
        rows = build_rows(
            jobs, x1, schema=triplet_schema(SHAPE), teacher=teacher, solver=SOLVER, shard=0, run_id=run
        )
        if emb is not None:
            vecs = np.stack([emb[j.prompt] for j in jobs])
            rows = rows.append_column(
                EMBEDDING_COLUMN, pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), vecs.shape[1])
            )
        data_version = merge_rows(table, rows, on="triplet_id")
    ensure_indexes(table)
    return {"store": store, "table": open_table(store, name), "data_version": data_version}


@pytest.fixture(scope="module")
def runner():
    from flows.cli.main import app

    return lambda args: CliRunner().invoke(app, args, catch_exceptions=True, env={"COLUMNS": "200"})


# ------------------------------------------------------------------------------------------- core helpers
def test_indexes_query_search_stats(local_storage_cfg):
    t = _make_table(local_storage_cfg)["table"]
    names = {ix.name for ix in t.list_indices()}
    assert {"prompt_id_idx", "run_id_idx", "teacher_idx"} <= names and "triplet_id_idx" not in names
    assert ensure_indexes(t) == []  # current: nothing to do

    rows = query_rows(t, "teacher = 'tiny-b'", limit=100)
    assert rows.num_rows == 6 and "x1" not in rows.column_names
    with pytest.raises(DataError, match=r"^bad --where filter 'seed >': .*") as e:
        query_rows(t, "seed >")
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="unknown column"):
        query_rows(t, None, columns=["nope"])

    hits, how = search_text(t, "red", limit=50)
    assert how == "fts" and set(hits.column("prompt").to_pylist()) == {TEXTS[0], TEXTS[2]}
    assert "_score" in hits.column_names
    # an old version has no FTS index: substring fallback, same answer
    old, how = search_text(open_table(Store(local_storage_cfg), "triplets", 2), "red", limit=50)
    assert how == "substring" and set(old.column("prompt").to_pylist()) == {TEXTS[0], TEXTS[2]}

    with pytest.raises(DataError, match="no prompt embedding column"):
        search_vector(t, np.zeros(32))

    s = table_stats(Store(local_storage_cfg), "triplets")
    assert s["rows"] == 18 and s["per_teacher"] == [("tiny-a", 12), ("tiny-b", 6)]
    assert dict(s["per_run"]) == {"run-a": 12, "run-b": 6}
    assert s["disk_bytes"] >= s["data_bytes"] > 18 * 64 * 2
    assert [v["version"] for v in s["versions"]][-1] == s["version"]


def test_vector_search_finds_the_prompt(local_storage_cfg):
    t = _make_table(local_storage_cfg, with_embedding=True)["table"]
    from instaflow_core.models.sd import build_tiny

    model = build_tiny()
    vec = embed_prompts(model["text_encoder"], model["tokenizer"], ["a lighthouse at sunset"])[0]
    hits = search_vector(t, vec, limit=3)
    assert hits.column("prompt").to_pylist() == ["a lighthouse at sunset"] * 3
    assert hits.column("_distance").to_pylist()[0] < 1e-4
    with pytest.raises(DataError, match="has 5 values"):
        search_vector(t, np.zeros(5))


# ------------------------------------------------------------------------------------------- the CLI
def test_cli_query_search_stats_export_show(local_storage_cfg, runner, tmp_path):
    made = _make_table(local_storage_cfg)
    sets = _sets(local_storage_cfg)

    r = runner(["triplets", "query", "--where", "teacher = 'tiny-b'", "-n", "3", *sets])
    assert r.exit_code == 0, r.output
    assert "3 row(s)" in r.output and "tiny-b" in r.output and "<256 values>" not in r.output

    r = runner(["triplets", "query", "-n", "2", "--json", "-c", "triplet_id,x1,latent_shape", *sets])
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert len(lines) == 2 and len(lines[0]["x1"]) == 256 and lines[0]["latent_shape"] == [4, 8, 8]

    r = runner(["triplets", "search", "sofa", *sets])
    assert r.exit_code == 0 and "a cat sleeping on a red sofa" in r.output and "3 row(s)" in r.output

    r = runner(["triplets", "search", "--vector-from", "a red car", *sets])
    assert r.exit_code == 1 and "no prompt embedding column" in str(r.exception)

    r = runner(["triplets", "stats", "--json", *sets])
    s = json.loads(r.stdout)
    assert s["rows"] == 18 and dict(s["per_teacher"]) == {"tiny-a": 12, "tiny-b": 6}
    r = runner(["triplets", "stats", *sets])
    assert "per teacher" in r.output and "tiny-a: 12" in r.output and "versions" in r.output

    dest = tmp_path / "out" / "t.parquet"
    r = runner(
        ["triplets", "export", "--format", "parquet", "--dest", str(dest), "-w", "teacher = 'tiny-a'", *sets]
    )
    assert r.exit_code == 0, r.output
    assert "wrote 12 rows" in r.output.replace(",", "")
    pf = pq.ParquetFile(dest)
    assert pf.metadata.num_rows == 12 and "x1" in pf.schema_arrow.names
    assert pf.schema_arrow.metadata[b"instaflow.table"] == b"triplets"
    old_version = made["data_version"]  # before the indexes were made
    r = runner(["triplets", "export", "-V", str(old_version), *sets])
    assert r.exit_code == 0 and f"triplets-v{old_version}.parquet" in r.output

    ids = made["table"].search().select(["triplet_id"]).limit(3).to_arrow().column(0).to_pylist()
    out = tmp_path / "grid.png"
    r = runner(["triplets", "show", *ids, "--out", str(out), *sets])
    assert r.exit_code == 0, r.output
    from PIL import Image

    img = Image.open(out)
    assert img.width > 3 * 16 and img.height > 16  # three decoded 16x16 images, upscaled, with captions
    r = runner(
        ["triplets", "show", "--where", "prompt LIKE '%boat%'", "--out", str(tmp_path / "g2.png"), *sets]
    )
    assert r.exit_code == 0 and "wrote 3 image(s)" in r.output


def test_cli_vector_search(local_storage_cfg, runner):
    _make_table(local_storage_cfg, with_embedding=True)
    r = runner(
        [
            "triplets",
            "search",
            "--vector-from",
            "a blue boat at sea",
            "-n",
            "2",
            "--json",
            *_sets(local_storage_cfg),
        ]
    )
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert [x["prompt"] for x in rows] == ["a blue boat at sea"] * 2 and EMBEDDING_COLUMN not in rows[0]


def test_json_stays_on_stdout_while_something_else_prints(local_storage_cfg, runner, monkeypatch):
    """`--json` output is for a pipe (`| jq`): whatever else prints while the command runs (a library's warning,
    a Ray raylet's disk-space line forwarded to a connected driver) goes to stderr and leaves stdout parseable."""
    import logging
    import sys as _sys

    from instaflow_core.store import query

    _make_table(local_storage_cfg)
    real = query.table_stats

    def noisy(*args, **kwargs):
        print("(raylet) file_system_monitor.cc:116: /tmp/ray is over 95% full", file=_sys.stderr)
        logging.getLogger("instaflow").warning("a warning while the stats are read")
        return real(*args, **kwargs)

    monkeypatch.setattr(query, "table_stats", noisy)
    r = runner(["triplets", "stats", "--json", *_sets(local_storage_cfg)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rows"] == 18
    assert "over 95% full" in r.stderr and "over 95% full" not in r.stdout


def test_cli_user_mistakes_are_one_line(local_storage_cfg, tmp_path):
    """Run the real console script: a bad filter or a missing table prints one line and exits 1."""
    exe = Path(sys.executable).with_name("instaflow")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]
    env = {**os.environ, "COLUMNS": "120"}
    sets = _sets(local_storage_cfg)
    r = subprocess.run(
        [*cmd, "triplets", "query", *sets], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert r.returncode == 1
    err = [x for x in r.stderr.splitlines() if x.strip() and "WARN" not in x]
    root = Store(local_storage_cfg).local_path(local_storage_cfg.root)
    assert err == [f"error: no store at {root}: run `instaflow rebuild` (or point storage.root at one)"]
    assert not root.exists()  # a read command never creates the store

    root.mkdir(parents=True)
    r = subprocess.run(
        [*cmd, "triplets", "query", *sets], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    err = [x for x in r.stderr.splitlines() if x.strip() and "WARN" not in x]
    assert r.returncode == 1 and err == [
        f"error: no table 'triplets' in {Store(local_storage_cfg).uri('lance')}: run `instaflow generate` first (tables here: none)"
    ]

    _make_table(local_storage_cfg)
    r = subprocess.run(
        [*cmd, "triplets", "query", "--where", "seed >>> 3", *sets],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    err = [x for x in r.stderr.splitlines() if x.strip() and "WARN" not in x]
    assert r.returncode == 1 and len(err) == 1 and err[0].startswith("error: bad --where filter 'seed >>> 3'")
    assert "Traceback" not in r.stderr


@pytest.mark.s3
def test_cli_on_s3(s3_storage_cfg, runner, tmp_path):
    made = _make_table(s3_storage_cfg)
    sets = _sets(s3_storage_cfg)
    r = runner(["triplets", "query", "-w", "run_id = 'run-a'", "-n", "100", "--json", *sets])
    assert r.exit_code == 0, r.output
    assert len(r.stdout.strip().splitlines()) == 12
    r = runner(["triplets", "search", "lighthouse", "--json", *sets])
    assert r.exit_code == 0 and len(r.stdout.strip().splitlines()) == 3
    s = json.loads(runner(["triplets", "stats", "--json", *sets]).stdout)
    assert s["rows"] == 18 and s["uri"].startswith("s3://") and s["disk_bytes"] >= s["data_bytes"] > 0
    r = runner(["triplets", "export", *sets])
    assert r.exit_code == 0, r.output
    dest = made["store"].uri("exports", f"triplets-v{s['version']}.parquet")
    data = made["store"].read_bytes(dest)
    assert pq.read_table(pa.BufferReader(data)).num_rows == 18
    ids = made["table"].search().select(["triplet_id"]).limit(2).to_arrow().column(0).to_pylist()
    out = made["store"].uri("previews", "grid.png")
    r = runner(["triplets", "show", *ids, "--out", out, *sets])
    assert r.exit_code == 0, r.output
    assert made["store"].read_bytes(out)[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_decodes_with_the_teacher_recorded_in_the_table(local_storage_cfg, runner, tmp_path):
    """The latents were made by the table's teacher: `show` decodes with its VAE, not with models.teacher."""
    import torch
    from PIL import Image

    from instaflow_core.config import TinyModelConfig
    from instaflow_core.inference.images import decode_latents, image_grid
    from instaflow_core.models.sd import build_tiny
    from instaflow_core.store import from_tensor_column, set_metadata
    from instaflow_core.store.query import rows_by_id

    made = _make_table(local_storage_cfg)
    other = build_tiny(TinyModelConfig(seed=7))  # not the configured teacher (seed 0)
    folder = other.save(tmp_path / "teacher-seed7")
    set_metadata(made["table"], {"teacher_uri": str(folder)})
    ids = made["table"].search().select(["triplet_id"]).limit(2).to_arrow().column(0).to_pylist()
    out = tmp_path / "grid.png"
    r = runner(["triplets", "show", *ids, "--out", str(out), "--cols", "2", *_sets(local_storage_cfg)])
    assert r.exit_code == 0, r.output

    rows = rows_by_id(open_table(made["store"], "triplets"), ids, ["triplet_id", "prompt", "x1"])
    x1 = torch.from_numpy(from_tensor_column(rows.column("x1"), SHAPE).astype(np.float32))
    captions = rows.column("prompt").to_pylist()

    def grid(model) -> np.ndarray:
        with torch.inference_mode():
            return image_grid(decode_latents(model, x1), 2, captions=captions, min_side=128, background=255)

    got = np.asarray(Image.open(out).convert("RGB"))
    assert np.array_equal(got, grid(other))
    assert not np.array_equal(got, grid(build_tiny()))
