"""`instaflow rebuild` and the stage commands (`curate`, `generate`, `reflow`, `distill`, `evaluate`, `register`).

A stage run on its own takes its inputs (the stage graph's, `instaflow_core.refs.GRAPH`) from the latest
outputs recorded in the store by earlier runs; a missing one names the command that makes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from flows.cli.options import PresetOpt, SetOpt, load_config
from instaflow_core.config import InstaflowConfig
from instaflow_core.errors import InstaflowError
from instaflow_core.refs import FLOW_PREFIX, GRAPH, RefName, Stage, producer, topological_order

console = Console()

PrefectApiOpt = typer.Option(
    None, "--prefect-api", help="Prefect API URL (default: $PREFECT_API_URL, else an embedded ephemeral API)."
)


StackOpt = typer.Option(
    False,
    "--stack",
    help="Run against the local stack (`instaflow stack up`): its S3, Prefect API and MLflow.",
)


def _stack_settings(sets: list[str] | None) -> list[str]:
    """Point this process at the running local stack; returns the config overrides for its S3 and MLflow."""
    from infra import stack

    if not any(s.healthy for s in stack.status()):
        raise stack.StackError("the local stack is not running: start it with `instaflow stack up`")
    env = stack.env()
    for key in ("PREFECT_API_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ[key] = env[key]
    return [
        *stack.storage_overrides(),
        f"registration.tracking_uri={env['MLFLOW_TRACKING_URI']}",
        *(sets or []),
    ]


def _prepare(
    preset: str,
    sets: list[str] | None,
    prefect_api: str | None,
    use_stack: bool = False,
    stages: list[Stage] | None = None,
) -> InstaflowConfig:
    if use_stack:
        sets = _stack_settings(sets)
    cfg = load_config(preset, sets)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no torchvision here: its fallbacks are fine
    # the embedded (ephemeral) API can take >20 s to start on a busy 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("HF_HUB_OFFLINE", "1" if cfg.models.local_files_only else "0")
    if prefect_api:
        os.environ["PREFECT_API_URL"] = prefect_api
    if cfg.orchestration.torch_threads:
        import torch

        torch.set_num_threads(cfg.orchestration.torch_threads)
    from instaflow_core.store import Store
    from tasks.preflight import require_preflight

    # everything the stages will need (teacher, weights, data, S3, MLflow, names): all problems, before any write
    require_preflight(cfg, stages)
    Store(cfg.storage).check()  # unreachable S3 / wrong keys: one clear line before any work starts
    uri = cfg.registration.tracking_uri or ""
    if uri.startswith(("http://", "https://")):
        from tasks.tracking.client import check_server

        check_server(uri)  # a wrong tracking URI fails now, not after minutes of task retries
    return cfg


@contextlib.contextmanager
def _session(cfg: InstaflowConfig, command: str, debug: bool = False) -> Iterator[None]:
    """A command's Prefect context: its log file, the API it was pointed at (else the embedded one, under a
    watchdog) and the result storage of its store."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import logs
    from flows.cli.server import start_embedded_api
    from tasks.caching import prefect_settings

    # Prefect read its settings when it was imported: an API chosen later (--prefect-api, --stack) must be
    # applied through its settings context, not just the environment
    api = os.environ.get("PREFECT_API_URL")
    with (
        logs.routed(cfg.storage, command, debug=debug),
        temporary_settings(updates={PREFECT_API_URL: api} if api else {}),
    ):
        start_embedded_api(logs.CURRENT)
        with prefect_settings(cfg.storage, cfg.orchestration):
            yield


def _run(flow_fn: Any, cfg: InstaflowConfig, *args: Any, **kwargs: Any) -> Any:
    """Run a flow with the run's log file, the embedded API under a watchdog and one-line errors."""
    from prefect.states import State

    from tasks.retries import describe, is_transient, resume_hint

    debug = os.environ.get("INSTAFLOW_DEBUG") == "1"
    command = getattr(flow_fn, "name", flow_fn.__name__).removeprefix(FLOW_PREFIX)
    with _session(cfg, command, debug):
        result = flow_fn(cfg, *args, return_state=True, **kwargs)
    if isinstance(result, State):
        if result.is_failed() or result.is_crashed():
            try:
                result.result()
            except Exception as err:
                if debug:
                    raise
                if is_transient(err):
                    raise InstaflowError(
                        f"{describe(err)}: still failing after retries; {resume_hint()}"
                    ) from err
                if isinstance(err, InstaflowError):
                    raise
                raise InstaflowError(f"{command} failed: {describe(err)}") from err
        return result.result()
    return result


def _need(cfg: InstaflowConfig, name: str) -> Any:
    """One input of a stage command: the latest `name` in the store, or one line naming the command that makes
    it. The teacher stage, which has no command (it resolves a given teacher), runs here instead."""
    from tasks.lineage import latest_evaluation, latest_ref

    maker = producer(name, cfg)
    if maker is Stage.TEACHER:
        from tasks.teacher import teacher_model

        with _session(cfg, maker, os.environ.get("INSTAFLOW_DEBUG") == "1"):
            ref = teacher_model(cfg.models, cfg.storage)
        _remember(cfg, **{name: ref})
        return ref
    ref = latest_evaluation(cfg.storage) if name == RefName.EVALUATION else latest_ref(cfg.storage, name)
    if ref is None:
        raise InstaflowError(f"no {name} in {cfg.storage.root} yet: run `instaflow {maker}` first")
    return ref


def _inputs(cfg: InstaflowConfig, stage: Stage) -> dict[str, Any]:
    """Every input of `stage` (the graph's): the stored ones first, in the order their stages run (a missing
    one names the earliest command to run), then the teacher stage's, the only one that does work here."""
    made_by, order = {name: producer(name, cfg) for name in GRAPH[stage].inputs}, topological_order()
    names = sorted(made_by, key=lambda n: (made_by[n] is Stage.TEACHER, order.index(made_by[n])))
    return {name: _need(cfg, name) for name in names}


def _remember(cfg: InstaflowConfig, **refs: Any) -> None:
    from tasks.lineage import remember_refs

    remember_refs(cfg.storage, refs)


def rebuild(
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
    refresh: list[str] = typer.Option(
        None, "--refresh", help="Force this stage and every stage that depends on it."
    ),
    prefect_api: str | None = PrefectApiOpt,
    use_stack: bool = StackOpt,
    json_out: str | None = typer.Option(None, "--json", help="Also write the summary as JSON to this file."),
) -> None:
    """Run the whole pipeline end to end: curate -> generate -> reflow -> distill -> evaluate -> register."""
    from instaflow_core.refs import parse_stages

    parse_stages(refresh, "--refresh")  # a typo fails before any work
    cfg = _prepare(preset, set_, prefect_api, use_stack)
    from flows.rebuild import rebuild_flow  # after the preflight: importing the stack takes a while

    console.print(f"[bold]instaflow rebuild[/] preset={cfg.preset} store={cfg.storage.root}")
    t0 = time.perf_counter()
    summary = _run(rebuild_flow, cfg, refresh=refresh or [])
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    summary = _resolved(cfg, summary)
    summary["registered"] = _current_aliases(cfg, summary.get("registered") or {})
    _print_summary(cfg, summary)
    if json_out:
        with open(json_out, "w") as fh:
            json.dump(summary, fh, indent=2, default=str)


def _resolved(cfg: InstaflowConfig, value: Any) -> Any:
    """The summary with store-relative URIs (`store://...`) resolved to where things are now."""
    from instaflow_core.store import Store

    store = Store(cfg.storage)

    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return store.resolve(v) if isinstance(v, str) and v.startswith("store://") else v

    return walk(value)


def _current_aliases(cfg: InstaflowConfig, reg: dict[str, Any]) -> dict[str, Any]:
    """The registry's aliases of the registered version *now*: a cached register result would show the
    aliases of its own time (before a `models promote` / `rollback`)."""
    if not reg.get("model_name") or not reg.get("version"):
        return reg
    try:
        from tasks.tracking.client import mlflow_client

        with mlflow_client(cfg.registration, cfg.storage) as client:
            aliases = client.get_registered_model(reg["model_name"]).aliases
    except Exception:  # noqa: BLE001 - the summary keeps what the register stage reported
        return reg
    return {**reg, "aliases": sorted(a for a, v in aliases.items() if str(v) == str(reg["version"]))}


def _where(uri: Any) -> str:
    """A location as a user opens it: a plain path for local files, the URI otherwise."""
    text = str(uri)
    return text[len("file://") :] if text.startswith("file://") else text


def _print_summary(cfg: InstaflowConfig, summary: dict[str, Any]) -> None:
    refs = summary.get("refs", {})
    t = Table(title="Rebuild summary", show_lines=False)
    t.add_column("what")
    t.add_column("where", overflow="fold")  # never cut a path with an ellipsis
    paths: list[tuple[str, str]] = []  # long paths, printed once more on their own lines (copy-paste)
    for name in (RefName.PROMPTS, RefName.TRIPLETS):
        r = refs.get(name, {})
        t.add_row(
            f"table {name}",
            f"{_where(r.get('db_uri'))}/{r.get('table')} @ v{r.get('version')} ({r.get('rows')} rows)",
        )
    for name in (RefName.TEACHER, RefName.RF2, RefName.INSTAFLOW):
        t.add_row(f"model {name}", _where(refs.get(name, {}).get("uri")))
    ev = summary.get("evaluation", {}) or {}
    t.add_row("metrics", _where(ev.get("uri")))
    for setting, m in (ev.get("metrics") or {}).items():
        if isinstance(m, dict) and m.get("grid_uri"):
            t.add_row(f"sample grid {setting}", _where(m["grid_uri"]))
            paths.append((f"sample grid {setting}", _where(m["grid_uri"])))
    reg = summary.get("registered", {}) or {}
    t.add_row(
        "registered",
        f"models:/{reg.get('model_name')}/{reg.get('version')} aliases={','.join(reg.get('aliases', []))}",
    )
    if reg.get("tracking_uri"):
        t.add_row("MLflow tracking", str(reg.get("tracking_uri")))
    t.add_row("resolved config", str(summary.get("config_uri")))
    t.add_row("stages", ", ".join(f"{k}={v}" for k, v in summary.get("stages", {}).items()))
    t.add_row("time", f"{summary.get('wall_s')} s (flow {summary.get('elapsed_s')} s)")
    console.print(t)
    for label, path in paths:
        console.print(f"{label}: {path}", soft_wrap=True, highlight=False, markup=False)
    rows = ev.get("table") or []
    if rows:
        mt = Table(title="Evaluation")
        for c in rows[0]:
            mt.add_column(str(c))
        for row in rows:
            mt.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()])
        console.print(mt)
    from infra import stack

    up = [svc for svc in stack.status() if svc.healthy]
    for svc in up:
        console.print(f"{svc.name}: {svc.url}")
    if not up:
        console.print(
            "Start the local stack (`instaflow stack up`) and rebuild with `--stack` to browse runs in the"
        )
        console.print("Prefect and MLflow UIs.")
    elif not os.environ.get("PREFECT_API_URL"):
        console.print(
            "(this rebuild used the embedded API and store: rebuild with `--stack` to see it in these UIs)"
        )
    from flows.cli.paper import print_paper_table

    print_paper_table(console, ev)  # presets with a paper table (digits): the table, its claims, the grid


def curate(
    preset: str = PresetOpt, set_: list[str] = SetOpt, prefect_api: str | None = PrefectApiOpt
) -> None:
    """Stage 1: ingest, normalise, dedupe, filter and split captions into the `prompts` table."""
    cfg = _prepare(preset, set_, prefect_api, stages=[Stage.CURATE])
    from flows.curate import curate_flow
    from instaflow_core.curation.prompts import CurationReport
    from instaflow_core.curation.stage import curation_summary
    from instaflow_core.store import Store

    ref = _run(curate_flow, cfg)
    _remember(cfg, **{RefName.PROMPTS: ref})
    console.print(
        f"prompts: {_where(Store(cfg.storage).resolve(ref.key()))} ({ref.rows} rows)", soft_wrap=True
    )
    report = curation_summary(cfg.storage, ref)["report"]  # what this curation counted, from the table
    console.print(f"curation: {CurationReport.from_dict(report).summary()}", soft_wrap=True, highlight=False)


def generate(
    preset: str = PresetOpt,
    set_: list[str] = SetOpt,
    prefect_api: str | None = PrefectApiOpt,
    shard_slice: str | None = typer.Option(
        None,
        "--shard-slice",
        help="Run only slice i of N of the shards (i/N, e.g. 0/4): one slice per GPU machine.",
    ),
) -> None:
    """Stage 2: the teacher turns (prompt, seed) into (text, noise, latent) triplets."""
    cfg = _prepare(preset, set_, prefect_api, stages=[Stage.GENERATE])
    from flows.generate import generate_flow
    from instaflow_core.generation.shards import parse_shard_slice
    from instaflow_core.store import Store

    parse_shard_slice(shard_slice)  # a malformed slice fails before any work
    inputs = _inputs(cfg, Stage.GENERATE)
    ref = _run(generate_flow, cfg, inputs[RefName.PROMPTS], inputs[RefName.TEACHER], shard_slice=shard_slice)
    _remember(cfg, **{RefName.TRIPLETS: ref})
    console.print(
        f"triplets: {_where(Store(cfg.storage).resolve(ref.key()))} ({ref.rows} rows)", soft_wrap=True
    )


def reflow(
    preset: str = PresetOpt, set_: list[str] = SetOpt, prefect_api: str | None = PrefectApiOpt
) -> None:
    """Stage 3: train the 2-Rectified Flow on the triplets (resumes from its last checkpoint)."""
    cfg = _prepare(preset, set_, prefect_api, stages=[Stage.REFLOW])
    from flows.reflow import reflow_flow
    from instaflow_core.store import Store

    inputs = _inputs(cfg, Stage.REFLOW)
    ref = _run(reflow_flow, cfg, inputs[RefName.TRIPLETS], inputs[RefName.TEACHER])
    _remember(cfg, **{RefName.RF2: ref})
    console.print(f"2-RF: {_where(Store(cfg.storage).resolve(ref.uri))}", soft_wrap=True)


def distill(
    preset: str = PresetOpt, set_: list[str] = SetOpt, prefect_api: str | None = PrefectApiOpt
) -> None:
    """Stage 4: distill the 2-RF into a one-step InstaFlow model."""
    cfg = _prepare(preset, set_, prefect_api, stages=[Stage.DISTILL])
    from flows.distill import distill_flow
    from instaflow_core.store import Store
    from tasks.lineage import latest_ref

    inputs = _inputs(cfg, Stage.DISTILL)
    teacher = latest_ref(
        cfg.storage, RefName.TEACHER
    )  # the quality curves' reference (protocol teacher), if known
    ref = _run(distill_flow, cfg, inputs[RefName.RF2], inputs[RefName.PROMPTS], teacher=teacher)
    _remember(cfg, **{RefName.INSTAFLOW: ref})
    console.print(f"InstaFlow: {_where(Store(cfg.storage).resolve(ref.uri))}", soft_wrap=True)


def evaluate(
    preset: str = PresetOpt, set_: list[str] = SetOpt, prefect_api: str | None = PrefectApiOpt
) -> None:
    """Stage 5: evaluate the teacher, the 2-RF and InstaFlow (FID, CLIP score, straightness, latency)."""
    cfg = _prepare(preset, set_, prefect_api, stages=[Stage.EVALUATE])
    from flows.evaluate import evaluate_flow
    from tasks.lineage import remember_evaluation

    inputs = _inputs(cfg, Stage.EVALUATE)
    models = {name: inputs[name] for name in (RefName.RF2, RefName.INSTAFLOW)}
    result = _run(evaluate_flow, cfg, models, inputs[RefName.TEACHER], inputs[RefName.PROMPTS])
    remember_evaluation(cfg.storage, result)
    shown = _resolved(cfg, {k: v for k, v in result.items() if k != "table"})
    console.print_json(json.dumps(shown, default=str))


def register(
    preset: str = PresetOpt, set_: list[str] = SetOpt, prefect_api: str | None = PrefectApiOpt
) -> None:
    """Stage 6: register InstaFlow (and the 2-RF) in MLflow; promote to champion if the gate passes."""
    cfg = _prepare(preset, set_, prefect_api, stages=[Stage.REGISTER])
    from flows.register import register_flow

    inputs = _inputs(cfg, Stage.REGISTER)
    evaluation, model, rf = (inputs[n] for n in (RefName.EVALUATION, RefName.INSTAFLOW, RefName.RF2))
    lineage = {n: ref.key() for n, ref in inputs.items() if n != RefName.EVALUATION}  # what it was made from
    result = _run(register_flow, cfg, model, evaluation, lineage, rf_model=rf)
    console.print_json(json.dumps(_resolved(cfg, result), default=str))
