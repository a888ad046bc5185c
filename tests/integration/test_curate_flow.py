"""Stage 1 end to end: curate_flow writes the prompts table (file:// and S3), caches, never half-writes."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.curate import curate_flow
from instaflow_core.config import InstaflowConfig, StorageConfig, load
from instaflow_core.curation.prompts import prompt_id, whitespace_counter
from instaflow_core.curation.stage import PROMPTS_TABLE, curate_into_table
from instaflow_core.errors import DataError
from instaflow_core.store import Store, get_metadata, list_versions, open_table
from tasks.caching import prefect_settings


def _cfg(storage: StorageConfig, sources: list[dict], **curation) -> InstaflowConfig:
    cfg = load("tiny")
    data = cfg.model_dump(mode="json")
    data["storage"] = storage.model_dump(mode="json")
    data["curation"].update(sources=sources, **curation)
    return InstaflowConfig.model_validate(data)


def _run(cfg: InstaflowConfig):
    with prefect_settings(cfg.storage, cfg.orchestration):
        return curate_flow(cfg)


def _rows(storage: StorageConfig) -> list[dict]:
    return open_table(Store(storage), PROMPTS_TABLE).to_arrow().sort_by("prompt_id").to_pylist()


def _artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return sorted(arts, key=lambda a: a.created)[-1] if arts else None


def test_curate_flow_local_cache_and_source_change(prefect_api, local_storage_cfg, tmp_path):
    src = tmp_path / "caps.txt"
    src.write_text(
        "a red car on a street\nA red car on a street!\na cat on a sofa\nnsfw thing\n\nbad \x00 nul\n"
    )
    cfg = _cfg(local_storage_cfg, [{"path": str(src), "format": "auto"}], holdout_fraction=0.5)
    ref = _run(cfg)
    assert ref.table == "prompts" and ref.rows == 2 and ref.config_hash == cfg.section_hash("curation")
    rows = _rows(local_storage_cfg)
    assert {r["text"] for r in rows} == {"a red car on a street", "a cat on a sofa"}
    assert all(r["prompt_id"] == prompt_id(r["text"]) and r["n_tokens"] >= 3 for r in rows)
    assert {r["source"] for r in rows} == {str(src)}

    # lineage in the table metadata; the two keyed artifacts
    meta = get_metadata(open_table(Store(local_storage_cfg), "prompts"))
    assert meta["config_hash"] == cfg.section_hash("curation") and meta["tokenizer"].startswith("tiny-clip")
    assert json.loads(meta["sources"])[0]["path"] == str(src)
    report = json.loads(meta["report"])
    assert report["dropped"] == {"near_duplicate": 1, "blocklist": 1, "empty": 1}
    assert report["bad_rows"] == {"nul_bytes": 1}
    table_art = _artifact("instaflow-curate-report")
    assert table_art is not None and table_art.type == "table"
    counts = {r["reason"]: r["count"] for r in json.loads(table_art.data)}
    assert counts["near_duplicate"] == 1 and counts["nul_bytes"] == 1 and counts["kept"] == 2
    md = _artifact("instaflow-curate")
    assert md is not None and "prompts@v" in md.data and str(src) in md.data

    # unchanged inputs: a cache hit (same ref, no new table version)
    n_versions = len(list_versions(Store(local_storage_cfg), "prompts"))
    assert _run(cfg) == ref
    assert len(list_versions(Store(local_storage_cfg), "prompts")) == n_versions

    # a changed source file recomputes; the merge adds the new prompt and no duplicates
    src.write_text(src.read_text() + "a blue boat at sea\n")
    st = src.stat()
    os.utime(src, (st.st_atime, st.st_mtime + 5))
    ref2 = _run(cfg)
    assert ref2.version > ref.version and ref2.rows == 3
    rows2 = _rows(local_storage_cfg)
    assert len({r["prompt_id"] for r in rows2}) == len(rows2) == 3
    # the old version is still readable
    assert open_table(Store(local_storage_cfg), "prompts", ref.version).count_rows() == 2


def test_bad_input_error_mode_leaves_table_untouched(prefect_api, local_storage_cfg, tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("a cat on a sofa\na dog in a park\n")
    cfg = _cfg(local_storage_cfg, [{"path": str(good)}])
    ref = _run(cfg)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a fine caption\nlatin-1 caf\xe9 here\n")
    cfg_bad = _cfg(local_storage_cfg, [{"path": str(good)}, {"path": str(bad)}], on_bad_row="error")
    with pytest.raises(DataError, match=r"bad.txt: row 2: bad encoding"):
        _run(cfg_bad)
    table = open_table(Store(local_storage_cfg), "prompts")
    assert table.version == ref.version and table.count_rows() == 2

    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "wrong.parquet")
    cfg_col = _cfg(local_storage_cfg, [{"path": str(tmp_path / "wrong.parquet"), "column": "TEXT"}])
    with pytest.raises(DataError, match=r"no column 'TEXT' \(columns present: \['caption'\]\)"):
        _run(cfg_col)


def test_crash_midway_never_half_writes(local_storage_cfg, tmp_path):
    """A failure after rows were staged leaves `prompts` exactly as it was; the next run commits cleanly."""
    src = tmp_path / "many.txt"
    src.write_text("\n".join(f"caption number {i} of a test" for i in range(300)) + "\n")
    cfg = _cfg(local_storage_cfg, [{"path": str(src)}], batch_rows=50, holdout_fraction=0.1)
    store = Store(local_storage_cfg)
    first = src.with_name("first.txt")
    first.write_text("an existing prompt here\n")
    ref0, _ = curate_into_table(
        _cfg(local_storage_cfg, [{"path": str(first)}]).curation, store, whitespace_counter
    )

    calls = {"n": 0}

    def dying_counter(texts):
        calls["n"] += 1
        if calls["n"] == 4:  # after two batches spilled to the staging table
            raise RuntimeError("worker killed")
        return whitespace_counter(texts)

    with pytest.raises(RuntimeError, match="worker killed"):
        curate_into_table(cfg.curation, store, dying_counter)
    table = open_table(store, "prompts")
    assert table.version == ref0.version and table.count_rows() == 1

    ref, report = curate_into_table(cfg.curation, store, whitespace_counter)
    assert ref.rows == report.kept == 300 and report.splits["holdout"] > 0
    assert "_staging_prompts" not in list(store.db().list_tables().tables)
    ids = open_table(store, "prompts").to_arrow().column("prompt_id").to_pylist()
    assert len(ids) == len(set(ids)) == 300


@pytest.mark.s3
def test_curate_flow_on_s3_with_s3_parquet_glob(prefect_api, s3_storage_cfg):
    store = Store(s3_storage_cfg)
    for k in range(2):
        texts = [f"a photo of object {k}-{i} on a table" for i in range(40)] + ["", "short"]
        buf = pa.BufferOutputStream()
        pq.write_table(pa.table({"TEXT": texts, "URL": ["u"] * len(texts)}), buf, row_group_size=16)
        store.write_bytes(store.uri("raw", f"part-{k}.parquet"), buf.getvalue().to_pybytes())
    cfg = _cfg(s3_storage_cfg, [{"path": store.uri("raw", "*.parquet")}], min_tokens=4)
    ref = _run(cfg)
    assert ref.db_uri == "store://lance" and store.resolve(ref.db_uri).startswith("s3://") and ref.rows == 80
    rows = _rows(s3_storage_cfg)
    assert {r["source"] for r in rows} == {
        store.uri("raw", "part-0.parquet"),
        store.uri("raw", "part-1.parquet"),
    }
    assert _run(cfg) == ref  # cache hit through the S3 result storage
