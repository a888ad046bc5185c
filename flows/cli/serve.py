"""`instaflow serve NAME@ALIAS`: the registered pyfunc model behind MLflow's scoring server (`mlflow models serve`).

    instaflow serve instaflow-tiny@champion --port 5001
    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \
      -d '{"dataframe_split": {"columns": ["prompt", "seed"], "data": [["a red car", 0]]},
           "params": {"num_inference_steps": 1}}'
    -> {"predictions": [[[[r, g, b], ...]]]}   uint8 images (B, H, W, 3) as nested lists

It runs exactly `mlflow models serve -m models:/NAME@ALIAS --env-manager local -h HOST -p PORT --workers N` with
the registry of the config in MLFLOW_TRACKING_URI and this environment's bin/ first on PATH (the server starts
`uvicorn` by name). `--env-manager local` serves from this environment (the default, virtualenv, would build a
new one and install torch into it); each worker loads its own copy of the model. The schema is the model's
signature: `prompt` (string, required), `seed` (long, optional); params `num_inference_steps` (long: send
JSON integers, 2.0 is refused) and `guidance_scale` (double).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import typer

from flows.cli.lineage import find_version, parse_model_ref, resolve_tracking_uri
from flows.cli.options import PresetOpt, SetOpt
from flows.cli.sources import TrackingOpt, is_folder_spec
from instaflow_core.errors import ConfigError


def serve_command(model_uri: str, host: str, port: int, workers: int) -> list[str]:
    """The `mlflow models serve` argv (the mlflow of this environment)."""
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    exe = str(mlflow_bin) if mlflow_bin.exists() else "mlflow"
    return [
        exe, "models", "serve", "-m", model_uri, "--env-manager", "local",
        "-h", host, "-p", str(port), "--workers", str(workers),
    ]  # fmt: skip


def serve(
    model: str = typer.Argument(
        None, help="NAME@ALIAS or NAME/VERSION (default: registration.model_name@champion)."
    ),
    port: int = typer.Option(5001, "--port", help="Port of the scoring server."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    workers: int = typer.Option(1, "--workers", help="Server processes; each loads the model."),
    tracking_uri: str = TrackingOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Serve a registered model over HTTP with `mlflow models serve` (POST /invocations)."""
    from flows.cli.options import load_config
    from tasks.tracking.client import mlflow_client

    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port}: choose 1..65535")
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    cfg = load_config(preset, set_)
    spec = model or f"{cfg.registration.model_name}@champion"
    if is_folder_spec(spec):
        raise ConfigError(
            f"{spec}: `instaflow serve` serves a registered model (NAME@ALIAS or NAME/VERSION); "
            "a folder becomes one through the register stage"
        )
    name, alias, version = parse_model_ref(spec)
    uri, (registry, storage) = resolve_tracking_uri(preset, set_, tracking_uri)
    with mlflow_client(registry, storage) as client:
        find_version(client, name, alias, version)  # a one-line error now, not a traceback from the server
    model_uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
    argv = serve_command(model_uri, host, port, workers)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("HF_HUB_OFFLINE", "1")
    typer.echo(f"MLFLOW_TRACKING_URI={uri} {shlex.join(argv)}", err=True)
    typer.echo(
        f"serving {model_uri} on http://{host}:{port}/invocations (GET /ping answers once it is loaded)",
        err=True,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)  # the server takes this process over: Ctrl-C and signals go to it
