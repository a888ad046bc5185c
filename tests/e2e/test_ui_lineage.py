"""Lineage where users look for it.

- `instaflow lineage NAME@ALIAS|VERSION` prints the chain back to the prompt set from MLflow tags alone (the
  tags are made by registration/rules.py's `lineage_tags`, the producer the register flow calls, so a renamed
  tag breaks this test).
- The browser check (slow): the local stack up on free ports, a tiny rebuild run against it (S3 store, MLflow
  server, Prefect server), then headless Chromium opens the Prefect UI's artifacts page, the lineage artifact
  and the rebuild's flow run page and finds the `instaflow-lineage` artifact on each; screenshots are kept
  under test-output/. `instaflow lineage` is then run against the stack's MLflow for the same model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.support import REPO
from tests.support.browser import TEST_OUTPUT, Browser, fast_tiny_overrides, find_chromium

LINEAGE = {
    "teacher": "teacher:/s/models/teacher-1#abc",
    "prompts": "/s/lance/prompts@v3",
    "triplets": "/s/lance/triplets@v7",
    "2rf": "2rf:/s/models/2rf-x#h2",
    "instaflow": "instaflow:/s/models/instaflow-y#h3",
}


# ------------------------------------------------------------------------------------ the lineage CLI
@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A sqlite MLflow registry with the one-step model and its 2-RF, tagged as the register stage tags them."""
    from mlflow import MlflowClient

    from instaflow_core.config import load, stable_hash
    from instaflow_core.registration.rules import lineage_tags
    from tasks.caching import code_version, git_sha

    tmp_path = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tags = lineage_tags(
        load("tiny"), LINEAGE, {"uri": "/s/eval/e.json", "run_id": "r123"},
        code_version=code_version(), git_sha=git_sha(),
    )  # fmt: skip
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for name, kind in (("instaflow-tiny", "instaflow"), ("instaflow-tiny-2rf", "2rf")):
        client.create_registered_model(name)
        key = LINEAGE[kind]
        version_tags = {
            **tags,
            "instaflow.model_key": stable_hash(key),
            "instaflow.model_ref": key,
            "instaflow.kind": kind,
            "metric.fid": "12.5",
        }
        mv = client.create_model_version(name, source=f"file://{tmp_path}/m", tags=version_tags)
        client.set_registered_model_alias(name, "champion", mv.version)
    client.create_model_version("instaflow-tiny", source=f"file://{tmp_path}/m2", tags={"note": "by hand"})
    return uri


pytestmark = pytest.mark.xdist_group("local-stack")  # the stack's default ports: one worker at a time


def _lineage(*args: str) -> object:
    from flows.cli.main import app

    return CliRunner().invoke(app, ["lineage", *args])


def test_lineage_prints_the_chain_back_to_the_prompts(registry: str) -> None:
    res = _lineage("instaflow-tiny@champion", "--tracking-uri", registry)
    assert res.exit_code == 0, res.output
    out = res.output
    order = [out.index(LINEAGE[k]) for k in ("instaflow", "2rf", "triplets", "prompts")]
    assert order == sorted(order), out  # newest first, back to the prompt set
    assert "table version 7" in out and "table version 3" in out
    assert "teacher teacher:/s/models/teacher-1#abc" in out
    assert "registered as models:/instaflow-tiny-2rf/1" in out  # the 2-RF found by its model key
    assert "aliases: champion" in out and "config hashes" in out and "preset tiny" in out

    # by version, and as JSON
    res = _lineage("instaflow-tiny@1", "--tracking-uri", registry, "--json")
    info = json.loads(res.stdout)
    assert info["refs"]["prompts"] == LINEAGE["prompts"] and info["table_versions"]["triplets"] == "7"
    assert set(info["config_hashes"]) >= {"curation", "generation", "reflow", "distillation"}


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("instaflow-tiny@nope", "has no alias 'nope' (aliases: champion"),
        ("instaflow-tiny@9", "has no version 9 (versions: 1, 2)"),
        ("unknown@champion", "no registered model 'unknown'"),
        ("instaflow-tiny@2", "has no lineage tags"),
    ],
)
def test_lineage_unknown_model_or_alias_is_one_line(registry: str, ref: str, message: str) -> None:
    from instaflow_core.errors import InstaflowError

    res = _lineage(ref, "--tracking-uri", registry)
    assert isinstance(res.exception, InstaflowError), res.output
    assert message in str(res.exception) and "\n" not in str(res.exception)


def test_lineage_without_a_registry_says_so(tmp_path: Path) -> None:
    res = _lineage("instaflow-tiny@champion", "--set", f"storage.root=file://{tmp_path}/empty")
    assert "no MLflow registry at" in str(res.exception)
    assert not (tmp_path / "empty" / "mlflow.db").exists()  # asking does not create an empty registry


# ------------------------------------------------------------------------------------ the browser check
@pytest.fixture(scope="module")
def local_stack(tmp_path_factory: pytest.TempPathFactory):
    """`instaflow stack up` (S3 + Prefect + MLflow) on free ports in a tmp state folder."""
    from infra import seaweed, stack
    from infra.procs import free_port

    try:
        seaweed.find_weed()
    except seaweed.SeaweedError as err:
        pytest.skip(str(err))
    state = tmp_path_factory.mktemp("stack")
    ports = set()
    while len(ports) < 3:
        ports.add(free_port(avoid=ports))
    s3, prefect, mlflow = sorted(ports)
    try:
        stack.up(state, s3_port=s3, prefect_port=prefect, mlflow_port=mlflow, echo=lambda _: None)
        yield state, stack.env(state)
    finally:
        stack.down(state, echo=lambda _: None)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(
    find_chromium() is None, reason="chromium is not installed (Debian: apt-get install chromium)"
)
def test_prefect_ui_shows_the_lineage_artifact(local_stack, tmp_path: Path) -> None:

    chromium = find_chromium()
    state, env = local_stack
    api = env["PREFECT_API_URL"]
    ui = api.removesuffix("/api")

    # A tiny rebuild against the stack (`--stack`): store on its S3, registry on its MLflow, runs on its Prefect.
    summary_path = tmp_path / "summary.json"
    cmd = [
        str(Path(sys.executable).parent / "instaflow"),
        "rebuild",
        "--stack",
        "--preset",
        "tiny",
        "--json",
        str(summary_path),
    ]
    for s in fast_tiny_overrides():
        cmd += ["--set", s]
    # only the stack's folder: `--stack` itself must find its API, S3 endpoint, keys and MLflow
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "AWS_", "MLFLOW_"))}
    run_env.update(
        INSTAFLOW_STACK_DIR=str(state), PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1"
    )
    res = subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=800)
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert "Starting temporary server" not in res.stdout + res.stderr  # it ran on the stack's Prefect
    summary = json.loads(summary_path.read_text())
    assert summary["refs"]["prompts"]["db_uri"].startswith("s3://")
    flow_run_id = summary["run_id"]
    prompts_table = summary["refs"]["prompts"]["table"]

    # The UI asks the API at the URL the server hands it; a stack on a non-default port must hand out its own.
    ui_api = _get_json(f"{ui}/ui-settings").get("api_url", "").rstrip("/")
    assert ui_api == api, (
        f"the stack's Prefect UI talks to {ui_api}, not {api}: set PREFECT_UI_API_URL for the server"
    )

    out = TEST_OUTPUT / "ui-lineage"
    with Browser(chromium, tmp_path / "chromium-profile") as page:
        # 1. the Artifacts page lists the lineage artifact by key
        page.goto(f"{ui}/artifacts")
        assert page.wait_for_text("instaflow-lineage", 60), page.text()[-2000:]
        assert "Can't connect to Server API" not in page.text()
        page.screenshot(out / "artifacts.png")

        # 2. the artifact itself renders the chain
        artifact_id = _latest_artifact_id(api, "instaflow-lineage")
        page.goto(f"{ui}/artifacts/artifact/{artifact_id}")
        assert page.wait_for_text("InstaFlow rebuild lineage", 60), page.text()[-2000:]
        assert prompts_table in page.text() and "models:/instaflow-tiny/" in page.text()
        page.screenshot(out / "lineage-artifact.png")

        # 3. the rebuild's flow run page: its Artifacts tab holds the lineage artifact
        page.goto(f"{ui}/runs/flow-run/{flow_run_id}")
        assert page.wait_for_text("Completed", 60) and page.wait_for_text("Artifacts", 30), page.text()[
            -2000:
        ]
        assert page.click_text("Artifacts")
        assert page.wait_for_text("instaflow-lineage", 60), page.text()[-2000:]
        page.screenshot(out / "flow-run.png")

    # the same chain from MLflow tags alone, against the stack's registry
    res = _lineage("instaflow-tiny@champion", "--tracking-uri", env["MLFLOW_TRACKING_URI"], "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    # tags hold store-relative refs (a moved store still resolves them); the summary shows them resolved
    assert (
        info["refs"]["prompts"] == f"store://lance/{prompts_table}@v{summary['refs']['prompts']['version']}"
    )
    assert info["table_versions"]["prompts"] == str(summary["refs"]["prompts"]["version"])
    # the tagged Prefect run is the rebuild or one of its subflows (the register stage tags from inside its own)
    assert info["prefect_flow_run_id"] in {flow_run_id, *_child_runs(api, flow_run_id)}


def _child_runs(api: str, parent_id: str) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))
        )
    return [str(r.id) for r in runs]


def _get_json(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (loopback)
        return json.load(resp)


def _latest_artifact_id(api: str, key: str) -> str:
    import urllib.request

    body = json.dumps({"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}).encode()
    req = urllib.request.Request(
        f"{api}/artifacts/filter", data=body, headers={"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 (loopback)
        return json.load(resp)[0]["id"]
