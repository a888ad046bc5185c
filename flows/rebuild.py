"""The end-to-end rebuild: prompts -> (a pretrained teacher) -> triplets -> 2-RF -> InstaFlow -> evaluation ->
registered model.

Every stage is a subflow (so the Prefect run graph shows them) whose tasks are cached on the references they
consume: a rebuild with nothing changed is all cache hits, and a changed config section recomputes only the
stages downstream of it. `refresh` forces a stage and every stage that depends on its outputs (the stage
graph, `instaflow_core.refs.GRAPH`: which stages consume what, and which of teacher / pretrain runs).
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from prefect.context import FlowRunContext

from flows.curate import curate_flow
from flows.distill import distill_flow
from flows.evaluate import evaluate_flow
from flows.generate import generate_flow
from flows.pretrain import pretrain_flow
from flows.reflow import reflow_flow
from flows.register import register_flow
from instaflow_core.config import InstaflowConfig
from instaflow_core.refs import RefName, Stage, downstream, parse_stages, topological_order
from tasks.caching import stage_settings
from tasks.lineage import finish_rebuild, save_resolved_config
from tasks.teacher import teacher_model
from tasks.tracking.runs import start_rebuild_run


@flow(name="instaflow-rebuild", log_prints=True)
def rebuild_flow(cfg: InstaflowConfig, refresh: list[str] | None = None) -> dict[str, Any]:
    """Curate -> (pretrain) -> generate -> reflow -> distill -> evaluate -> register (-> promote when the gate
    passes). `models.teacher: pretrain` trains the teacher on the curated images; any other teacher is resolved."""
    started = time.perf_counter()
    forced = downstream(parse_stages(refresh, "--refresh"))
    if forced:
        print(f"--refresh: forcing {', '.join(s for s in topological_order() if s in forced)}")
    ctx = FlowRunContext.get()
    run_id = str(ctx.flow_run.id) if ctx else time.strftime("%Y%m%d-%H%M%S")
    config_uri = save_resolved_config(cfg, run_id)
    mlflow_run = start_rebuild_run(cfg, run_id)  # stage runs nest under it (not part of any cache key)

    if Stage.TEACHER.runs(cfg):  # a given teacher, resolved (else the pretrain stage trains one)
        with stage_settings(Stage.TEACHER, forced):
            teacher = teacher_model(cfg.models, cfg.storage)
    with stage_settings(Stage.CURATE, forced):
        prompts = curate_flow(cfg)
    if Stage.PRETRAIN.runs(cfg):
        with stage_settings(Stage.PRETRAIN, forced):
            teacher = pretrain_flow(cfg, prompts, mlflow_parent_run_id=mlflow_run)
    with stage_settings(Stage.GENERATE, forced):
        triplets = generate_flow(cfg, prompts, teacher)
    with stage_settings(Stage.REFLOW, forced):
        rf = reflow_flow(cfg, triplets, teacher, mlflow_parent_run_id=mlflow_run)
    with stage_settings(Stage.DISTILL, forced):
        one_step = distill_flow(cfg, rf, prompts, mlflow_parent_run_id=mlflow_run, teacher=teacher)
        # the paper's control: the teacher distilled alike (distill(1-RF) vs distill(2-RF) at one budget)
        control = (
            distill_flow(cfg, teacher, prompts, mlflow_parent_run_id=mlflow_run, teacher=teacher)
            if cfg.distillation.teacher_control
            else None
        )
    with stage_settings(Stage.EVALUATE, forced):
        models = {RefName.RF2: rf, RefName.INSTAFLOW: one_step}
        if control is not None:
            models[RefName.CONTROL] = control
        evaluation = evaluate_flow(cfg, models, teacher, prompts, parent_run_id=mlflow_run)
    refs = {RefName.TEACHER: teacher, RefName.PROMPTS: prompts, RefName.TRIPLETS: triplets, **models}
    lineage = {name: ref.key() for name, ref in refs.items()}
    with stage_settings(Stage.REGISTER, forced):
        registered = register_flow(cfg, one_step, evaluation, lineage, rf_model=rf, parent_run_id=mlflow_run)

    return finish_rebuild(cfg, run_id, refs, evaluation, registered, mlflow_run, config_uri, started)


@flow(name="instaflow-scheduled-rebuild", log_prints=True)
def scheduled_rebuild(
    preset: str = "tiny", overrides: list[str] | None = None, refresh: list[str] | None = None
) -> dict:
    """Deployment entry point: parameters are plain JSON (preset + overrides), resolved on the worker."""
    from instaflow_core.config import load
    from tasks.caching import prefect_settings

    cfg = load(preset, overrides or [])
    with prefect_settings(cfg.storage, cfg.orchestration):
        return rebuild_flow(cfg, refresh=refresh or [])
