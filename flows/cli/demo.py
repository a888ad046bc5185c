"""`instaflow demo`: the web page (Gradio, loopback) to try registered models, folders and the teacher.

    instaflow demo                                   # champion (1 step) + the 2-RF champion + the teacher
    instaflow demo --model instaflow-tiny@champion --model ./other-model --port 7861

Generate tab: prompt, seed, steps (the model's default: 1 for InstaFlow), guidance, batch -> the images, the
time each took and the model's lineage (registry version, prompt set, triplet table, evaluation metrics).
Compare tab: up to three models on the same prompt and noise, each at its own steps (InstaFlow 1 step, the 2-RF
at its registered steps, the teacher's DPM-Solver at evaluation.teacher_steps), like the paper's figure.
`--model teacher` names the config's teacher. Models are found at start-up (a bad name fails at once) and
loaded on their first use.
"""

from __future__ import annotations

import threading
from typing import Any

import typer

from flows.cli.options import PresetOpt, SetOpt, load_config
from flows.cli.sources import TrackingOpt, default_model, resolve_model
from instaflow_core.config import InstaflowConfig
from instaflow_core.errors import InstaflowError
from instaflow_core.refs import ModelKind
from tasks.tracking.resolve import ResolvedModel

TEACHER = "teacher"


def _lazy(load: Any) -> Any:
    """`load()` once, on first use, thread safe (gradio calls handlers from worker threads)."""
    lock, box = threading.Lock(), []

    def get() -> Any:
        with lock:
            if not box:
                box.append(load())
            return box[0]

    return get


def flow_model(resolved: ResolvedModel, dtype: str) -> Any:
    """A DemoModel over a rectified-flow folder of any family (Euler steps along its velocity)."""
    from instaflow_core.inference.demo_app import DemoModel
    from instaflow_core.inference.generate import flow_images, load_model_folder

    pipe = _lazy(lambda: load_model_folder(resolved.folder, dtype=dtype))

    def run(prompts: list[str], seeds: list[int], steps: int, guidance: float) -> Any:
        return flow_images(pipe(), prompts, seeds, steps, guidance)

    return DemoModel(
        label=resolved.label,
        generate=run,
        steps=int(resolved.defaults.get("num_inference_steps", 1)),
        guidance=float(resolved.defaults.get("guidance_scale", 1.0)),
        lineage=resolved.lineage or {"folder": str(resolved.folder)},
        load=pipe,
    )


def teacher_model(cfg: InstaflowConfig) -> Any:
    """A DemoModel over the config's teacher: its own sampler with guidance, as evaluation runs it."""
    from instaflow_core.evaluation.sampling import Sampler, SamplerSpec
    from instaflow_core.inference.demo_app import DemoModel
    from instaflow_core.models.loading import teacher_parts

    components = _lazy(lambda: teacher_parts(cfg.models))

    def run(prompts: list[str], seeds: list[int], steps: int, guidance: float) -> Any:
        spec = SamplerSpec(f"teacher_{steps}step", ModelKind.TEACHER.value, "dpmsolver++", steps, guidance)
        return Sampler(components(), spec)(prompts, seeds)

    return DemoModel(
        label=f"teacher ({cfg.models.teacher})",
        generate=run,
        steps=cfg.evaluation.teacher_steps,
        guidance=cfg.evaluation.teacher_guidance,
        lineage={"kind": ModelKind.TEACHER.value, "teacher": cfg.models.teacher, "solver": "dpmsolver++"},
        load=components,
    )


def demo_models(
    specs: list[str] | None,
    cfg: InstaflowConfig,
    preset: str,
    sets: list[str] | None,
    tracking_uri: str | None,
) -> list[Any]:
    """The page's models: the named ones (errors stop the demo), else the champion, the 2-RF and the teacher."""
    explicit = bool(specs)
    if not specs:
        specs = [default_model(cfg)]
        if cfg.registration.rf_model_name:
            specs.append(f"{cfg.registration.rf_model_name}@champion")
        specs.append(TEACHER)
    models = []
    for i, spec in enumerate(specs):
        if spec == TEACHER:
            models.append(teacher_model(cfg))
            continue
        try:
            models.append(flow_model(resolve_model(spec, preset, sets, tracking_uri), cfg.models.dtype))
        except InstaflowError as err:
            if explicit or i == 0:
                raise
            typer.secho(f"note: leaving {spec} out of the demo: {err}", fg="yellow", err=True)
    return models


def demo(
    model: list[str] = typer.Option(
        None,
        "--model",
        "-m",
        help="NAME@ALIAS, NAME/VERSION, a folder, a file:// / s3:// folder, or `teacher` (repeatable; default: "
        "the champion, the 2-RF champion and the teacher).",
    ),
    port: int = typer.Option(7860, "--port", help="Port on 127.0.0.1."),
    tracking_uri: str = TrackingOpt,
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Open a local web page to generate with registered models and compare them side by side."""
    from infra.procs import LOOPBACK, port_in_use
    from instaflow_core.errors import ConfigError

    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port}: choose 1..65535")
    if port_in_use(port, LOOPBACK):
        raise ConfigError(f"port {port} on {LOOPBACK} is in use: choose another with --port")
    cfg = load_config(preset, set_)
    models = demo_models(model, cfg, preset, set_, tracking_uri)
    from instaflow_core.inference.demo_app import build_demo, launch

    page = build_demo(models)

    def ready(url: str) -> None:
        typer.echo(
            f"demo on {url} ({len(models)} model(s): {', '.join(m.label for m in models)}); Ctrl-C stops it"
        )

    try:
        launch(page, port, on_ready=ready)
    except OSError as err:
        raise ConfigError(f"cannot serve the demo on port {port}: {err}") from err
