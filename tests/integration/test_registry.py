"""MLflow registration, aliases and the promotion gate (sqlite registry in a tmp folder, tiny model folder)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from instaflow_core.config import GateConfig, RegistrationConfig, StorageConfig
from instaflow_core.errors import ConfigError, DataError
from instaflow_core.refs import ModelRef
from tasks.registration import register_model
from tasks.tracking.client import artifact_location, mlflow_client, tracking_uri
from tasks.tracking.promotion import (
    CANDIDATE,
    CHAMPION,
    HISTORY_TAG,
    list_models,
    promote_version,
    rollback_champion,
)

NAME = "instaflow-test"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from instaflow_core.models.sd import build_tiny

    return build_tiny().save(tmp_path_factory.mktemp("models") / "instaflow")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_folder):
    """One registry for the module: v1 registered through the real pyfunc path, promoted (no champion yet)."""
    root = tmp_path_factory.mktemp("registry")
    storage = StorageConfig(root=f"file://{root / 'store'}")
    registry = RegistrationConfig(
        experiment="test", model_name=NAME, gate=GateConfig(max_fid_increase=0.5, max_clip_decrease=0.005)
    )
    ref = ModelRef(uri=f"file://{tiny_folder}", kind="instaflow", config_hash="h1")
    tags = {"instaflow.prompts_version": "3", "instaflow.teacher": "tiny-abc"}
    inference = {"num_inference_steps": 1, "guidance_scale": 1.0}
    reg = register_model.fn(registry, storage, ref, NAME, {"fid": 20.0, "clip_score": 0.30}, tags, inference)
    return {"storage": storage, "registry": registry, "ref": ref, "reg": reg, "root": root, "tags": tags}


def _add_version(client, source_mv, fid: float, clip: float) -> str:
    """A further version sharing v1's artifacts (fast): only the metrics tags differ, which is what the gate reads."""
    mv = client.create_model_version(
        NAME,
        source=source_mv.source,
        run_id=source_mv.run_id,
        tags={"metric.fid": repr(fid), "metric.clip_score": repr(clip), "instaflow.kind": "instaflow"},
    )
    client.set_registered_model_alias(NAME, CANDIDATE, mv.version)
    return str(mv.version)


def test_tracking_uri_defaults(tmp_path, caplog):
    local = StorageConfig(root=f"file://{tmp_path}/store")
    assert tracking_uri(RegistrationConfig(), local) == f"sqlite:///{tmp_path}/store/mlflow.db"
    assert (
        artifact_location(f"sqlite:///{tmp_path}/store/mlflow.db")
        == (tmp_path / "store" / "mlartifacts").as_uri()
    )
    assert (
        tracking_uri(RegistrationConfig(tracking_uri="http://127.0.0.1:5000"), local)
        == "http://127.0.0.1:5000"
    )
    with caplog.at_level("WARNING"):
        uri = tracking_uri(RegistrationConfig(), StorageConfig(root="s3://bucket/x"))
    assert uri.endswith(".instaflow/mlflow.db") and "not local" in caplog.text


def test_register_tags_candidate_and_idempotent(setup):
    reg = setup["reg"]
    assert reg["version"] == "1" and reg["aliases"] == [CANDIDATE]
    assert reg["metrics"] == {"fid": 20.0, "clip_score": 0.30}
    with mlflow_client(setup["registry"], setup["storage"]) as client:
        mv = client.get_model_version(NAME, "1")
        assert mv.tags["instaflow.prompts_version"] == "3" and mv.tags["instaflow.kind"] == "instaflow"
        run = client.get_run(mv.run_id)
        assert run.data.metrics["fid"] == 20.0
        # artifacts live next to the sqlite database
        assert (setup["root"] / "store" / "mlartifacts").is_dir()
    again = register_model.fn(
        setup["registry"],
        setup["storage"],
        setup["ref"],
        NAME,
        {"fid": 1.0},
        setup["tags"],
        {"num_inference_steps": 1, "guidance_scale": 1.0},
    )
    assert again["version"] == "1" and again["reused"]


def test_gate_promote_block_force_rollback_and_champion_loads(setup):
    import mlflow

    registry, storage = setup["registry"], setup["storage"]
    gate = registry.gate
    with mlflow_client(registry, storage) as client:
        first = promote_version(client, NAME, gate)  # the candidate, v1; no champion yet
        assert first["promoted"] and first["reasons"] == ["no champion yet"]
        assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == "1"

        # the champion loads by alias and generates an image
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@{CHAMPION}")
        images = model.predict(pd.DataFrame({"prompt": ["a red car", "a cat"], "seed": [0, 1]}))
        assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
        again = model.predict({"prompt": ["a red car"], "seed": [0]})
        np.testing.assert_array_equal(again[0], images[0])  # seeded: reproducible
        two_step = model.predict({"prompt": ["a red car"], "seed": [0]}, params={"num_inference_steps": 2})
        assert not np.array_equal(two_step[0], images[0])

        v1 = client.get_model_version(NAME, "1")
        worse = _add_version(client, v1, fid=21.0, clip=0.30)  # FID +1.0 > 0.5 allowed
        blocked = promote_version(client, NAME, gate)
        assert not blocked["passed"] and not blocked["promoted"] and blocked["version"] == worse
        assert any("fid" in r and "> allowed" in r for r in blocked["reasons"])
        assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == "1"
        assert client.get_model_version(NAME, worse).tags["instaflow.gate"].startswith("BLOCKED")

        better = _add_version(client, v1, fid=19.5, clip=0.302)
        passed = promote_version(client, NAME, gate)
        assert passed["passed"] and passed["promoted"] and passed["previous_champion"] == "1"
        assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == better
        assert CANDIDATE not in client.get_registered_model(NAME).aliases  # the candidate became champion

        with pytest.raises(ConfigError, match="--reason"):
            promote_version(client, NAME, gate, version=worse, force=True)
        forced = promote_version(
            client, NAME, gate, version=worse, force=True, reason="hotfix for a bad prompt"
        )
        assert forced["promoted"] and forced["forced"] and not forced["passed"]
        assert (
            client.get_model_version(NAME, worse).tags["instaflow.forced_reason"] == "hotfix for a bad prompt"
        )
        assert json.loads(client.get_registered_model(NAME).tags[HISTORY_TAG]) == ["1", better]

        back = rollback_champion(client, NAME)
        assert back == {"model_name": NAME, "champion": better, "replaced": worse}
        assert rollback_champion(client, NAME)["champion"] == "1"
        with pytest.raises(DataError, match="no previous champion"):
            rollback_champion(client, NAME)
        with pytest.raises(DataError, match="no registered model"):
            promote_version(client, "nope", gate)

        listed = list_models(client, NAME)
        assert [r["version"] for r in listed] == ["1", worse, better]
        assert listed[0]["aliases"] == [CHAMPION] and listed[1]["forced_reason"] == "hotfix for a bad prompt"


def test_cli_list_promote_blocked_exit_code(setup):
    from flows.cli.models import app

    root = setup["root"]
    sets = [
        "--set",
        f"storage.root=file://{root / 'store'}",
        "--set",
        f"registration.tracking_uri=sqlite:///{root / 'store' / 'mlflow.db'}",
    ]
    runner = CliRunner()
    first = runner.invoke(app, ["promote", NAME, "--version", "1", *sets])  # champion v1 (or already it)
    assert first.exit_code == 0, first.output
    listed = runner.invoke(app, ["list", "--name", NAME, *sets])
    assert listed.exit_code == 0, listed.output
    assert NAME in listed.output and "champion" in listed.output
    with mlflow_client(setup["registry"], setup["storage"]) as client:
        worse = _add_version(client, client.get_model_version(NAME, "1"), fid=99.0, clip=0.1)
    blocked = runner.invoke(app, ["promote", NAME, *sets])
    assert blocked.exit_code == 1 and "BLOCKED" in blocked.output and f"v{worse}" in blocked.output
    forced = runner.invoke(app, ["promote", NAME, "--version", worse, "--force", "--reason", "demo", *sets])
    assert forced.exit_code == 0 and "FORCED" in forced.output, forced.output
    rolled = runner.invoke(app, ["rollback", NAME, *sets])
    assert rolled.exit_code == 0 and f"was v{worse}" in rolled.output, rolled.output


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.timeout(600)
def test_against_mlflow_server_with_s3_artifacts(s3_server, s3_storage_cfg, tiny_folder, tmp_path):
    """The `mlflow server` set-up of `instaflow stack up`: sqlite backend, artifacts proxied to the S3 bucket;
    the model folder itself comes from the s3:// store. The client holds no S3 keys for MLflow."""
    import os
    import subprocess
    import sys
    import uuid
    from pathlib import Path

    import mlflow

    from infra.procs import free_port, http_ok, stop_pid, wait_until
    from instaflow_core.store import Store

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(
        MLFLOW_S3_ENDPOINT_URL=s3_server.endpoint,
        AWS_ACCESS_KEY_ID=s3_server.access_key,
        AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
        AWS_DEFAULT_REGION="us-east-1",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    prefix = f"mlflow-{uuid.uuid4().hex[:8]}"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    cmd += ["--artifacts-destination", f"s3://{s3_server.bucket}/{prefix}"]
    with open(tmp_path / "mlflow.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: http_ok(url + "/health"), 180, alive=lambda: proc.poll() is None), (
            tmp_path / "mlflow.log"
        ).read_text()[-2000:]
        store = Store(s3_storage_cfg)
        uri = store.uri("models", "instaflow")
        store.put_dir(tiny_folder, uri)
        registry = RegistrationConfig(tracking_uri=url, experiment="server-test", model_name=NAME)
        ref = ModelRef(uri=uri, kind="instaflow", config_hash="s3")
        reg = register_model.fn(
            registry,
            s3_storage_cfg,
            ref,
            NAME,
            {"fid": 5.0, "clip_score": 0.2},
            {},
            {"num_inference_steps": 1, "guidance_scale": 1.0},
        )
        assert reg["run_url"].startswith(url) and reg["aliases"] == [CANDIDATE]
        with mlflow_client(registry, s3_storage_cfg) as client:
            assert promote_version(client, NAME, registry.gate)["promoted"]
            model = mlflow.pyfunc.load_model(f"models:/{NAME}@{CHAMPION}")
            images = model.predict({"prompt": ["a red car"], "seed": [0]})
            assert images.shape == (1, 16, 16, 3)
        # the artifacts went to the bucket, through the server
        listed = store.fs.find(f"{s3_server.bucket}/{prefix}")
        assert any(p.endswith("unet/diffusion_pytorch_model.safetensors") for p in listed)
    finally:
        stop_pid(proc.pid, timeout=30)
