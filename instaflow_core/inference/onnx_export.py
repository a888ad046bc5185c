"""ONNX export of a one-step (InstaFlow) model, and the onnxruntime runner that generates from it.

Three graphs, each with a dynamic batch axis:

    text_encoder.onnx   input_ids (B, T) int64              -> last_hidden_state (B, T, D)
    one_step.onnx       x0 (B, C, h, w), ehs (B, T, D)      -> x1 = X0 + v(X0, t=0 | ehs)
    vae_decoder.onnx    x1 (B, C, h, w) scaled latent        -> image (B, H, W, 3) float in [0, 1]

The one-step graph is `rectified_flow.one_step` over the model family's velocity (so the t -> timestep mapping is
traced from the family's module under models/, not restated); the decoder divides by the VAE scaling factor inside
the graph, as `InstaFlowPipeline` does before `vae.decode`. Classifier-free guidance needs no extra graph:
with one Euler step, X0 + v_u + w (v_c - v_u) = x1_u + w (x1_c - x1_u), so cond and uncond run as one batch of 2B.

`manifest.json` records the latent shape, scaling factor, opset and exporter; `tokenizer/` is the tokenizer, so
`OnnxOneStep(folder)` needs onnxruntime and transformers' tokenizer only, no torch model.

Exporter: torch.onnx's dynamo exporter (torch.export + onnxscript, the default since torch 2.9). A dimension
traced at size 1 is specialised to a constant by torch.export, so the graphs are traced at batch 2. One protobuf
file is capped at 2 GB: graphs whose weights pass 1 GiB (an SD 1.5 UNet is 3.4 GB in fp32) keep their weights
in `<name>.onnx.data` beside the graph, which onnxruntime finds by relative path (move the two together).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from instaflow_core.errors import DataError
from instaflow_core.models.family import Condition, Model, Velocity
from instaflow_core.rectified_flow import one_step

logger = logging.getLogger("instaflow.inference.onnx")

GRAPHS = ("text_encoder", "one_step", "vae_decoder")
EXPORT_BATCH = 2  # never 1: torch.export would specialise the batch dimension to a constant
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to <name>.onnx.data (protobuf's 2 GB cap)
DEFAULT_OPSET = 18  # onnxruntime 1.18+ runs it; the dynamo exporter's own default


# ------------------------------------------------------------------------------------------ wrappers
class TextEncoderGraph(nn.Module):
    """input_ids (B, T) -> last_hidden_state (B, T, D), what the SD family feeds its UNet (models/sd.py)."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=False)[0]


class OneStepGraph(nn.Module):
    """x0, encoder_hidden_states -> X0 + v(X0, t=0): `rectified_flow.one_step` over the family's velocity."""

    def __init__(self, velocity: Velocity) -> None:
        super().__init__()
        self.velocity = velocity  # holds the denoiser only

    def forward(self, x0: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return one_step(self.velocity, x0, Condition(embeds=encoder_hidden_states))


class VaeDecoderGraph(nn.Module):
    """Our latent (B, C, h, w) -> image (B, H, W, 3) in [0, 1]: the family's decode and the post-processing."""

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.model = model
        self.vae = model.vae  # registered, so the export sees the weights

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        img = self.model.family.decode(self.model, latent)
        return (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


# -------------------------------------------------------------------------------------------- export
def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _export_graph(
    module: nn.Module, args: tuple[torch.Tensor, ...], names: list[str], output: str, path: Path, opset: int
) -> None:
    """One graph, the batch axis dynamic on every input (and so on the output)."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    # Known-harmless noise of torch 2.13's exporter: "torchvision is not installed. Skipping torchvision::nms"
    # (a logger), torch.utils._pytree's LeafSpec deprecation, and "axis name batch will not be used" (the
    # inputs share one batch dimension, which is the point).
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*", category=UserWarning)
            torch.onnx.export(
                module.eval(),
                args,
                str(path),
                input_names=names,
                output_names=[output],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes={n: {0: batch} for n in names},
                external_data=_param_bytes(module) > EXTERNAL_DATA_BYTES,
                verbose=False,
            )
    finally:
        registration.setLevel(level)


ONNX_FAMILIES = ("sd", "digits")  # one CLIP text encoder, a condition of sequence embeddings alone


def export_onnx(
    model: Model,
    out_dir: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    on_graph: Callable[[str, float], None] | None = None,
) -> dict[str, Path]:
    """Export a one-step model (a loaded `Model` of a family in ONNX_FAMILIES) in fp32.

    Writes text_encoder / one_step / vae_decoder .onnx, tokenizer/ and manifest.json into `out_dir`; returns
    {graph name: path} plus "tokenizer" and "manifest". The export seconds per graph go into the manifest;
    `on_graph(name, seconds)` is called after each graph (progress).
    """
    if model.family.name not in ONNX_FAMILIES:
        raise DataError(
            f"ONNX export covers the {', '.join(ONNX_FAMILIES)} families (one text encoder); a "
            f"{model.family.name} model's conditions need more graphs than this exporter writes"
        )
    net, vae, text_encoder, tokenizer = model.denoiser, model.vae, model["text_encoder"], model["tokenizer"]
    if next(net.parameters()).dtype != torch.float32:
        raise DataError("ONNX export runs in float32: load the model with dtype float32")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c, h, w = model.latent_shape()
    d = int(text_encoder.config.hidden_size)
    n_tok = int(tokenizer.model_max_length)
    b = EXPORT_BATCH
    gen = torch.Generator().manual_seed(0)
    vocab = int(text_encoder.config.vocab_size)
    specs = {
        "text_encoder": (
            TextEncoderGraph(text_encoder),
            (torch.randint(0, vocab, (b, n_tok), generator=gen, dtype=torch.long),),
            ["input_ids"],
            "last_hidden_state",
        ),
        "one_step": (
            OneStepGraph(model.velocity()),
            (torch.randn(b, c, h, w, generator=gen), torch.randn(b, n_tok, d, generator=gen)),
            ["x0", "encoder_hidden_states"],
            "x1",
        ),
        "vae_decoder": (
            VaeDecoderGraph(model),
            (torch.randn(b, c, h, w, generator=gen),),
            ["latent"],
            "image",
        ),
    }
    paths: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    with torch.no_grad():
        for name, (module, args, names, output) in specs.items():
            paths[name] = out / f"{name}.onnx"
            start = time.perf_counter()
            logger.info("exporting %s to %s", name, paths[name])
            _export_graph(module, args, names, output, paths[name], opset)
            seconds[name] = round(time.perf_counter() - start, 3)
            if on_graph is not None:
                on_graph(name, seconds[name])
    tokenizer.save_pretrained(out / "tokenizer")
    paths["tokenizer"] = out / "tokenizer"
    manifest = {
        "graphs": {g: f"{g}.onnx" for g in GRAPHS},
        "latent_shape": [c, int(h), int(w)],
        "text_tokens": n_tok,
        "text_hidden_size": d,
        "family": model.family.name,
        "vae_scaling_factor": float(vae.config.scaling_factor),
        "opset": opset,
        "exporter": "torch.onnx dynamo",
        "torch": torch.__version__,
        "dynamic_axes": {"batch": 0},
        "export_seconds": seconds,
    }
    paths["manifest"] = out / "manifest.json"
    paths["manifest"].write_text(json.dumps(manifest, indent=2))
    return paths


# ------------------------------------------------------------------------------------------ inference
class OnnxOneStep:
    """The three onnxruntime sessions and the tokenizer of an exported folder: prompts + X0 -> images."""

    def __init__(self, onnx_dir: str | Path, providers: list[str] | None = None, threads: int = 1) -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        folder = Path(onnx_dir)
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            raise DataError(f"{folder}: not an instaflow ONNX export (no manifest.json)")
        self.manifest = json.loads(manifest.read_text())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # a path, not bytes: onnxruntime finds a graph's external .onnx.data relative to the graph file
        self.sessions = {
            g: ort.InferenceSession(
                str(folder / f"{g}.onnx"), sess_options=opts, providers=providers or ["CPUExecutionProvider"]
            )
            for g in GRAPHS
        }
        self.tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")

    def encode(self, prompts: list[str]) -> np.ndarray:
        """Prompts -> (B, T, D) float32, tokenized as the SD family's `clip_hidden_states` does."""
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.manifest["text_tokens"],
            truncation=True,
            return_tensors="np",
        ).input_ids.astype(np.int64)
        return self.sessions["text_encoder"].run(None, {"input_ids": ids})[0]

    def latents(self, prompts: list[str], x0: np.ndarray, guidance_scale: float = 1.0) -> np.ndarray:
        """X0 (B, C, h, w) float32 -> X1; guidance > 1 runs uncond and cond as one batch of 2B."""
        x0 = np.ascontiguousarray(x0, dtype=np.float32)
        run = self.sessions["one_step"].run
        if guidance_scale <= 1.0:
            return run(None, {"x0": x0, "encoder_hidden_states": self.encode(prompts)})[0]
        ehs = self.encode([""] * len(prompts) + list(prompts))
        x1_u, x1_c = np.split(run(None, {"x0": np.concatenate([x0, x0]), "encoder_hidden_states": ehs})[0], 2)
        return x1_u + guidance_scale * (x1_c - x1_u)

    def decode(self, x1: np.ndarray) -> np.ndarray:
        """Scaled latent -> float image (B, H, W, 3) in [0, 1]."""
        return self.sessions["vae_decoder"].run(None, {"latent": np.ascontiguousarray(x1, np.float32)})[0]

    def __call__(self, prompts: list[str], x0: np.ndarray, guidance_scale: float = 1.0) -> np.ndarray:
        """Prompts + X0 -> float images (B, H, W, 3) in [0, 1] (`images.to_uint8` for PNGs)."""
        if len(prompts) != len(x0):
            raise DataError(f"{len(prompts)} prompts for {len(x0)} noise rows")
        return self.decode(self.latents(list(prompts), x0, guidance_scale))
