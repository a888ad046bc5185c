"""The end-to-end rebuild: prompts -> triplets -> 2-RF -> InstaFlow -> evaluation -> registered model.

Every stage is a subflow (so the Prefect run graph shows them) whose tasks are cached on the references they
consume: a rebuild with nothing changed is all cache hits, and a changed config section recomputes only the
stages downstream of it. `refresh` forces a stage and everything after it.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext

from flows.curate import curate_flow
from flows.distill import distill_flow
from flows.evaluate import evaluate_flow
from flows.generate import generate_flow
from flows.reflow import reflow_flow
from flows.register import register_flow
from instaflow_core.config import InstaflowConfig
from instaflow_core.errors import ConfigError
from tasks.common import publish_markdown
from tasks.lineage import (
    emit_assets,
    end_rebuild_run,
    lineage_chain,
    remember_evaluation,
    remember_refs,
    save_resolved_config,
    stage_states,
    start_rebuild_run,
)
from tasks.models import teacher_model

STAGES = ("teacher", "curate", "generate", "reflow", "distill", "evaluate", "register")


def check_refresh(refresh: list[str]) -> list[str]:
    unknown = [s for s in refresh if s not in STAGES]
    if unknown:
        raise ConfigError(f"--refresh {unknown[0]!r}: choose from {', '.join(STAGES)}")
    return refresh


@contextlib.contextmanager
def _stage(stage: str, first_forced: int | None):
    """Settings for one stage's subflow.

    - Heartbeats off for the stage subflows: Prefect's heartbeat thread sleeps in 1 s steps and is joined when a
      flow run ends, which added ~1 s to every stage (most of a no-change rebuild's time). The rebuild's own run
      keeps its heartbeat, so a crashed rebuild is still detected.
    - Refresh the cache (force re-execution) of every task in this stage when it is at or after the first stage
      the user asked to refresh.
    """
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_TASKS_REFRESH_CACHE,
        temporary_settings,
    )

    updates: dict[Any, Any] = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    if first_forced is not None and STAGES.index(stage) >= first_forced:
        updates[PREFECT_TASKS_REFRESH_CACHE] = True
    with temporary_settings(updates=updates):
        yield


@flow(name="instaflow-rebuild", log_prints=True)
def rebuild_flow(cfg: InstaflowConfig, refresh: list[str] | None = None) -> dict[str, Any]:
    """Curate -> generate -> reflow -> distill -> evaluate -> register (-> promote when the gate passes)."""
    log = get_run_logger()
    started = time.perf_counter()
    forced = [STAGES.index(s) for s in check_refresh(refresh or [])]
    first = min(forced) if forced else None
    ctx = FlowRunContext.get()
    run_id = str(ctx.flow_run.id) if ctx else time.strftime("%Y%m%d-%H%M%S")
    config_uri = save_resolved_config(cfg, run_id)
    mlflow_run = start_rebuild_run(cfg, run_id)  # stage runs nest under it (not part of any cache key)

    with _stage("teacher", first):
        teacher = teacher_model(cfg.models, cfg.storage)
    with _stage("curate", first):
        prompts = curate_flow(cfg)
    with _stage("generate", first):
        triplets = generate_flow(cfg, prompts, teacher)
    with _stage("reflow", first):
        rf = reflow_flow(cfg, triplets, teacher, mlflow_parent_run_id=mlflow_run)
    with _stage("distill", first):
        one_step = distill_flow(cfg, rf, prompts, mlflow_parent_run_id=mlflow_run)
    with _stage("evaluate", first):
        evaluation = evaluate_flow(
            cfg, {"2rf": rf, "instaflow": one_step}, teacher, prompts, parent_run_id=mlflow_run
        )
    refs = {"teacher": teacher, "prompts": prompts, "triplets": triplets, "2rf": rf, "instaflow": one_step}
    lineage = {name: ref.key() for name, ref in refs.items()}
    with _stage("register", first):
        registered = register_flow(cfg, one_step, evaluation, lineage, rf_model=rf, parent_run_id=mlflow_run)

    remember_refs(cfg.storage, refs)
    remember_evaluation(cfg.storage, evaluation)
    chain = lineage_chain(refs, evaluation, registered)
    publish_markdown("instaflow-lineage", chain, description="The whole chain of this rebuild")
    emit_assets(refs)

    states = stage_states(run_id) if ctx else {}
    elapsed = time.perf_counter() - started
    log.info("rebuild finished in %.1fs; stages: %s", elapsed, states)
    summary = {
        "elapsed_s": round(elapsed, 2),
        "mlflow_run_id": mlflow_run,
        "run_id": run_id,
        "config_uri": config_uri,
        "stages": states,
        "refs": {k: v.model_dump() for k, v in refs.items()},
        "evaluation": evaluation,
        "registered": registered,
        "lineage_markdown": chain,
    }
    end_rebuild_run(cfg, mlflow_run, summary)
    return summary


@flow(name="instaflow-scheduled-rebuild", log_prints=True)
def scheduled_rebuild(
    preset: str = "tiny", overrides: list[str] | None = None, refresh: list[str] | None = None
) -> dict:
    """Deployment entry point: parameters are plain JSON (preset + overrides), resolved on the worker."""
    from instaflow_core.config import load
    from tasks.common import prefect_settings

    cfg = load(preset, overrides or [])
    with prefect_settings(cfg.storage, cfg.orchestration):
        return rebuild_flow(cfg, refresh=refresh or [])
