"""Using the registered champion: `instaflow sample`, `export onnx` and `serve` against a real MLflow registry.

The registry (tests/plugins/registered_models.py) holds a tiny one-step model registered through the register
stage's own code and aliased `champion`. Each way of using it must give the image the registered pyfunc model
gives for the same prompt and seed (sample, the scoring server), or match the PyTorch pipeline to < 1e-3 on
the same noise (onnxruntime), and the ONNX export must be recorded on the model version.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import PIL.Image
import pytest
from typer.testing import CliRunner

from flows.cli.main import app
from infra.procs import LOOPBACK, free_port, http_ok, log_tail, stop_pid, wait_until
from instaflow_core.errors import InstaflowError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a red car on a street", "a photo of a cat"]


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def _pyfunc_images(reg: Any, prompts: list[str], seeds: list[int], params: dict | None = None) -> np.ndarray:
    """The registered model, loaded the way MLflow serves it, for a reference."""
    import mlflow

    mlflow.set_tracking_uri(reg.tracking_uri)
    mlflow.set_registry_uri(reg.tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{reg.name}@champion")
        return model.predict(pd.DataFrame({"prompt": prompts, "seed": seeds}), params=params)
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


def test_sample_from_the_champion_is_the_registered_model_image(registered_tiny: Any, tmp_path: Path) -> None:
    reg = registered_tiny
    res = _cli("sample", PROMPTS[0], "--model", f"{reg.name}@champion", "-n", "2", "--seed", "5",
               "-o", str(tmp_path / "out"), *reg.cli)  # fmt: skip
    assert res.exit_code == 0, (res.output, res.exception)
    assert f"from {reg.name}@champion (models:/{reg.name}/{reg.version})" in res.output
    got = np.stack([np.asarray(PIL.Image.open(p)) for p in sorted((tmp_path / "out").glob("*.png"))])
    ref = _pyfunc_images(reg, [PROMPTS[0]] * 2, [5, 6])
    assert got.shape == ref.shape == (2, 16, 16, 3)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    # by version, and as a models:/ URI: the same model
    res = _cli("sample", PROMPTS[0], "-m", f"models:/{reg.name}/{reg.version}", "--seed", "5",
               "-o", str(tmp_path / "v.png"), *reg.cli)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "v.png")), got[0])


def test_registry_mistakes_are_one_line(registered_tiny: Any, tmp_path: Path) -> None:
    reg = registered_tiny
    cases = {
        "nope@champion": "no registered model 'nope'",
        f"{reg.name}@staging": f"{reg.name} has no alias 'staging' (aliases: candidate, champion",
        f"{reg.name}/99": f"{reg.name} has no version 99",
    }
    for spec, message in cases.items():
        res = _cli("sample", "a cat", "-m", spec, "-o", str(tmp_path / "x.png"), *reg.cli)
        assert isinstance(res.exception, InstaflowError) and message in str(res.exception), (spec, res.output)
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    res = _cli("sample", "a cat", "-m", f"{reg.name}@champion", "-o", "x.png", "--tracking-uri", missing)
    assert isinstance(res.exception, InstaflowError) and "no MLflow registry at" in str(res.exception)
    assert not (tmp_path / "none.db").exists() and not (tmp_path / "x.png").exists()


def test_signature_holds_the_input_and_output_schema(registered_tiny: Any) -> None:
    import mlflow

    reg = registered_tiny
    mlflow.set_registry_uri(reg.tracking_uri)
    mlflow.set_tracking_uri(reg.tracking_uri)
    try:
        sig = mlflow.models.get_model_info(f"models:/{reg.name}@champion").signature
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    inputs = {c["name"]: c for c in sig.inputs.to_dict()}
    assert inputs["prompt"]["type"] == "string" and inputs["prompt"]["required"] is True
    assert inputs["seed"]["type"] == "long" and inputs["seed"]["required"] is False
    (out,) = sig.outputs.to_dict()
    assert out["tensor-spec"]["dtype"] == "uint8" and list(out["tensor-spec"]["shape"]) == [-1, -1, -1, 3]
    params = {p["name"]: p for p in sig.params.to_dict()}
    assert params["num_inference_steps"]["default"] == 1 and params["guidance_scale"]["type"] == "double"


def test_onnx_export_matches_pytorch_and_is_recorded(registered_tiny: Any, tmp_path: Path) -> None:
    import mlflow
    import onnx
    from mlflow import MlflowClient

    from instaflow_core.inference.generate import load_model_folder
    from instaflow_core.inference.onnx_export import GRAPHS, OnnxOneStep
    from instaflow_core.inference.pipeline import InstaFlowPipeline
    from instaflow_core.rectified_flow import noise_from_seeds

    reg = registered_tiny
    out = tmp_path / "onnx"
    res = _cli("export", "onnx", "--model", f"{reg.name}@champion", "--out", str(out), *reg.cli)
    assert res.exit_code == 0, (res.output, res.exception)
    assert "max abs error" in res.output and f"recorded on models:/{reg.name}/{reg.version}" in res.output
    for graph in GRAPHS:  # every input and the output has a symbolic (dynamic) batch dimension
        g = onnx.load(str(out / f"{graph}.onnx"), load_external_data=False).graph
        assert all(v.type.tensor_type.shape.dim[0].dim_param for v in [*g.input, *g.output]), graph
        assert (
            max(
                o.version
                for o in onnx.load(str(out / f"{graph}.onnx")).opset_import
                if o.domain in ("", "ai.onnx")
            )
            == 18
        )

    model = load_model_folder(reg.folder, device="cpu")
    pipe = InstaFlowPipeline.from_model(model)  # float images in [0, 1], as the ONNX decoder graph gives them
    pipe.set_progress_bar_config(disable=True)
    runner = OnnxOneStep(out)
    prompts = [*PROMPTS, "a lighthouse at sunset"]
    for batch, guidance in ((1, 1.0), (3, 1.0), (2, 3.0)):  # batch sizes the export was not traced at
        x0 = noise_from_seeds(list(range(10, 10 + batch)), model.latent_shape())
        ref = np.asarray(
            pipe(
                prompts[:batch], num_inference_steps=1, guidance_scale=guidance, latents=x0, output_type="np"
            ).images
        )
        got = runner(prompts[:batch], x0.numpy(), guidance)
        assert got.shape == ref.shape == (batch, 16, 16, 3)
        assert float(np.abs(got - ref).max()) < 1e-3, (batch, guidance)

    client = MlflowClient(reg.tracking_uri, reg.tracking_uri)
    mv = client.get_model_version(reg.name, reg.version)
    assert (
        mv.tags["instaflow.onnx_uri"] == f"runs:/{mv.run_id}/onnx" and mv.tags["instaflow.onnx_opset"] == "18"
    )
    logged = {Path(a.path).name for a in client.list_artifacts(mv.run_id, "onnx")}
    assert {f"{g}.onnx" for g in GRAPHS} | {"manifest.json", "tokenizer"} <= logged
    mlflow.set_tracking_uri(reg.tracking_uri)
    try:
        back = Path(
            mlflow.artifacts.download_artifacts(mv.tags["instaflow.onnx_uri"], dst_path=str(tmp_path / "dl"))
        )
    finally:
        mlflow.set_tracking_uri(None)
    x0 = noise_from_seeds([0], model.latent_shape()).numpy()
    assert np.array_equal(OnnxOneStep(back)(PROMPTS[:1], x0), runner(PROMPTS[:1], x0))
    res = _cli("sample", "a cat", "-m", f"{reg.name}@champion", "-o", str(tmp_path / "x.png"), *reg.cli)
    assert res.exit_code == 0  # the registered model still loads with the export beside it

    res = _cli("export", "onnx", "--model", f"{reg.name}@champion", "--out", str(out), *reg.cli)
    assert isinstance(res.exception, InstaflowError) and "exists and is not empty" in str(res.exception)


def _post(url: str, payload: Any) -> tuple[int, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:  # noqa: S310 - loopback
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


@pytest.mark.slow
def test_serve_the_champion_with_mlflow_models_serve(registered_tiny: Any, tmp_path: Path) -> None:
    """`instaflow serve` = `mlflow models serve -m models:/NAME@champion --env-manager local` on loopback."""
    reg = registered_tiny
    exe = Path(sys.executable).with_name("instaflow")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.cli"]
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [*cmd, "serve", f"{reg.name}@champion", "--port", str(port), *reg.cli],
            cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    base = f"http://{LOOPBACK}:{port}"
    try:
        ready = wait_until(
            lambda: http_ok(f"{base}/ping"), 400, interval=1.0, alive=lambda: proc.poll() is None
        )
        assert ready, log_tail(log, 40)
        assert f"mlflow models serve -m models:/{reg.name}@champion --env-manager local" in log.read_text()
        payload = {
            "dataframe_split": {"columns": ["prompt", "seed"], "data": [[PROMPTS[0], 3], [PROMPTS[1], 4]]},
            "params": {"num_inference_steps": 1, "guidance_scale": 1.0},
        }
        status, answer = _post(f"{base}/invocations", payload)
        assert status == 200, answer
        served = np.asarray(answer["predictions"])
        assert served.shape == (2, 16, 16, 3) and served.min() >= 0 and served.max() <= 255
        assert np.array_equal(served, _pyfunc_images(reg, PROMPTS, [3, 4]))
        status, _ = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["seed"], "data": [[0]]}})
        assert status == 400  # the signature requires a prompt
    finally:
        stop_pid(proc.pid, timeout=20)
    assert proc.poll() is not None
