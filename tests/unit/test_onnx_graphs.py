"""The ONNX graph wrappers and the large-model branch of the export, on one small graph.

An SD 1.5 UNet passes protobuf's 2 GB cap, so graphs over `EXTERNAL_DATA_BYTES` keep their weights in a
`<name>.onnx.data` file beside the graph. The threshold is lowered here so the tiny VAE decoder takes that
branch: the data file must exist, onnxruntime must find it by its relative path after the pair is moved, and the
graph must compute what the PyTorch module computes for a batch size it was not traced at.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from instaflow_core.inference import onnx_export
from instaflow_core.inference.onnx_export import OneStepGraph, VaeDecoderGraph
from instaflow_core.rectified_flow import noise_from_seeds

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_one_step_graph_is_one_euler_step_of_the_velocity(tiny) -> None:
    x0 = noise_from_seeds([1, 2], (4, 8, 8))
    velocity = tiny.velocity()
    cond = tiny.encode(["a cat", "a red car"])
    with torch.no_grad():
        expected = x0 + velocity(x0, torch.zeros(2), cond)  # X1 = X0 + v(X0, t=0)
        # the graph takes the sequence embeddings alone (the SD family's whole condition)
        got = OneStepGraph(velocity)(x0, cond.embeds)
        assert torch.allclose(got, expected, atol=1e-6)
        # and it is the UNet at timestep 1000
        ref = x0 + tiny.denoiser(x0, torch.full((2,), 1000.0), encoder_hidden_states=cond.embeds).sample
        assert torch.allclose(got, ref, atol=1e-6)


@pytest.mark.slow  # an export: a minute or two on a loaded 2-core machine
def test_external_data_branch_runs_in_onnxruntime(tiny, tmp_path: Path, monkeypatch) -> None:
    import onnxruntime as ort

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    module = VaeDecoderGraph(tiny)
    path = tmp_path / "a" / "vae_decoder.onnx"
    path.parent.mkdir()
    with torch.no_grad():
        onnx_export._export_graph(module, (torch.randn(2, 4, 8, 8),), ["latent"], "image", path, 18)
    assert (tmp_path / "a" / "vae_decoder.onnx.data").stat().st_size > path.stat().st_size  # weights outside
    shutil.move(
        tmp_path / "a", tmp_path / "b"
    )  # the pair moves together; the graph names its data relatively
    session = ort.InferenceSession(
        str(tmp_path / "b" / "vae_decoder.onnx"), providers=["CPUExecutionProvider"]
    )
    latent = noise_from_seeds([3, 4, 5], (4, 8, 8))
    got = session.run(None, {"latent": latent.numpy()})[0]
    with torch.no_grad():
        ref = module(latent).numpy()
    assert got.shape == ref.shape == (3, 16, 16, 3) and float(np.abs(got - ref).max()) < 1e-4
