"""MLflow runs of the pipeline: one per training stage (StageTracker), the evaluation run, the rebuild's parent.

Every run carries `instaflow.*` tags (stage, key, references, code version) so lineage can be read back from
MLflow alone; a training stage resumed after a kill continues its own run, its loss curve and its quality
curves (`eval/*` metrics, evaluation.during_training: each point logged once, also across a kill).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from instaflow_core.config import RegistrationConfig, StorageConfig
from instaflow_core.evaluation.curves import CURVE_METRICS, MLFLOW_METRICS
from instaflow_core.refs import Stage
from instaflow_core.store import Store
from instaflow_core.training.job import TrainJob
from tasks.artifacts import Progress, publish_markdown, run_logger
from tasks.caching import code_version, git_sha
from tasks.tracking.client import _parent_ok, ensure_experiment, mlflow_client, run_url
from tasks.tracking.promotion import SHOWN_METRICS

EVAL_KEY_TAG = "instaflow.eval_key"


def _find_run(client: Any, experiment_id: str, key: str, value: str) -> Any:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{key}` = '{value}'", max_results=1)
    return runs[0] if runs else None


logger = logging.getLogger("instaflow.tasks.tracking")
RUN_FILE = "mlflow_run.json"  # in the checkpoint folder: a resumed stage continues its MLflow run


class StageTracker:
    """The stage's MLflow run (nested under a parent when given) and its Prefect progress artifact.

    The run id is remembered in the checkpoint folder: a stage resumed after a kill logs into the same run,
    so its loss curve continues where the checkpoint left it.
    """

    def __init__(self, job: TrainJob, registry: RegistrationConfig, parent_run_id: str | None) -> None:
        from mlflow import MlflowClient

        from tasks.tracking.client import tracking_uri

        self.job, self.store = job, Store(job.storage)
        self.uri = tracking_uri(registry, job.storage)
        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = ensure_experiment(self.client, registry.experiment)
        self.total = sum(st.steps for st in job.section.stages)
        reused = self._reuse()
        self.run_id = reused or self._create(_parent_ok(self.client, parent_run_id))
        self.progress = Progress(f"{job.stage} {job.key[:8]}: optimizer steps")
        # the quality curves' points already in the run (a resumed stage redoes those after its checkpoint)
        self.curve: dict[int, dict[str, float]] = self._logged_points() if reused else {}
        self._curve_tagged = False

    def _run_file(self) -> str:
        return f"{self.job.ckpt_dir}/{RUN_FILE}"

    def _reuse(self) -> str | None:
        uri = self._run_file()
        if not self.store.exists(uri):
            return None
        saved = json.loads(self.store.read_bytes(uri))
        if saved.get("tracking_uri") != self.uri:
            return None
        try:
            run = self.client.get_run(saved["run_id"])
        except Exception:  # noqa: BLE001 - the tracking db was reset: start a new run
            return None
        if run.info.lifecycle_stage != "active":
            return None
        self.client.update_run(run.info.run_id, status="RUNNING")
        run_logger().info("resuming: continuing MLflow run %s", run.info.run_id)
        return run.info.run_id

    def _create(self, parent: str | None) -> str:
        from mlflow.entities import Param

        job = self.job
        tags = {
            "mlflow.runName": f"{job.stage}-{job.key[:8]}",
            "instaflow.stage": job.stage,
            "instaflow.key": job.key,
            "instaflow.data": job.data.key(),
            "instaflow.base": job.base.key(),
            "instaflow.checkpoints": job.ckpt_dir,
            "instaflow.model_uri": job.out_uri,
            "instaflow.code_version": code_version(),
            "instaflow.git": git_sha(),
        }
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, tags=tags)
        flat = _flatten(job.section.model_dump(mode="json"))
        params = [Param(k, str(v)[:500]) for k, v in sorted(flat.items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run.info.run_id, params=params[i : i + 100])
        self.store.write_bytes(
            self._run_file(), json.dumps({"tracking_uri": self.uri, "run_id": run.info.run_id}).encode()
        )
        return run.info.run_id

    def on_log(self, record: dict) -> None:
        """A loop record -> MLflow metrics at its step, and the progress artifact."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(record["step"])
        metrics = [
            Metric(k, float(record[k]), now, step)
            for k in ("loss", "lr", "grad_norm", "samples_per_s", "data_wait_share", "stage")
            if record.get(k) is not None
        ]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.progress.update(step / max(self.total, 1))
        run_logger().info(
            "%s step %d/%d loss %.5g lr %.3g grad_norm %.3g %.1f samples/s data wait %.0f%%",
            self.job.stage, step, self.total, record["loss"], record["lr"], record["grad_norm"],
            record["samples_per_s"], 100 * record["data_wait_share"],
        )  # fmt: skip

    # ---- quality during training ---------------------------------------------------------------------
    def _logged_points(self) -> dict[int, dict[str, float]]:
        points: dict[int, dict[str, float]] = {}
        for name, metric in MLFLOW_METRICS.items():
            for m in self.client.get_metric_history(self.run_id, metric):
                points.setdefault(int(m.step), {})[name] = float(m.value)
        return points

    def on_eval(self, record: dict) -> None:
        """An evaluation point (training/loop.py, evaluation/curves.py) -> `eval/*` metrics at its optimizer
        step, once per step (a point a killed process logged is not logged again when the rerun redoes it),
        and the curves as a markdown artifact of the Prefect run."""
        from mlflow.entities import Metric

        step = int(record["step"])
        values = {k: float(record[k]) for k in MLFLOW_METRICS if record.get(k) is not None}
        if step not in self.curve:
            now = int(time.time() * 1000)
            metrics = [Metric(MLFLOW_METRICS[k], v, now, step) for k, v in values.items()]
            self.client.log_batch(self.run_id, metrics=metrics)
            self.curve[step] = values
        if not self._curve_tagged:
            names = record.get("metric_names") or {}
            tags = {
                "instaflow.curves.setting": record.get("setting"),
                "instaflow.curves.samples": record.get("samples"),
                "instaflow.curves.every_steps": record.get("every_steps"),
                "instaflow.curves.protocol": record.get("protocol"),
                "instaflow.curves.fid_metric": names.get("fid"),
                "instaflow.curves.clip_metric": names.get("clip_score"),
            }
            for k, v in tags.items():
                if v is not None:
                    self.client.set_tag(self.run_id, k, str(v))
            self._curve_tagged = True
        job = self.job
        title = f"{job.stage} {job.key[:8]}: quality during training ({record.get('setting', '?')})"
        publish_markdown(
            f"instaflow-{job.stage}-curves",
            curve_markdown(title, self.curve, record),
            description=f"{job.stage}: FD / CLIP score / straightness of the EMA weights during training",
        )
        shown = ", ".join(f"{k} {values[k]:.4g}" for k in CURVE_METRICS if k in values)
        run_logger().info(
            "%s step %d/%d evaluation: %s (%.1fs; evaluations %.1f%% of the stage's time)",
            job.stage, step, self.total, shown, values.get("eval_s", 0.0), 100 * values.get("cost_share", 0.0),
        )  # fmt: skip

    def finish(self, summary: dict[str, Any]) -> None:
        """The sample grid and the summary as artifacts, final numbers as tags, status FINISHED."""
        with tempfile.TemporaryDirectory(prefix="instaflow-mlflow-") as tmp:
            if summary.get("samples_uri") and self.store.exists(summary["samples_uri"]):
                png = Path(tmp) / f"samples_{summary.get('sample_steps', 1)}step.png"
                png.write_bytes(self.store.read_bytes(summary["samples_uri"]))
                self.client.log_artifact(self.run_id, str(png), "samples")
            info = Path(tmp) / "summary.json"
            info.write_text(json.dumps(_public_summary(summary), indent=1, default=str))
            self.client.log_artifact(self.run_id, str(info))
        self.client.set_tag(self.run_id, "instaflow.steps", str(summary["steps"]))
        self.client.set_tag(self.run_id, "instaflow.resumed_from_step", str(summary["start_step"]))
        curves = summary.get("curves")
        if curves:
            self.client.set_tag(self.run_id, "instaflow.curves.cost_share", f"{curves['cost_share']:.4f}")
            if curves.get("best"):
                self.client.set_tag(self.run_id, "instaflow.curves.best_step", str(curves["best"]["step"]))
        self.progress.update(1.0)
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self) -> None:
        try:
            self.client.set_terminated(self.run_id, "FAILED")
        except Exception:  # noqa: BLE001 - never mask the training error
            logger.warning("could not mark MLflow run %s failed", self.run_id)


def curve_markdown(title: str, points: dict[int, dict[str, float]], record: dict[str, Any]) -> str:
    """The curves so far as a markdown table (the Prefect artifact): one row per evaluated step."""
    names = record.get("metric_names") or {}
    shown = [k for k in CURVE_METRICS if any(k in v for v in points.values())]
    head = [names.get(k, k) for k in shown] + ["seconds", "share of the stage's time"]
    lines = [
        f"### {title}",
        "",
        f"{record.get('samples', '?')} fixed samples every {record.get('every_steps', '?')} optimizer steps, "
        f"protocol {record.get('protocol', '?')}; MLflow metrics {', '.join(MLFLOW_METRICS[k] for k in shown)}",
        "",
        "| step | " + " | ".join(head) + " |",
        "|---|" + "---|" * len(head),
    ]
    for step in sorted(points):
        v = points[step]
        cells = [f"{v[k]:.4g}" if k in v else "" for k in shown]
        cells += [f"{v.get('eval_s', 0.0):.2f}", f"{100 * v.get('cost_share', 0.0):.1f}%"]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): obj}


def _public_summary(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k != "history"} | {
        "log_records": len(summary.get("history", []))
    }


def start_rebuild_run(cfg: Any, prefect_run_id: str) -> str | None:
    """An MLflow parent run for one rebuild: the stage runs (reflow, distill, evaluation) nest under it."""

    try:
        with mlflow_client(cfg.registration, cfg.storage) as client:
            exp_id = ensure_experiment(client, cfg.registration.experiment)
            run = client.create_run(
                exp_id,
                run_name=f"rebuild-{cfg.preset}",
                tags={
                    "instaflow.stage": "rebuild",
                    "instaflow.prefect_flow_run_id": prefect_run_id,
                    "instaflow.preset": cfg.preset,
                    **{f"instaflow.config_hash.{k}": v for k, v in cfg.hashes().items()},
                },
            )
            return run.info.run_id
    except Exception as err:  # tracking is best effort here; the stages report their own errors
        logger.warning("could not open the MLflow rebuild run: %s", err)
        return None


def end_rebuild_run(cfg: Any, run_id: str | None, summary: dict[str, Any]) -> None:
    if run_id is None:
        return

    with mlflow_client(cfg.registration, cfg.storage) as client:
        client.log_metric(run_id, "rebuild_elapsed_s", float(summary.get("elapsed_s", 0.0)))
        for stage, state in summary.get("stages", {}).items():
            client.set_tag(run_id, f"instaflow.stage_state.{stage}", state)
        client.log_text(run_id, summary.get("lineage_markdown", ""), "lineage.md")
        client.set_terminated(run_id)


def log_evaluation_run(
    registry: RegistrationConfig,
    storage: StorageConfig,
    results: dict[str, Any],
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """One MLflow run with every metric (`<setting>.<metric>`), the sample grids and the results JSON.

    Idempotent: a run already tagged with these results' key is returned instead of logging a duplicate
    (a cached rebuild does not add runs). Cached by Prefect on the registry section (tracking URI included) and
    the results; after resetting the MLflow database, `--refresh register` (or `evaluate`) logs again.
    """
    import mlflow
    import numpy as np

    store = Store(storage)
    with mlflow_client(registry, storage) as client:
        exp_id = ensure_experiment(client, registry.experiment)
        existing = _find_run(client, exp_id, EVAL_KEY_TAG, results["key"])
        if existing is not None:
            rid = existing.info.run_id
            return {
                "run_id": rid,
                "run_url": run_url(client, exp_id, rid),
                "experiment_id": exp_id,
                "reused": True,
            }
        networks, eval_set = results["networks"], results["eval_set"]
        tags = {
            EVAL_KEY_TAG: results["key"],
            "instaflow.eval_uri": results["uri"],
            "instaflow.stage": str(Stage.EVALUATE),
            "instaflow.eval_set": eval_set["name"],
            "instaflow.reference": eval_set["reference"],
            "instaflow.protocol": eval_set.get("protocol", ""),
            "instaflow.fid_features": networks["fid_features"],
            "instaflow.clip_model": networks["clip_model"],
            "instaflow.paper_comparable": str(
                bool(
                    networks["fid_paper_comparable"]
                    and networks["clip_paper_comparable"]
                    and eval_set["paper_comparable"]
                )
            ).lower(),
            "instaflow.code_version": results.get("code_version", ""),
        }
        with mlflow.start_run(
            experiment_id=exp_id,
            run_name=f"evaluate-{eval_set['name']}",
            parent_run_id=_parent_ok(client, parent_run_id),
            tags=tags,
        ) as run:
            mlflow.log_params(
                {
                    "eval_set": eval_set["name"],
                    "samples": eval_set["samples"],
                    "note": eval_set["note"][:500],
                    "protocol": eval_set.get("protocol", ""),
                    **{
                        f"protocol.{k}": str(v)[:500]
                        for k, v in eval_set.get("protocol_settings", {}).items()
                    },
                }
            )
            metrics = {}
            for row in results["rows"]:
                for m in SHOWN_METRICS:
                    if row.get(m) is not None:
                        metrics[f"{row['name']}.{m}"] = float(row[m])
            mlflow.log_metrics(metrics)
            mlflow.log_dict(
                {k: results[k] for k in ("eval_set", "networks", "reference", "rows", "table")},
                "eval/results.json",
            )
            grids = []
            for row in results["rows"]:
                img = _read_png(store, row["grid_uri"])
                mlflow.log_image(img, f"eval/samples/{row['name']}.png")
                grids.append(img)
            if grids and len({g.shape[1] for g in grids}) == 1:
                # the settings' grids one under the other, in table order
                mlflow.log_image(np.concatenate(grids, axis=0), "eval/samples_grid.png")
            rid = run.info.run_id
        return {
            "run_id": rid,
            "run_url": run_url(client, exp_id, rid),
            "experiment_id": exp_id,
            "reused": False,
        }


def _read_png(store: Store, uri: str) -> Any:
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(store.read_bytes(uri))).convert("RGB"))
