"""Pure parts of the fault handling: sniffing binary files, the bad-row refusal, transient-error classification,
names and endpoints the config refuses, metric headers, store-relative references."""

from __future__ import annotations

import bz2
import gzip
import os
import zipfile
from collections import Counter
from pathlib import Path

import fsspec
import pytest

from instaflow_core.config import CurationConfig, StorageConfig, load
from instaflow_core.curation.prompts import CurationReport
from instaflow_core.curation.sniff import binary_reason, sniff
from instaflow_core.errors import ConfigError, DataError, StorageError
from instaflow_core.evaluation.names import metric_headers
from instaflow_core.registration.rules import model_name_problem
from instaflow_core.store import Store
from tasks.curation import CurationRefused, check_report
from tasks.retries import is_transient, resume_hint

LFS = fsspec.filesystem("file")


# ------------------------------------------------------------------------------------------- sniffing
def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_sniff_names_what_a_binary_file_is(tmp_path: Path) -> None:
    text = b"a red car on a street\na cat on a sofa\n" * 40
    assert sniff(LFS, _write(tmp_path / "ok.txt", text), None) is None
    latin1 = "caf\xe9 au lait on a table\n".encode("latin-1") * 40  # mis-encoded, not binary
    assert sniff(LFS, _write(tmp_path / "l1.txt", latin1), None) is None
    rnd = os.urandom(4096)
    assert "binary data" in sniff(LFS, _write(tmp_path / "rnd.txt", rnd), None)
    # a disguised gzip is named as one (it used to be refused as `nul_bytes`)
    reason = sniff(LFS, _write(tmp_path / "disguised.txt", gzip.compress(text)), None)
    assert reason.startswith("gzip-compressed") and ".gz" in reason
    assert sniff(LFS, _write(tmp_path / "b.txt", bz2.compress(text)), None).startswith("bz2-compressed")
    assert sniff(LFS, _write(tmp_path / "z.txt", b"\x28\xb5\x2f\xfd" + b"\0" * 64), None).startswith("zstd")
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.writestr("x.txt", text)
    assert sniff(LFS, str(tmp_path / "a.zip"), None) == "a zip archive"
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(200)
    assert sniff(LFS, _write(tmp_path / "img.jsonl", png), None) == "a PNG image"
    assert "UTF-16" in sniff(LFS, _write(tmp_path / "u16.txt", "a cat\n".encode("utf-16")), None)
    # a named .gz is decompressed as before; its content is what is sniffed
    assert sniff(LFS, _write(tmp_path / "ok.txt.gz", gzip.compress(text)), ".gz") is None
    assert "binary data" in sniff(LFS, _write(tmp_path / "rnd.txt.gz", gzip.compress(rnd)), ".gz")
    assert binary_reason(b"") is None


# ------------------------------------------------------------------------------------------- refusal
def test_check_report_refuses_mostly_bad_and_empty_sources() -> None:
    cur = CurationConfig()
    ok = CurationReport(read=90, kept=80, bad_rows=Counter(bad_encoding=10))
    check_report(ok, cur)  # 10% bad: under the default 0.2
    bad = CurationReport(read=2, kept=2, bad_rows=Counter(bad_encoding=240, nul_bytes=8))
    with pytest.raises(CurationRefused, match=r"248 of 250 rows read \(99\.2%\) are bad") as info:
        check_report(bad, cur)
    assert "bad_encoding 240" in str(info.value) and "not changed" in str(info.value)
    assert info.value.report is bad
    check_report(bad, CurationConfig(max_bad_fraction=1.0))  # the user may accept it explicitly
    with pytest.raises(DataError, match="hold no rows"):
        check_report(CurationReport(), cur)
    with pytest.raises(DataError, match="kept no captions"):
        check_report(CurationReport(read=3, dropped=Counter(too_short=3)), cur)
    line = bad.summary()
    assert line.startswith("read 250, kept 2;") and "bad rows: bad_encoding 240, nul_bytes 8" in line
    assert CurationReport.from_dict(bad.to_dict()).summary() == line


# ------------------------------------------------------------------------------------------- transient
def test_transient_errors_are_told_apart_from_mistakes() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    assert is_transient(ConnectionRefusedError(111, "Connection refused"))
    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:9"))
    lance_io = OSError(
        "LanceError(IO): Generic S3 error: Error after 3 retries in 370ms, max_retries:10, "
        "retry_timeout:180s, source:error sending request for url (http://127.0.0.1:8333/b/x): "
        "client error (Connect): tcp connect error: Connection refused (os error 111), commit.rs:88:23"
    )
    assert is_transient(lance_io) and is_transient(ValueError(str(lance_io)))
    slow = ClientError(
        {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject"
    )
    assert is_transient(slow)
    denied = ClientError(
        {"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "Put"
    )
    assert not is_transient(denied)
    assert not is_transient(OSError("LanceError(IO): Generic S3 error: InvalidAccessKeyId status: 403"))
    # translated one-line errors keep their cause: an unreachable store is retried, bad data is not
    try:
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except ConnectionResetError as err:
            raise StorageError("commit table 'triplets': cannot reach the S3 endpoint") from err
    except StorageError as err:
        assert is_transient(err)
    assert not is_transient(DataError("bad.txt: row 2: bad encoding"))
    assert not is_transient(ValueError("Invalid user input: no column 'x'"))
    from tasks.tracking.client import unreachable

    assert is_transient(unreachable("http://127.0.0.1:9"))
    hint = resume_hint(["rebuild", "--stack"])
    assert "`instaflow rebuild --stack` again" in hint and "kept" in hint


# ------------------------------------------------------------------------------------------- names
def test_model_names_and_endpoints_are_validated() -> None:
    from flows.cli.lineage import parse_model_ref

    assert model_name_problem("instaflow-tiny") is None
    for bad in ("../../etc", "..", "a/b", "a:b", "x'y", ""):
        assert model_name_problem(bad), bad
    assert parse_model_ref("instaflow-tiny@champion") == ("instaflow-tiny", "champion", None)
    assert parse_model_ref("models:/instaflow-tiny/3") == ("instaflow-tiny", None, "3")
    assert parse_model_ref("instaflow-tiny") == ("instaflow-tiny", "champion", None)
    with pytest.raises(ConfigError, match="not a registered model name"):
        parse_model_ref("../../etc@champion")
    with pytest.raises(ConfigError, match="registration.model_name"):
        load("tiny", ["registration.model_name=../../etc"])
    for endpoint in ("localhost:8333", "ftp://h:1", "http://", "http://h:port", "http://u:p@h:1"):
        with pytest.raises(ConfigError, match="storage.s3_endpoint"):
            load("tiny", [f"storage.s3_endpoint={endpoint}"])
    assert StorageConfig(s3_endpoint="http://127.0.0.1:8333/").s3_endpoint == "http://127.0.0.1:8333"


# ------------------------------------------------------------------------------------------- headers
def test_metric_headers_name_the_network_unless_the_real_one_ran() -> None:
    from instaflow_core.evaluation.stage import display_rows

    tiny = {
        "fid_features": "tiny-random CLIP (seed 0; stand-in, not paper-comparable)",
        "fid_paper_comparable": False,
        "clip_model": "tiny-random CLIP (seed 0; stand-in, not paper-comparable)",
        "clip_paper_comparable": False,
    }
    assert metric_headers(tiny) == ("FD(tiny-CLIP)", "cos(tiny-CLIP)")
    real = {
        "fid_features": "Inception-v3 pt_inception-2015-12-05 via torch-fidelity (paper-comparable FID)",
        "fid_paper_comparable": True,
        "clip_model": "CLIP openai/clip-vit-large-patch14 (real weights)",
        "clip_paper_comparable": True,
    }
    assert metric_headers(real) == ("FID", "CLIP")
    # MLflow version tags carry the labels only
    assert metric_headers({k: tiny[k] for k in ("fid_features", "clip_model")}) == (
        "FD(tiny-CLIP)",
        "cos(tiny-CLIP)",
    )
    row = {"name": "instaflow-1step", "solver": "euler", "steps": 1, "guidance": 1.0, "fid": 1.23456}
    row |= {"clip_score": 0.1, "latency_s": 0.01, "straightness": None, "samples": 4, "networks": tiny}
    shown = display_rows([row])[0]
    assert "FID" not in shown and "CLIP" not in shown and shown["FD(tiny-CLIP)"] == 1.235


# ------------------------------------------------------------------------------------------- references
def test_store_relative_references_resolve_under_any_root(tmp_path: Path) -> None:
    a = Store(StorageConfig(root=f"file://{tmp_path / 'a'}"))
    b = Store(StorageConfig(root=str(tmp_path / "b")))
    ref = a.ref("models", "2rf-abc")
    assert ref == "store://models/2rf-abc"
    assert a.resolve(ref) == f"file://{tmp_path / 'a'}/models/2rf-abc"
    assert b.resolve(ref) == f"file://{tmp_path / 'b'}/models/2rf-abc"
    assert a.relative(a.uri("lance")) == "store://lance" and a.relative(a.root) == "store://"
    assert a.relative("someone/model") == "someone/model"  # a hub id stays as it is
    assert a.relative(b.uri("lance")) == b.uri("lance")  # another store's URI stays absolute
    assert b.resolve("s3://x/y") == "s3://x/y"
    s3 = Store(StorageConfig(root="s3://bucket/pre", s3_endpoint="http://127.0.0.1:1"))
    assert s3.resolve("store://lance") == "s3://bucket/pre/lance"
    assert s3.relative("s3://bucket/pre/models/x") == "store://models/x"
    with pytest.raises(StorageError, match=r"'\.\.'"):
        a.resolve("store://../etc")
    a.write_bytes("store://refs/x.json", b"{}")
    assert a.read_bytes("store://refs/x.json") == b"{}" and (tmp_path / "a" / "refs" / "x.json").is_file()
    with pytest.raises(StorageError, match="no store at"):
        Store(StorageConfig(root=str(tmp_path / "missing")), read_only=True).check()
    assert not (tmp_path / "missing").exists()  # a read never creates the root
