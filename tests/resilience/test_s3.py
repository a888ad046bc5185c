"""S3 faults on a SeaweedFS server the test owns: killed and restarted mid-generation (the run completes
without a rerun, task retries bridge the outage); a window that runs out says how to resume; every read command
works with read-only keys and changes nothing in the bucket."""

from __future__ import annotations

import threading
import time

import pytest
from typer.testing import CliRunner

from instaflow_core.config import load
from instaflow_core.errors import InstaflowError, StorageError
from instaflow_core.store import Store, open_ref, open_table
from tasks.caching import prefect_settings

pytestmark = [pytest.mark.s3, pytest.mark.usefixtures("one_torch_thread")]

KEY_ENV, SECRET_ENV = "RESILIENCE_S3_KEY", "RESILIENCE_S3_SECRET"
SETS = [
    "curation.max_prompts=30",
    "generation.max_prompts=12",
    "generation.shard_size=3",
    "generation.images_per_prompt=2",
    "generation.num_inference_steps=3",
    "generation.batch_size=1",
    "orchestration.retry_window_s=180",
]


def _cfg(s3, prefix: str, *extra: str):
    return load(
        "tiny",
        [
            f"storage.root=s3://{s3.bucket}/{prefix}",
            f"storage.s3_endpoint={s3.endpoint}",
            f"storage.access_key_env={KEY_ENV}",
            f"storage.secret_key_env={SECRET_ENV}",
            *SETS,
            *extra,
        ],
    )


def _objects(s3, prefix: str) -> dict[str, str]:
    from infra.seaweed import s3_client

    client = s3_client(s3.endpoint, s3.admin_key, s3.admin_secret)
    out: dict[str, str] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix):
        out |= {o["Key"]: o["ETag"] for o in page.get("Contents", [])}
    return out


def _rows(store: Store) -> int:
    try:
        return open_table(store, "triplets").count_rows()
    except Exception:  # noqa: BLE001 - not there yet, or the server is down
        return -1


@pytest.fixture(scope="module")
def outage_store(prefect_api, owned_s3, tmp_path_factory):
    """Curate, then generate on S3 while the server is SIGKILLed and restarted once mid-run."""
    import instaflow_core.store.uri as uri_mod
    from flows.curate import curate_flow
    from flows.generate import generate_flow
    from tasks import retries
    from tasks.teacher import teacher_model

    mp = pytest.MonkeyPatch()
    mp.setenv(KEY_ENV, owned_s3.admin_key)
    mp.setenv(SECRET_ENV, owned_s3.admin_secret)
    # Lance's own request retries kept short, so the outage reaches the task retries under test
    mp.setattr(uri_mod, "LANCE_RETRY_OPTIONS", {"client_max_retries": "1", "client_retry_timeout": "2"})
    cfg = _cfg(owned_s3, "outage")
    store = Store(cfg.storage)
    with prefect_settings(cfg.storage, cfg.orchestration):
        teacher = teacher_model(cfg.models, cfg.storage)
        prompts = curate_flow(cfg)

    outage: dict[str, float] = {}

    def chaos() -> None:
        deadline = time.monotonic() + 600
        while _rows(store) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        outage["rows_at_kill"] = _rows(store)
        owned_s3.kill()
        t0 = time.monotonic()
        time.sleep(4.0)  # longer than Lance's own retries above: only the task retries can bridge it
        owned_s3.restart()
        outage["down_s"] = time.monotonic() - t0

    n_retries = len(retries.RETRIES)
    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    with prefect_settings(cfg.storage, cfg.orchestration):
        ref = generate_flow(cfg, prompts, teacher)  # no rerun: the same call must finish
    thread.join(120)
    assert owned_s3.restarts == 1, "the server was never restarted"
    yield {
        "cfg": cfg,
        "ref": ref,
        "teacher": teacher,
        "prompts": prompts,
        "retries": retries.RETRIES[n_retries:],
        **outage,
    }
    mp.undo()


def test_s3_restart_mid_run_completes_without_rerun(outage_store, faults) -> None:
    cfg, ref = outage_store["cfg"], outage_store["ref"]
    ids = open_ref(Store(cfg.storage), ref).to_arrow().column("triplet_id").to_pylist()
    expected = 12 * 2
    lost, dup = expected - len(set(ids)), len(ids) - len(set(ids))
    retried = outage_store["retries"]
    faults.record(
        "test_s3", "SeaweedFS SIGKILL + restart mid-generation", 1, expected=expected, lost=lost,
        duplicated=dup,
        note=f"down {outage_store['down_s']:.1f}s at {outage_store['rows_at_kill']} rows; {len(retried)} task retries",
    )  # fmt: skip
    assert (lost, dup) == (0, 0) and ref.rows == expected
    assert retried, "the outage should have been bridged by task retries"


def test_exhausted_window_says_how_to_resume(outage_store, owned_s3, monkeypatch, faults) -> None:
    """Server down for good with a 3 s window: one line saying the run can be resumed; after the restart
    the same command finishes it."""
    from flows.cli.run import _run
    from flows.generate import generate_flow

    monkeypatch.setenv(KEY_ENV, owned_s3.admin_key)
    monkeypatch.setenv(SECRET_ENV, owned_s3.admin_secret)
    cfg = _cfg(
        owned_s3, "outage", "orchestration.retry_window_s=3", "generation.seed=7", "generation.max_prompts=3"
    )
    prompts, teacher = outage_store["prompts"], outage_store["teacher"]
    owned_s3.kill()
    t0 = time.monotonic()
    try:
        with pytest.raises(InstaflowError, match="the run can be resumed: run `instaflow .*` again") as info:
            _run(generate_flow, cfg, prompts, teacher)
        assert "\n" not in str(info.value)
        said_after = time.monotonic() - t0
    finally:
        owned_s3.restart()
    ref = _run(generate_flow, cfg, prompts, teacher)
    ids = open_ref(Store(cfg.storage), ref).to_arrow().column("triplet_id").to_pylist()
    faults.record(
        "test_s3",
        "S3 down past the retry window, then rerun",
        1,
        note=f"one line after {said_after:.0f}s; resumed",
    )
    assert len(ids) == len(set(ids))


def test_read_commands_with_read_only_keys_change_nothing(
    outage_store, owned_s3, monkeypatch, tmp_path, faults
):
    from flows.cli.main import app

    cfg = outage_store["cfg"]
    monkeypatch.setenv(KEY_ENV, owned_s3.reader_key)
    monkeypatch.setenv(SECRET_ENV, owned_s3.reader_secret)
    reader = Store(cfg.storage)
    with pytest.raises(StorageError, match="access denied"):  # the key really is read-only
        reader.write_bytes(reader.uri("probe.txt"), b"x")
    sets = []
    for s in (
        f"storage.root={cfg.storage.root}",
        f"storage.s3_endpoint={cfg.storage.s3_endpoint}",
        f"storage.access_key_env={KEY_ENV}",
        f"storage.secret_key_env={SECRET_ENV}",
    ):
        sets += ["--set", s]
    before = _objects(owned_s3, "outage/")
    runner = CliRunner()
    commands = [
        ["triplets", "query", "--limit", "3"],
        ["triplets", "query", "--table", "prompts", "--where", "split = 'train'"],
        ["triplets", "search", "photo"],
        ["triplets", "search", "photo", "--table", "prompts"],
        ["triplets", "stats"],
        ["triplets", "stats", "--table", "prompts"],
        ["triplets", "export", "--dest", str(tmp_path / "t.parquet")],
        ["triplets", "show", "--where", "shard = 0", "--limit", "2", "--out", str(tmp_path / "g.png")],
    ]
    for cmd in commands:
        res = runner.invoke(app, [*cmd, *sets])
        assert res.exit_code == 0, (cmd, res.output[-2000:], repr(res.exception))
        if cmd[1] == "search":
            assert "substring" not in res.output  # the writing stage built the full-text index
    assert (tmp_path / "t.parquet").stat().st_size > 0 and (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    after = _objects(owned_s3, "outage/")
    faults.record("test_s3", "read commands with read-only S3 keys", len(commands), note="0 objects changed")
    assert after == before, "a read command wrote to the store"
