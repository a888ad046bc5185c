"""The MLflow pyfunc model: a diffusers folder behind `predict(prompts) -> images`.

Registered by tasks/registration.py with the folder as the `diffusers` artifact, so
`mlflow.pyfunc.load_model("models:/instaflow-tiny@champion").predict(["a red car"])` returns uint8 images
(B, H, W, 3). Generation is the same path the evaluation measured (instaflow_core.evaluation.sampling.Sampler: the
InstaFlowPipeline's Euler loop from X0 = noise_from_seeds(seeds)), so a registered model reproduces its
evaluation samples for the same prompt and seed.

Input: a DataFrame with a `prompt` column and an optional `seed` column, a list of prompts, one prompt, or a
dict {"prompt": [...], "seed": [...]}. Params (per call): `num_inference_steps`, `guidance_scale`; their defaults
come from the model config recorded at registration (1 step / no guidance for InstaFlow; N steps with the 2-RF
guidance for a 2-RF). The model is logged "from code" (this file is copied into the model and run when it
loads, nothing is pickled); loading needs the `instaflow` package installed for instaflow_core.
"""

from __future__ import annotations

from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np

from instaflow_core.refs import ModelKind

DIFFUSERS_ARTIFACT = "diffusers"


def parse_input(model_input: Any) -> tuple[list[str], list[int]]:
    """Prompts and seeds from the accepted input shapes; missing seeds are 0, 1, 2, ... in row order."""
    import pandas as pd

    seeds: list[int] | None = None
    if isinstance(model_input, str):
        prompts = [model_input]
    elif isinstance(model_input, pd.DataFrame):
        if "prompt" not in model_input.columns:
            column = model_input.columns[0]
        else:
            column = "prompt"
        prompts = [str(p) for p in model_input[column].tolist()]
        if "seed" in model_input.columns:
            seeds = [int(s) for s in model_input["seed"].tolist()]
    elif isinstance(model_input, dict):
        raw = model_input.get("prompt", [])
        prompts = [raw] if isinstance(raw, str) else [str(p) for p in raw]
        if "seed" in model_input:
            raw_seeds = model_input["seed"]
            seeds = [int(raw_seeds)] if np.isscalar(raw_seeds) else [int(s) for s in raw_seeds]
    else:
        prompts = [str(p) for p in np.asarray(model_input).reshape(-1).tolist()]
    if seeds is None:
        seeds = list(range(len(prompts)))
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    return prompts, seeds


class DiffusersPyfunc(mlflow.pyfunc.PythonModel):
    """Text in, uint8 images (B, H, W, 3) out, from the diffusers folder logged as the `diffusers` artifact."""

    def load_context(self, context: Any) -> None:
        from instaflow_core.models.loading import load_source

        config = dict(getattr(context, "model_config", None) or {})
        self.defaults = {
            "num_inference_steps": int(config.get("num_inference_steps", 1)),
            "guidance_scale": float(config.get("guidance_scale", 1.0)),
            "batch_size": int(config.get("batch_size", 8)),
        }
        self.kind = str(config.get("kind", ModelKind.INSTAFLOW.value))
        self.components = load_source(
            context.artifacts[DIFFUSERS_ARTIFACT], dtype=config.get("dtype", "float32")
        )

    # No type hint on model_input: MLflow would treat one as a schema of its own; the signature given at
    # registration is the schema.
    def predict(self, context, model_input, params=None):
        """DataFrame / dict / list of prompts (+ seeds) -> uint8 images (B, H, W, 3)."""
        from instaflow_core.evaluation.sampling import SamplerSpec, generate_images

        p = {**self.defaults, **{k: v for k, v in (params or {}).items() if v is not None}}
        prompts, seeds = parse_input(model_input)
        spec = SamplerSpec(
            name="pyfunc",
            model_kind=self.kind,
            solver="euler",
            steps=int(p["num_inference_steps"]),
            guidance=float(p["guidance_scale"]),
        )
        return generate_images(self.components, spec, prompts, seeds, batch_size=int(p["batch_size"]))


def signature(steps: int, guidance: float) -> Any:
    """prompt (+ optional seed) in, uint8 (B, H, W, 3) out; steps and guidance as call params."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False)]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        params=ParamSchema(
            [
                ParamSpec("num_inference_steps", "long", int(steps)),
                ParamSpec("guidance_scale", "double", float(guidance)),
            ]
        ),
    )


# Models from code (MLflow 3): registration logs this file, and loading runs it, so no pickled class is stored.
mlflow.models.set_model(DiffusersPyfunc())
