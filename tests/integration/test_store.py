"""The storage layer on both backends: a local folder and a real S3 server (SeaweedFS on loopback)."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra.procs import free_port
from instaflow_core.config import StorageConfig
from instaflow_core.errors import DataError, StorageError
from instaflow_core.store import (
    Store,
    StoreNotFoundError,
    append_rows,
    create_table,
    export_parquet,
    from_tensor_column,
    get_metadata,
    list_versions,
    merge_rows,
    open_table,
    set_metadata,
    table_ref,
    tensor_field,
    tensor_shape,
    to_tensor_column,
)
from instaflow_core.store.uri import LANCE_RETRY_OPTIONS

SHAPE = (2, 3, 3)


def _schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("id", pa.string()),
            pa.field("n", pa.int64()),
            pa.field("prompt", pa.string()),
            tensor_field("x1", SHAPE),
        ]
    )


def _rows(ids: list[str], offset: float = 0.0) -> pa.Table:
    size = int(np.prod(SHAPE))
    # values depend on the id, not the position, so rows compare equal whichever batch wrote them
    x = np.stack([np.arange(size, dtype=np.float32) / 7 + int(i[1:]) + offset for i in ids])
    x = x.reshape(len(ids), *SHAPE).astype(np.float16)
    return pa.table(
        {
            "id": ids,
            "n": [int(i[1:]) for i in ids],
            "prompt": [f"prompt {i}" for i in ids],
            "x1": to_tensor_column(x),
        }
    )


# ------------------------------------------------------------------------------------------ pure
def test_tensor_helpers_roundtrip():
    arr = np.random.default_rng(0).standard_normal((5, *SHAPE)).astype(np.float16)
    col = to_tensor_column(arr)
    field = tensor_field("x", SHAPE)
    assert col.type == field.type == pa.list_(pa.float16(), 18)
    assert tensor_shape(field) == SHAPE
    back = from_tensor_column(pa.chunked_array([col.slice(0, 2), col.slice(2)]), tensor_shape(field))
    np.testing.assert_array_equal(back, arr)
    assert from_tensor_column(col.slice(1, 2)).shape == (2, 18)
    with pytest.raises(DataError):
        from_tensor_column(pa.array([None, [1.0] * 18], pa.list_(pa.float16(), 18)))
    with pytest.raises(DataError):
        to_tensor_column(np.zeros(3))


def test_local_roots_resolve_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Store("file://./a/b").root == f"file://{tmp_path}/a/b"
    assert Store("rel").root == f"file://{tmp_path}/rel"
    assert Store(f"file://{tmp_path}/c/").uri("x", "/y/") == f"file://{tmp_path}/c/x/y"
    assert Store("rel").storage_options() == {}
    with pytest.raises(StorageError):
        Store("gs://bucket/x")
    with pytest.raises(StorageError):
        Store("rel").uri("..", "etc")


# ------------------------------------------------------------------------------------------ both backends
def test_blob_roundtrip(storage_cfg):
    store = Store(storage_cfg)
    store.check()
    uri = store.uri("blobs", "a", "b.bin")
    assert not store.exists(uri)
    store.write_bytes(uri, b"\x00hello")
    assert store.exists(uri) and store.exists(store.uri("blobs"))
    assert store.read_bytes(uri) == b"\x00hello"
    store.write_bytes(uri, b"again")  # overwrite
    assert store.read_bytes(uri) == b"again"
    assert store.ls(store.uri("blobs", "a")) == [uri]
    with pytest.raises(StoreNotFoundError):
        store.read_bytes(store.uri("blobs", "missing.bin"))
    with pytest.raises(FileNotFoundError):  # also catchable as the builtin
        store.read_bytes(store.uri("blobs", "missing.bin"))
    store.delete(store.uri("blobs"))
    assert not store.exists(uri)


def test_put_get_dir_and_local_copy(storage_cfg, tmp_path):
    store = Store(storage_cfg)
    src = tmp_path / "model"
    (src / "unet").mkdir(parents=True)
    (src / "model_index.json").write_text('{"a": 1}')
    (src / "unet" / "weights.safetensors").write_bytes(bytes(range(256)) * 10)
    uri = store.uri("models", "teacher")
    assert store.put_dir(src, uri) == uri
    out = store.get_dir(uri, tmp_path / "out")
    assert (out / "model_index.json").read_text() == '{"a": 1}'
    assert (out / "unet" / "weights.safetensors").read_bytes() == bytes(range(256)) * 10

    local = store.local_copy(uri)
    assert (local / "unet" / "weights.safetensors").read_bytes() == bytes(range(256)) * 10
    assert store.local_copy(uri) == local  # cached
    # rewritten in place: the cache notices (listing fingerprint), old content is not served
    (src / "model_index.json").write_text('{"a": 2, "b": 3}')
    store.put_dir(src, uri, clean=True)
    assert (store.local_copy(uri) / "model_index.json").read_text() == '{"a": 2, "b": 3}'
    # a single file
    one = store.local_copy(uri + "/model_index.json")
    assert one.name == "model_index.json" and one.is_file()
    with pytest.raises(StoreNotFoundError):
        store.local_copy(store.uri("models", "nope"))
    with pytest.raises(StoreNotFoundError):
        store.get_dir(store.uri("models", "nope"), tmp_path / "nope")


def test_table_merge_is_idempotent_and_versioned(storage_cfg):
    store = Store(storage_cfg)
    table = create_table(store, "triplets", _schema())
    v0 = table.version
    v1 = merge_rows(table, _rows(["a1", "a2", "a3"]), on="id")
    assert v1 > v0 and table.count_rows() == 3
    v2 = merge_rows(table, _rows(["a1", "a2", "a3"]), on="id")  # the same rows again: no duplicates
    assert v2 > v1 and table.count_rows() == 3
    # duplicate keys inside one batch (Lance alone would insert both): the last wins
    dup = pa.concat_tables([_rows(["a4"]), _rows(["a4"], offset=1.0)])
    merge_rows(table, dup, on="id")
    assert table.count_rows() == 4
    got = table.search().where("id = 'a4'").to_arrow()
    assert got.num_rows == 1
    np.testing.assert_array_equal(
        from_tensor_column(got.column("x1"), SHAPE),
        from_tensor_column(_rows(["a4"], offset=1.0).column("x1"), SHAPE),
    )
    # list-of-dicts input goes through the table schema (fixed-size lists included)
    merge_rows(table, _rows(["a5"]).to_pylist(), on="id")
    assert table.count_rows() == 5
    assert append_rows(table, []) == table.version  # empty write: no new version
    # filter query
    assert sorted(table.search().where("n >= 4").to_arrow().column("id").to_pylist()) == ["a4", "a5"]
    assert table.count_rows("n < 3") == 2
    # the tensor column keeps its shape metadata through Lance
    reopened = open_table(store, "triplets")
    assert tensor_shape(reopened.schema.field("x1")) == SHAPE
    # an old version is still there
    old = open_table(store, "triplets", version=v1)
    assert old.count_rows() == 3
    versions = [v["version"] for v in list_versions(store, "triplets")]
    assert versions == sorted(versions) and v1 in versions and versions[-1] == reopened.version
    ref = table_ref(store, "triplets", config_hash="abc")
    assert (ref.table, ref.version, ref.rows, ref.config_hash) == ("triplets", reopened.version, 5, "abc")
    assert ref.db_uri == "store://lance" and store.resolve(ref.db_uri) == store.uri("lance")
    assert table_ref(store, "triplets", version=v1).rows == 3
    # wrong rows are a DataError naming the problem
    with pytest.raises(DataError, match="missing"):
        merge_rows(table, pa.table({"id": ["z9"]}), on="id")
    # reopening with other columns is refused; same columns is fine
    assert create_table(store, "triplets", _schema()).count_rows() == 5
    with pytest.raises(DataError, match="other columns"):
        create_table(store, "triplets", pa.schema([pa.field("id", pa.string())]))
    with pytest.raises(DataError, match="already exists"):
        create_table(store, "triplets", _schema(), exist_ok=False)


def test_metadata_roundtrip(storage_cfg):
    store = Store(storage_cfg)
    table = create_table(store, "prompts", _schema(), metadata={"source": "tiny.txt", "config_hash": "h1"})
    assert get_metadata(table) == {"source": "tiny.txt", "config_hash": "h1"}
    v_meta = table.version
    merge_rows(table, _rows(["a1"]), on="id")
    assert get_metadata(table)["source"] == "tiny.txt"  # carried forward by later writes
    v = set_metadata(table, {"config_hash": "h2", "inputs": {"prompts": 3}})
    assert v == table.version > v_meta
    assert get_metadata(open_table(store, "prompts")) == {
        "source": "tiny.txt",
        "config_hash": "h2",
        "inputs": '{"prompts": 3}',
    }
    old = open_table(store, "prompts", version=v_meta)
    assert get_metadata(old)["config_hash"] == "h1"  # each version keeps its lineage
    with pytest.raises(DataError, match="old version"):
        set_metadata(old, {"x": "y"})
    # same metadata again: no new version
    before = table.version
    create_table(store, "prompts", _schema(), metadata={"config_hash": "h2"})
    assert open_table(store, "prompts").version == before


def test_export_parquet(storage_cfg):
    store = Store(storage_cfg)
    table = create_table(store, "triplets", _schema(), metadata={"teacher": "tiny"})
    ids = [f"a{i}" for i in range(10)]
    first = merge_rows(table, _rows(ids[:6]), on="id")
    merge_rows(table, _rows(ids[6:]), on="id")  # two fragments
    dest = store.uri("exports", "triplets.parquet")
    uri, rows = export_parquet(store, "triplets", table.version, dest, row_group_rows=4)
    assert (uri, rows) == (dest, 10)
    with store.open(dest, "rb") as fh:
        pf = pq.ParquetFile(fh)
        assert [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)] == [4, 4, 2]
        got = pf.read()
    meta = {k.decode(): v.decode() for k, v in got.schema.metadata.items()}
    assert meta["instaflow.table"] == "triplets" and meta["instaflow.version"] == str(table.version)
    assert meta["teacher"] == "tiny"
    got = got.sort_by("id")
    assert got.column("id").to_pylist() == sorted(ids)
    expected = from_tensor_column(_rows(sorted(ids)).column("x1"), SHAPE)
    np.testing.assert_array_equal(
        from_tensor_column(got.column("x1").cast(pa.list_(pa.float16(), 18)), SHAPE), expected
    )
    # an older version, a column subset and a filter
    uri, rows = export_parquet(
        store, "triplets", first, store.uri("exports", "v.parquet"), columns=["id"], filter="n < 3"
    )
    assert rows == 3
    with store.open(uri, "rb") as fh:
        assert pq.read_table(fh).column_names == ["id"]


def test_missing_table_is_a_data_error(storage_cfg):
    store = Store(storage_cfg)
    with pytest.raises(DataError, match="'nope' not found"):
        open_table(store, "nope")
    create_table(store, "t", _schema())
    with pytest.raises(DataError, match="no version 99"):
        open_table(store, "t", version=99)


# ------------------------------------------------------------------------------------------ S3 failures
@pytest.mark.s3
def test_s3_storage_options_and_secrets_stay_out_of_sight(s3_storage_cfg, s3_server):
    store = Store(s3_storage_cfg)
    opts = store.storage_options()
    assert opts == {
        "endpoint": s3_server.endpoint,
        "allow_http": "true",
        "region": "us-east-1",
        "aws_access_key_id": s3_server.access_key,
        "aws_secret_access_key": s3_server.secret_key,
        **LANCE_RETRY_OPTIONS,  # Lance's own request retries (tasks/retries.py retries whole tasks)
    }
    store.check()
    store.write_bytes(store.uri("x"), b"1")  # builds the clients
    assert s3_server.secret_key not in repr(store)
    assert s3_server.secret_key.encode() not in pickle.dumps(store)
    assert pickle.loads(pickle.dumps(store)).read_bytes(store.uri("x")) == b"1"


@pytest.mark.s3
@pytest.mark.parametrize(
    ("which", "code"), [("secret", "SignatureDoesNotMatch"), ("access", "InvalidAccessKeyId")]
)
def test_s3_wrong_keys_fail_clearly(s3_storage_cfg, s3_server, monkeypatch, which, code):
    good = Store(s3_storage_cfg)
    merge_rows(create_table(good, "t", _schema()), _rows(["a1"]), on="id")
    env = s3_storage_cfg.secret_key_env if which == "secret" else s3_storage_cfg.access_key_env
    monkeypatch.setenv(env, "wrong-" + "k" * 20)
    bad = Store(s3_storage_cfg)
    with pytest.raises(StorageError, match=code) as err:
        bad.check()
    assert s3_server.secret_key not in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(StorageError, match=code):
        open_table(bad, "t")  # the store is probed before Lance's own retries
    # and Lance's own error (no probe first) is translated too
    with pytest.raises(StorageError, match=code):
        bad.db(check=False).open_table("t").count_rows()
    with pytest.raises(StorageError):
        bad.read_bytes(good.uri("lance"))


@pytest.mark.s3
@pytest.mark.timeout(60)
def test_s3_unreachable_endpoint_fails_fast(s3_storage_cfg):
    cfg = s3_storage_cfg.model_copy(update={"s3_endpoint": f"http://127.0.0.1:{free_port()}"})
    store = Store(cfg)
    with pytest.raises(StorageError, match="cannot reach"):
        store.check()
    with pytest.raises(StorageError, match="cannot reach"):
        create_table(store, "t", _schema())
    with pytest.raises(StorageError, match="cannot reach"):
        store.exists(store.uri("x"))


@pytest.mark.s3
def test_s3_missing_bucket(s3_storage_cfg):
    cfg = s3_storage_cfg.model_copy(update={"root": "s3://no-such-bucket-xyz/p"})
    with pytest.raises(StorageError, match="does not exist"):
        Store(cfg).check()


def test_s3_root_needs_a_bucket():
    with pytest.raises(StorageError, match="no bucket"):
        Store(StorageConfig(root="s3://"))
