"""Session fixtures shared by the whole suite.

- Every module in tests/plugins/ is loaded as a pytest plugin (add fixtures there, one topic per module).
- `s3_server`: one real SeaweedFS S3 server on 127.0.0.1 (free ports, tmp dir) for the session.
- `s3_storage_cfg` / `local_storage_cfg`: a StorageConfig per test (unique S3 prefix / tmp folder);
  `storage_cfg` is parametrized over both, so one test function covers file:// and s3://.
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from instaflow_core.config import StorageConfig

pytest_plugins = sorted(
    f"tests.plugins.{p.stem}"
    for p in (Path(__file__).parent / "plugins").glob("*.py")
    if p.stem != "__init__"
)

# The test keys live in their own variables, so the tests also prove the config's env-var indirection.
S3_ACCESS_KEY_ENV = "INSTAFLOW_TEST_S3_ACCESS_KEY"
S3_SECRET_KEY_ENV = "INSTAFLOW_TEST_S3_SECRET_KEY"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Store.local_copy downloads go to a session tmp dir, not ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INSTAFLOW_CACHE_DIR", str(tmp_path_factory.mktemp("store-cache")))
        yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A SeaweedFS `weed mini` on loopback for the session: .endpoint, .bucket, .access_key, .secret_key."""
    from infra import seaweed

    try:
        seaweed.find_weed()
    except seaweed.SeaweedError as err:
        pytest.skip(str(err))
    server = seaweed.start(
        tmp_path_factory.mktemp("seaweed"),
        access_key="instaflow-test",
        secret_key=secrets.token_hex(16),
        bucket="instaflow-test",
    )
    try:
        yield server
    finally:
        server.stop()


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40]


@pytest.fixture
def s3_storage_cfg(
    s3_server, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> StorageConfig:
    """StorageConfig for s3://<bucket>/<unique prefix per test>, keys in env vars for this test only."""
    monkeypatch.setenv(S3_ACCESS_KEY_ENV, s3_server.access_key)
    monkeypatch.setenv(S3_SECRET_KEY_ENV, s3_server.secret_key)
    prefix = f"{_slug(request.node.name)}-{uuid.uuid4().hex[:8]}"
    return StorageConfig(
        root=f"s3://{s3_server.bucket}/{prefix}",
        s3_endpoint=s3_server.endpoint,
        s3_region=s3_server.region,
        access_key_env=S3_ACCESS_KEY_ENV,
        secret_key_env=S3_SECRET_KEY_ENV,
    )


@pytest.fixture
def local_storage_cfg(tmp_path: Path) -> StorageConfig:
    """StorageConfig for a fresh local folder (file:// URI)."""
    return StorageConfig(root=f"file://{tmp_path / 'store'}")


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def storage_cfg(request: pytest.FixtureRequest) -> StorageConfig:
    """Both backends: tests using this run once on a local folder and once on the SeaweedFS server."""
    name = "local_storage_cfg" if request.param == "file" else "s3_storage_cfg"
    return request.getfixturevalue(name)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two threads make a tiny
    UNet step ~10x slower. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    """The tiny SD model (a `Model` of the SD family: random init, fixed seed), built once per test module."""
    from instaflow_core.config import TinyModelConfig
    from instaflow_core.models.sd import build_tiny

    return build_tiny(TinyModelConfig())
