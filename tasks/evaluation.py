"""Evaluation tasks: reference statistics (cached in the store), one model's metrics, the results table.

Each task is one call into the stage object, `instaflow_core.evaluation.stage.Evaluation`, plus its cache key,
progress and artifacts; each returns small JSON-able dicts (URIs and numbers), never images or tensors. The
reference statistics are cached twice: by Prefect (cache key from the references and config sections) and in
the store itself, keyed by (image set, feature network, image size), so another run, flow or machine reuses
them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from prefect import task

from instaflow_core.config import (
    EvaluationConfig,
    ModelsConfig,
    RegistrationConfig,
    StorageConfig,
    stable_hash,
)
from instaflow_core.evaluation.stage import CONTROL, Evaluation, caveat, results_body
from instaflow_core.refs import ModelRef, TableRef
from instaflow_core.store import Store
from tasks.artifacts import Progress, publish_markdown, publish_table
from tasks.caching import code_version, stage_cache_key
from tasks.retries import STORE_RETRIES
from tasks.tracking.runs import log_evaluation_run

logger = logging.getLogger("instaflow.tasks.evaluation")

EVAL_TABLE_KEY = "instaflow-evaluate"
__all__ = [
    "CONTROL",
    "comparison_grid",
    "evaluate_model",
    "log_evaluation",
    "reference_stats",
    "write_results",
]


@task(cache_key_fn=stage_cache_key, persist_result=True, name="evaluate-reference-stats", **STORE_RETRIES)
def reference_stats(
    eval_cfg: EvaluationConfig,
    models_cfg: ModelsConfig,
    storage_cfg: StorageConfig,
    prompts: TableRef | None,
    teacher: ModelRef,
    inputs: dict[str, Any] | None = None,
    experiment: Any = None,
) -> dict[str, Any]:
    """Feature statistics of the reference images (COCO, the teacher's own generations, an image table's
    held-out images), kept in the store. `inputs` (the captions file's identity) only feeds the cache key."""
    ev = Evaluation(eval_cfg, models_cfg, storage_cfg, prompts, experiment)
    progress = Progress(f"reference features ({ev.eval_set.name})")
    return ev.reference(teacher, on_progress=progress.update)


@task(cache_key_fn=stage_cache_key, persist_result=True, name="evaluate-model", **STORE_RETRIES)
def evaluate_model(
    eval_cfg: EvaluationConfig,
    models_cfg: ModelsConfig,
    storage_cfg: StorageConfig,
    label: str,
    model: ModelRef,
    prompts: TableRef | None,
    reference: dict[str, Any],
    inputs: dict[str, Any] | None = None,
    experiment: Any = None,
) -> list[dict[str, Any]]:
    """One row per sampler setting of this model (FID, CLIP score, latency, straightness, a sample grid)."""
    ev = Evaluation(eval_cfg, models_cfg, storage_cfg, prompts, experiment)
    return ev.evaluate(label, model, reference, on_setting=lambda name: Progress(f"evaluate {name}").update)


@task(cache_key_fn=stage_cache_key, persist_result=True, name="evaluate-results", **STORE_RETRIES)
def write_results(
    storage_cfg: StorageConfig, rows: list[dict[str, Any]], reference: dict[str, Any]
) -> dict[str, Any]:
    """The comparison as JSON in the store (eval/results/<hash>.json) and as the `instaflow-evaluate` table."""
    body = results_body(rows, reference, code_version())
    store = Store(storage_cfg)
    key = stable_hash(body)
    uri = store.ref("eval", "results", f"{key}.json")
    store.write_bytes(uri, json.dumps(body, indent=2, sort_keys=True).encode())
    networks, eval_set = body["networks"], body["eval_set"]
    publish_table(
        EVAL_TABLE_KEY,
        body["table"],
        description=f"Evaluation on {eval_set['name']}; {caveat(networks, eval_set)}",
    )
    publish_markdown(
        "instaflow-evaluate-notes",
        f"### Evaluation notes\n\n- protocol: {eval_set.get('protocol')} ({caveat(networks, eval_set)})\n"
        f"- set: {eval_set['note']}\n- FID features: {networks['fid_features']}\n"
        f"- CLIP: {networks['clip_model']}\n- results: `{uri}`",
        description="Which networks and reference images the evaluation used",
    )
    return {"uri": uri, "key": key, **body}


@task(cache_key_fn=stage_cache_key, persist_result=True, name="evaluate-grid")
def comparison_grid(
    eval_cfg: EvaluationConfig,
    models_cfg: ModelsConfig,
    storage_cfg: StorageConfig,
    teacher: ModelRef,
    models: dict[str, ModelRef],
) -> dict[str, Any] | None:
    """The labelled grid PNG in the store (eval/grids/<key>.png): {uri, rows, columns}, or None without prompts."""
    return Evaluation(eval_cfg, models_cfg, storage_cfg, None).grid(teacher, models, code_version())


@task(name="evaluate-log-run", cache_key_fn=stage_cache_key, persist_result=True, **STORE_RETRIES)
def log_evaluation(
    registry: RegistrationConfig,
    storage: StorageConfig,
    results: dict[str, Any],
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """One MLflow run with every metric, the sample grids and the results JSON (tracking.runs.log_evaluation_run).

    Cached by Prefect on the registration section (tracking URI included) and the results; after resetting the
    MLflow database, `--refresh evaluate` logs again.
    """
    return log_evaluation_run(registry, storage, results, parent_run_id)
