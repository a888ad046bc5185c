"""Lineage as data: what each rebuild consumed and produced, for the UI, the store and the CLI.

The self-hosted Prefect UI shows artifacts and run graphs, not Cloud's asset graph, so the chain is published as
a keyed markdown artifact; asset materialisations are emitted as well for users who do have the asset graph.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import BaseModel

from instaflow_core.config import StorageConfig
from instaflow_core.refs import ModelRef, RefName, Stage, TableRef, stage_of_flow
from instaflow_core.store import Store

logger = logging.getLogger("instaflow.lineage")

LATEST = "refs/latest.json"
LATEST_EVAL = "refs/latest-eval.json"  # the last evaluation result: `instaflow register` registers with it


def remember_refs(storage: StorageConfig, refs: dict[str, BaseModel]) -> str:
    """Record the latest output of each stage in the store, so a stage can later run on its own."""
    store = Store(storage)
    uri = store.uri(*LATEST.split("/"))
    current = load_latest(storage)
    current.update({k: {"type": type(v).__name__, **v.model_dump()} for k, v in refs.items()})
    store.write_bytes(uri, json.dumps(current, indent=2, sort_keys=True).encode())
    return uri


def load_latest(storage: StorageConfig) -> dict[str, Any]:
    store = Store(storage)
    uri = store.uri(*LATEST.split("/"))
    if not store.exists(uri):
        return {}
    return json.loads(store.read_bytes(uri))


def latest_ref(storage: StorageConfig, name: str) -> TableRef | ModelRef | None:
    """The last recorded reference of a stage output, by name (`RefName`: prompts, teacher, triplets, ...)."""
    raw = load_latest(storage).get(name)
    if raw is None:
        return None
    raw = dict(raw)
    kind = raw.pop("type", "")
    return TableRef(**raw) if kind == "TableRef" else ModelRef(**raw)


def remember_evaluation(storage: StorageConfig, result: dict[str, Any]) -> str:
    """Record the latest evaluation result in the store (what a later `instaflow register` uses)."""
    store = Store(storage)
    uri = store.uri(*LATEST_EVAL.split("/"))
    store.write_bytes(uri, json.dumps(result, default=str).encode())
    return uri


def latest_evaluation(storage: StorageConfig) -> dict[str, Any] | None:
    store = Store(storage)
    uri = store.uri(*LATEST_EVAL.split("/"))
    return json.loads(store.read_bytes(uri)) if store.exists(uri) else None


def lineage_chain(refs: dict[str, BaseModel], evaluation: dict[str, Any], registered: dict[str, Any]) -> str:
    """A markdown drawing of the whole chain of one rebuild."""

    def k(name: str) -> str:
        ref = refs.get(name)
        return ref.key() if ref is not None and hasattr(ref, "key") else "-"

    model = registered.get("model_name", "?")
    version = registered.get("version", "?")
    aliases = ", ".join(registered.get("aliases", [])) or "-"
    lines = [
        "## InstaFlow rebuild lineage",
        "",
        "```",
        f"prompts      {k(RefName.PROMPTS)}",
        "   |  teacher solves its ODE (generation)",
        f"triplets     {k(RefName.TRIPLETS)}    teacher {k(RefName.TEACHER)}",
        "   |  reflow (text-conditioned rectified flow)",
        f"2-RF         {k(RefName.RF2)}",
        "   |  distillation (pairs from the 2-RF, one-step student)",
        f"InstaFlow    {k(RefName.INSTAFLOW)}",
        "   |  evaluation",
        f"metrics      {evaluation.get('uri', '-')}",
        "   |  registration",
        f"MLflow       models:/{model}/{version}  aliases: {aliases}",
        "```",
    ]
    metrics = evaluation.get("table") or []
    if metrics:
        cols = list(metrics[0].keys())
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(row.get(c, "")) for c in cols) + " |" for row in metrics]
    if registered.get("run_url"):
        lines += ["", f"[MLflow run]({registered['run_url']})"]
    return "\n".join(lines)


def _asset_key(ref: BaseModel) -> str:
    if isinstance(ref, TableRef):
        base = ref.db_uri if "://" in ref.db_uri else "file://" + ref.db_uri
        return f"{base.rstrip('/')}/{ref.table}"
    uri = getattr(ref, "uri", "")
    return uri if "://" in uri else "file://" + uri


def emit_assets(refs: dict[str, BaseModel]) -> None:
    """Prefect asset materialisations for each output (shown by Prefect Cloud's asset graph)."""
    try:
        from prefect.assets import Asset, materialize
    except ImportError:  # older Prefect: nothing to emit
        return
    order = [RefName.PROMPTS, RefName.TRIPLETS, RefName.RF2, RefName.INSTAFLOW]
    teacher = refs.get(RefName.TEACHER)
    upstream: list[Any] = [Asset(key=_asset_key(teacher))] if teacher is not None else []
    for name in order:
        ref = refs.get(name)
        if ref is None:
            continue
        asset = Asset(key=_asset_key(ref))
        version = getattr(ref, "version", None)

        @materialize(asset, asset_deps=list(upstream), name=f"materialize-{name}")
        def _emit(asset: Asset = asset, version: Any = version, ref: Any = ref) -> None:
            # metadata can only be attached inside the materializing task
            asset.add_metadata({"version": version, "ref": ref.key()})

        try:
            _emit()
        except Exception as err:  # lineage metadata must never fail a rebuild
            logger.warning("could not emit asset %s: %s", asset.key, err)
        upstream = [asset]


def stage_states(flow_run_id: str) -> dict[str, str]:
    """For one rebuild run: each stage -> "ran" if any of its tasks executed, "cached" if all were cache hits.

    A stage subflow (`instaflow-<verb>`, the stage graph's `stage_of_flow`) and every flow under it count for
    its stage; the teacher stage is the rebuild's own `teacher-*` tasks."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )

    result: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        groups: dict[str, list[str]] = {Stage.TEACHER.value: [flow_run_id]}
        pending: list[tuple[Any, str | None]] = [(c, None) for c in children]
        # a subflow call is also a task run of its parent (Prefect's placeholder): not work that ran
        placeholders: set[str] = set()
        while pending:
            run, stage = pending.pop()
            if getattr(run, "parent_task_run_id", None):
                placeholders.add(str(run.parent_task_run_id))
            if stage is None:
                flow_name = client.read_flow(run.flow_id).name
                found = stage_of_flow(flow_name)
                stage = found.value if found is not None else flow_name
            groups.setdefault(stage, []).append(str(run.id))
            grand = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[str(run.id)])
                )
            )
            pending += [(g, stage) for g in grand]
        for stage, ids in groups.items():
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            runs = [r for r in runs if str(r.id) not in placeholders]
            if stage == Stage.TEACHER:
                runs = [r for r in runs if r.name.startswith(Stage.TEACHER.value)]
            states = [r.state.name for r in runs if r.state is not None]
            if not states:
                continue
            result[stage] = "cached" if all(s == "Cached" for s in states) else "ran"
    return result


def save_resolved_config(cfg: Any, run_id: str) -> str:
    """The resolved config is saved with every run (<root>/runs/<run id>/config.yaml); no secrets are in it."""
    store = Store(cfg.storage)
    uri = store.uri("runs", run_id, "config.yaml")
    store.write_bytes(uri, cfg.to_yaml().encode())
    return uri


def finish_rebuild(
    cfg: Any,
    run_id: str,
    refs: dict[str, BaseModel],
    evaluation: dict[str, Any],
    registered: dict[str, Any],
    mlflow_run: str | None,
    config_uri: str,
    started: float,
) -> dict[str, Any]:
    """The end of a rebuild: record the latest refs and evaluation in the store, publish the lineage chain and
    asset materialisations, report which stages ran, close the MLflow parent run; returns the summary."""
    import time

    from prefect.context import FlowRunContext

    from tasks.artifacts import publish_markdown, run_logger
    from tasks.tracking.runs import end_rebuild_run

    remember_refs(cfg.storage, refs)
    remember_evaluation(cfg.storage, evaluation)
    chain = lineage_chain(refs, evaluation, registered)
    publish_markdown("instaflow-lineage", chain, description="The whole chain of this rebuild")
    emit_assets(refs)
    states = stage_states(run_id) if FlowRunContext.get() is not None else {}
    elapsed = time.perf_counter() - started
    run_logger().info("rebuild finished in %.1fs; stages: %s", elapsed, states)
    summary = {
        "elapsed_s": round(elapsed, 2),
        "mlflow_run_id": mlflow_run,
        "run_id": run_id,
        "config_uri": config_uri,
        "stages": states,
        "refs": {k: v.model_dump(mode="json") for k, v in refs.items()},
        "evaluation": evaluation,
        "registered": registered,
        "lineage_markdown": chain,
    }
    end_rebuild_run(cfg, mlflow_run, summary)
    return summary
