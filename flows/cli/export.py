"""`instaflow export onnx`: the one-step model as ONNX (text encoder, one-step UNet, VAE decoder).

    instaflow export onnx --model instaflow-tiny@champion --out onnx/

After the export, onnxruntime generates from fixed noise and its images are compared with the PyTorch
pipeline's (printed as the max abs error; the export fails above --tolerance). A registered model also gets the
export recorded: the folder is logged into the version's run under `onnx/`, and the version is tagged
`instaflow.onnx_uri` = runs:/<run>/onnx.
"""

from __future__ import annotations

from pathlib import Path

import typer

from flows.cli.options import PresetOpt, SetOpt
from flows.cli.sources import ModelOpt, TrackingOpt, resolve_model
from instaflow_core.errors import ConfigError, DataError

app = typer.Typer(help="Export a model for other runtimes.", no_args_is_help=True)

CHECK_PROMPTS = ["a red car", "a photo of a cat"]


def check_against_torch(model: object, onnx_dir: Path, guidance: float = 1.0) -> float:
    """Max abs error between onnxruntime's and PyTorch's one-step images (float, [0, 1]), same noise."""
    import numpy as np
    import torch

    from instaflow_core.inference.generate import flow_latents_from
    from instaflow_core.inference.onnx_export import OnnxOneStep
    from instaflow_core.rectified_flow import noise_from_seeds

    x0 = noise_from_seeds([0, 1], model.latent_shape())
    with torch.no_grad():  # float images, as the ONNX decoder graph gives them (no uint8 rounding)
        x1 = flow_latents_from(model, x0, model.encode(CHECK_PROMPTS), 1, guidance)
        images = model.family.decode(model, x1)
    reference = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    got = OnnxOneStep(onnx_dir)(CHECK_PROMPTS, x0.numpy(), guidance)
    return float(np.abs(reference - got).max())


@app.command("onnx")
def onnx_cmd(
    model: str = ModelOpt,
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the .onnx graphs, tokenizer and manifest."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (onnxruntime >= 1.18 runs 18)."),
    tolerance: float = typer.Option(1e-3, "--tolerance", help="Largest ORT vs PyTorch pixel error accepted."),
    force: bool = typer.Option(False, "--force", help="Write into a folder that already holds files."),
    record: bool = typer.Option(True, "--record/--no-record", help="Record the export on the model version."),
    tracking_uri: str = TrackingOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Export text encoder, one-step UNet and VAE decoder as ONNX (fp32, dynamic batch) and check them."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise ConfigError(f"--out {out} exists and is not empty (use --force to write into it)")
    if not 14 <= opset <= 23:
        raise ConfigError(f"--opset {opset}: choose 14..23 (18 is the tested one)")
    resolved = resolve_model(model, preset, set_, tracking_uri)
    steps = int(resolved.defaults.get("num_inference_steps", 1))
    if steps > 1:
        typer.secho(
            f"note: {resolved.label} is registered for {steps} steps; the ONNX graph runs one Euler step",
            fg="yellow",
            err=True,
        )
    import torch

    from instaflow_core.inference.generate import load_model_folder
    from instaflow_core.inference.onnx_export import export_onnx

    loaded = load_model_folder(resolved.folder, dtype="float32", device="cpu")
    typer.echo(f"exporting {resolved.label} to {out} (opset {opset}; a few minutes on a CPU)")
    with torch.no_grad():
        paths = export_onnx(
            loaded, out, opset=opset, on_graph=lambda g, sec: typer.echo(f"  {g}: {sec:.0f} s")
        )
    error = check_against_torch(loaded, out)
    if error > tolerance:
        raise DataError(f"the ONNX images differ from PyTorch's by {error:.2e} (> --tolerance {tolerance:g})")
    for name in ("text_encoder", "one_step", "vae_decoder"):
        size = sum(p.stat().st_size for p in out.glob(f"{name}.onnx*"))
        typer.echo(f"  {paths[name]}  {size / 1e6:.1f} MB")
    typer.echo(
        f"onnxruntime vs PyTorch, one step, same noise: max abs error {error:.2e} (tolerance {tolerance:g})"
    )
    if record and resolved.version:
        from flows.cli.lineage import resolve_tracking_uri
        from tasks.tracking.client import mlflow_client
        from tasks.tracking.resolve import record_onnx_export

        _, (registry, storage) = resolve_tracking_uri(preset, set_, tracking_uri)
        with mlflow_client(registry, storage) as client:
            mv = client.get_model_version(resolved.name, resolved.version)
            uri = record_onnx_export(client, mv, out, opset)
        typer.echo(f"recorded on models:/{resolved.name}/{resolved.version}: {uri}")
