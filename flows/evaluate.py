"""Stage 5: evaluate the teacher, the 2-RF (1 and N steps) and the one-step InstaFlow model on one set.

Reads `eval`, `models`, `storage` and `registry` (where the MLflow run goes).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from instaflow_core.config import InstaflowConfig
from instaflow_core.evaluation.paper_table import paper_checks, paper_table
from instaflow_core.evaluation.stage import input_identity
from instaflow_core.refs import ModelRef, Stage, TableRef
from tasks.artifacts import lineage_markdown, publish_markdown, publish_table
from tasks.evaluation import comparison_grid, evaluate_model, log_evaluation, reference_stats, write_results
from tasks.runners import fans_out, make_task_runner


@flow(name="instaflow-evaluate")
def evaluate_flow(
    cfg: InstaflowConfig,
    models: dict[str, ModelRef],
    teacher: ModelRef,
    prompts: TableRef | None,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Metrics of every model on the evaluation set -> {uri, metrics, table, networks, eval_set, run_id, ...}.

    `models` maps a label ("2rf", "instaflow", ...) to a diffusers folder reference; its `kind` picks the
    settings (2rf: each of evaluation.rf_steps with evaluation.rf_guidance; others: one step, no guidance). The teacher
    runs DPM-Solver++ with CFG (evaluation.teacher_steps, evaluation.teacher_guidance). `prompts` supplies the holdout
    captions when no COCO captions are configured. Results: a Prefect table artifact `instaflow-eval`, the
    same table as JSON in the store, and one MLflow run with every metric and the sample grids.
    """
    log = get_run_logger()
    inputs = input_identity(cfg.evaluation, cfg.storage)
    todo = {"teacher": teacher, **{k: v for k, v in models.items() if v is not None}}
    if fans_out(cfg.orchestration):
        rows, ref = _sample_on_cluster(cfg, todo, teacher, prompts, inputs)
    else:  # one machine: one model at a time, so latencies are not measured against each other
        ref = reference_stats(cfg.evaluation, cfg.models, cfg.storage, prompts, teacher, inputs, cfg.digits)
        rows = []
        for label, model in todo.items():
            rows += evaluate_model(
                cfg.evaluation, cfg.models, cfg.storage, label, model, prompts, ref, inputs, cfg.digits
            )
    results = write_results(cfg.storage, rows, ref)
    run = log_evaluation(cfg.registration, cfg.storage, results, parent_run_id)
    # the paper's table in miniature (1-RF / 2-RF at each step count, InstaFlow, the control, the floor)
    paper, checks = paper_table(rows, ref), paper_checks(rows)
    publish_table(
        "instaflow-evaluate-paper", paper, description=f"The paper's table on {results['eval_set']['name']}"
    )
    grid = comparison_grid(cfg.evaluation, cfg.models, cfg.storage, teacher, models)

    consumed: dict[str, Any] = {"teacher": teacher, **{k: v for k, v in models.items() if v is not None}}
    if prompts is not None:
        consumed["prompts"] = prompts
    publish_markdown(
        "instaflow-evaluate-lineage",
        lineage_markdown(Stage.EVALUATE, consumed, {"results": results["uri"], "mlflow run": run["run_id"]}),
        description="What the evaluation consumed and produced",
    )
    for row in results["table"]:
        log.info("%s", row)
    return {
        "uri": results["uri"],
        "metrics": {
            row["name"]: {
                k: row[k]
                for k in (
                    "fid",
                    "clip_score",
                    "latency_s",
                    "straightness",
                    "samples",
                    "model_kind",
                    "steps",
                    "guidance",
                    "grid_uri",
                )
            }
            for row in rows
        },
        "table": results["table"],
        "paper_table": paper,
        "paper_checks": checks,
        "grid": grid,
        "floor": ref.get("floor"),
        "classifier_accuracy": ref.get("classifier_accuracy"),
        "networks": results["networks"],
        "eval_set": results["eval_set"],
        "reference": results["reference"],
        "run_id": run["run_id"],
        "run_url": run["run_url"],
        "experiment_id": run["experiment_id"],
    }


def _sample_on_cluster(
    cfg: InstaflowConfig, todo: dict[str, ModelRef], teacher: ModelRef, prompts: TableRef | None, inputs: dict
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """On Ray: the reference statistics as one task, then every model's sampling as its own task, side by side
    (each its own worker and GPU). Returns the metric rows and the reference info.

    A model is the unit: its FID needs all its samples' features in one place, and a task pays ~1 s of
    orchestration plus a model load, so finer pieces would cost more than they gain at evaluation sizes."""
    common = {
        "eval_cfg": cfg.evaluation,
        "models_cfg": cfg.models,
        "storage_cfg": cfg.storage,
        "prompts": prompts,
        "experiment": cfg.digits,
    }
    with make_task_runner(cfg.orchestration) as runner:
        ref_params = {**common, "teacher": teacher, "inputs": inputs}
        ref = runner.submit(reference_stats, parameters=ref_params).result()
        futures = [
            runner.submit(
                evaluate_model,
                parameters={**common, "label": label, "model": model, "reference": ref, "inputs": inputs},
            )
            for label, model in todo.items()
        ]
        rows = [row for fut in futures for row in fut.result()]
    return rows, ref
