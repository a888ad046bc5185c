"""Quality during training (`evaluation.during_training`): a small fixed-prompt evaluation of the EMA weights
every `every_steps` optimizer steps of pretraining, reflow and distillation.

    spec = curve_spec(cfg, stage, teacher)      what a stage needs to evaluate itself (None: off for the stage);
                                                JSON, it travels in the TrainJob (and to `accelerate launch`)
    curves = TrainingCurves(spec, stage, ...)   the loop's `Evaluator` (training/loop.py), built by TrainJob.run
    curves.prepare()                            networks, reference statistics, text features: once, before training
    curves(step, ema_module) -> {fid, clip_score[, straightness]}

It is the final evaluation's code at a smaller size, not a second implementation: the same `Evaluation` object
(evaluation/stage.py) picks the networks and computes the reference statistics (kept in the store), and the same
`sampling.evaluate_sampler` generates the images (the Euler path users get) and computes FD / FID, CLIP score
(prompt alignment with the digits classifier) and straightness, on `samples` images from fixed prompts and
seeds, without the latency measurement.

- reference: with prompts curated from an image table (the digits preset, protocol holdout-images) the held-out
  real images, in the digits classifier's features (FD, not FID); otherwise the `teacher` protocol, the
  teacher's own images on the SAME prompts and seeds (its sampler at evaluation.teacher_steps / guidance),
  generated once and kept in the store (eval/reference-stats/).
- setting: each stage's key setting (evaluation.stage.grid_rows): distillation one Euler step without guidance,
  reflow one step at rf_guidance, pretraining (a 1-RF teacher) max(rf_steps) steps; `steps` overrides.
  Straightness for the flows (pretraining, reflow) on the first batch of samples.
- keep_best: the EMA weights of the best point by `metric` in `<ckpt_dir>/best/` (`ema-step-<N>.safetensors`,
  the checkpoints' EMA format, and `best.json` naming it, written last), read back on resume.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from instaflow_core.config import EvaluationConfig, ModelsConfig, StorageConfig
from instaflow_core.errors import ConfigError
from instaflow_core.models.family import Model
from instaflow_core.refs import ModelKind, ModelRef, Stage, TableRef

log = logging.getLogger("instaflow.evaluation")

CURVE_METRICS = ("fid", "clip_score", "straightness")
# a point's numbers -> the MLflow metric names of the stage's run (step = optimizer step)
MLFLOW_METRICS = {
    "fid": "eval/fid",
    "clip_score": "eval/clip_score",
    "straightness": "eval/straightness",
    "eval_s": "eval/seconds",  # what the point took
    "cost_share": "eval/cost_share",  # the evaluations' share of the stage's wall time so far
}
LOWER_IS_BETTER = {"fid": True, "clip_score": False}
BEST_DIR = "best"
BEST_FILE = "best.json"
_HOLDOUT = "holdout-images"
_TEACHER = "teacher"


class CurveSpec(BaseModel):
    """What a training stage needs to evaluate itself, as JSON: the evaluation section (networks, protocol knobs,
    `during_training`), the teacher whose images are the reference (teacher protocol) and the experiment section
    whose networks the evaluation names (the digits classifier's settings)."""

    model_config = ConfigDict(extra="forbid")

    evaluation: EvaluationConfig
    teacher: ModelRef | None = None
    experiment: str | None = None  # the experiment section's name (config.EXPERIMENT_SECTIONS), e.g. digits
    experiment_section: dict[str, Any] | None = None

    def section(self) -> Any:
        """The experiment's config section object (what Evaluation's experiment networks read), or None."""
        if self.experiment is None:
            return None
        from instaflow_core.config import experiment_section

        return experiment_section(self.experiment).model_validate(self.experiment_section or {})


def curve_spec(cfg: Any, stage: Stage, teacher: ModelRef | None = None) -> CurveSpec | None:
    """The stage's CurveSpec from the whole config (InstaflowConfig), or None when its curves are off."""
    ev = cfg.evaluation
    if ev.during_training.every(stage.section) <= 0:
        return None
    if stage == Stage.PRETRAIN and (ev.coco_captions or ev.protocol not in ("auto", _HOLDOUT)):
        raise ConfigError(
            "evaluation.during_training on pretraining measures against held-out real images (protocol "
            "holdout-images, prompts curated from an image table): the teacher being trained cannot be its reference"
        )
    experiment = "digits" if getattr(cfg, "digits", None) is not None else None
    return CurveSpec(
        evaluation=ev,
        teacher=teacher,
        experiment=experiment,
        experiment_section=cfg.digits.model_dump(mode="json") if experiment else None,
    )


def prompts_table(store: Any, stage: Stage, data: TableRef) -> TableRef:
    """The prompts table a stage's data came from: pretraining's data is it; a triplets / pairs table names it
    in its metadata (generation/pairs.py, lineage_metadata)."""
    if stage == Stage.PRETRAIN:
        return data
    from instaflow_core.store import get_metadata, open_ref

    meta = get_metadata(open_ref(store, data))
    if "prompts_table" not in meta or "prompts_version" not in meta:
        raise ConfigError(
            f"{data.key()} does not name its prompts table: evaluation.during_training needs a table made by "
            "this pipeline's generation"
        )
    return TableRef(db_uri=data.db_uri, table=meta["prompts_table"], version=int(meta["prompts_version"]))


def sampler_spec(stage: Stage, eval_cfg: EvaluationConfig) -> Any:
    """The setting a stage's curve samples at: its key setting (evaluation.stage.grid_rows), `steps` overriding."""
    from instaflow_core.evaluation.sampling import SamplerSpec

    steps = eval_cfg.during_training.steps
    if stage == Stage.DISTILL:
        n = steps or 1
        return SamplerSpec(f"{ModelKind.INSTAFLOW}_{n}step", ModelKind.INSTAFLOW, "euler", n, 1.0)
    kind = ModelKind.RF1 if stage == Stage.PRETRAIN else ModelKind.RF2
    n = steps or (max(eval_cfg.rf_steps) if stage == Stage.PRETRAIN else 1)
    return SamplerSpec(f"{kind}_{n}step", kind, "euler", n, eval_cfg.rf_guidance)


def fixed_items(prompts: list[str], samples: int, seed: int) -> list[Any]:
    """`samples` items cycling through `prompts`, each with a fixed seed of its own."""
    from instaflow_core.evaluation.eval_set import EvalItem, derived_seed

    return [
        EvalItem(prompt=prompts[i % len(prompts)], seed=derived_seed("curve", seed, i), key=f"curve#{i}")
        for i in range(samples)
    ]


@dataclass
class _FrozenText(Model):
    """The evaluated model: the text encoders are frozen, so each prompt list's condition is computed once per
    stage and reused at every point (kept on the CPU between points); everything else is the Model's."""

    conditions: dict[tuple[str, tuple[str, ...]], Any] = field(default_factory=dict)

    def _cached(self, kind: str, prompts: Any, make: Any) -> Any:
        key = (kind, (prompts,) if isinstance(prompts, str) else tuple(prompts))
        if key not in self.conditions:
            self.conditions[key] = make(prompts).to("cpu")
        return self.conditions[key].to(self.device)

    def encode(self, prompts: Any) -> Any:
        return self._cached("encode", prompts, super().encode)

    def negative(self, prompts: Any) -> Any:
        return self._cached("negative", prompts, super().negative)


class TrainingCurves:
    """The loop's Evaluator for one training stage (see the module docstring). `base` is the stage's student
    (family Model): its parts other than the denoiser are shared with the evaluated view; when training reads
    stored conditions (no text encoders loaded) they are loaded from `base_dir` at `prepare`."""

    def __init__(
        self,
        spec: CurveSpec,
        stage: Stage,
        storage: StorageConfig,
        models_cfg: ModelsConfig,
        data: TableRef,
        base: Any,
        base_dir: Path,
        ckpt_dir: str,
    ) -> None:
        self.spec, self.stage, self.storage, self.models_cfg = spec, stage, storage, models_cfg
        self.data, self.base, self.base_dir, self.ckpt_dir = data, base, base_dir, ckpt_dir
        self.settings = spec.evaluation.during_training
        self.every_steps = self.settings.every(stage.section)
        self.sampler = sampler_spec(stage, spec.evaluation)
        self.info: dict[str, Any] = {}
        self.best: dict[str, Any] | None = None
        self._ready = False
        self._conditions: dict[
            tuple[str, tuple[str, ...]], Any
        ] = {}  # the fixed prompts' (frozen) conditions

    # ---- once ----------------------------------------------------------------------------------------
    def eval_config(self, protocol: str) -> EvaluationConfig:
        """The evaluation section at the curves' size: `samples` images, batches no larger, the given protocol."""
        ev = self.spec.evaluation
        n = self.settings.samples
        return ev.model_copy(
            update={"num_samples": n, "batch_size": min(ev.batch_size, n), "protocol": protocol}
        )

    def protocol(self, store: Any, prompts: TableRef) -> str:
        """holdout-images for prompts curated from an image table (unless COCO captions are configured), else
        teacher: FD / FID against the teacher's own images on the same prompts and seeds."""
        from instaflow_core.curation.images import images_of

        ev = self.spec.evaluation
        if (
            ev.protocol in ("auto", _HOLDOUT)
            and not ev.coco_captions
            and images_of(store, prompts) is not None
        ):
            return _HOLDOUT
        return _TEACHER

    def prepare(self) -> dict[str, Any]:
        """Networks, reference statistics (computed once, kept in the store) and the prompts' text features;
        the best point so far (keep_best). -> what the curves are (protocol, networks, setting, floor)."""
        from instaflow_core.evaluation.feature_nets import describe_networks
        from instaflow_core.evaluation.metrics import FeatureStats
        from instaflow_core.evaluation.names import column_names
        from instaflow_core.evaluation.stage import Evaluation
        from instaflow_core.store import Store

        store = Store(self.storage)
        prompts = prompts_table(store, self.stage, self.data)
        protocol = self.protocol(store, prompts)
        if protocol == _TEACHER and self.spec.teacher is None:
            raise ConfigError(
                f"evaluation.during_training on {self.stage} compares with the teacher's images: the stage "
                "was given no teacher (pass it to the flow)"
            )
        ev = Evaluation(
            self.eval_config(protocol), self.models_cfg, self.storage, prompts, self.spec.section()
        )
        if self.settings.prompts:  # the configured fixed prompts instead of the evaluation set's first ones
            ev._set = self.fixed_set(ev, protocol)  # noqa: SLF001 - the set this Evaluation runs on
        clip, net = ev.networks()
        reference = ev.reference(self.spec.teacher)  # type: ignore[arg-type] - unused by holdout-images
        self.ref_stats = FeatureStats.from_bytes(store.read_bytes(reference["uri"]))
        self.prompts, self.seeds = ev.eval_set.prompts, ev.eval_set.seeds
        self.run = ev.run_settings()
        self.text_emb = clip.text_features([self.run.caption_prefix + p for p in self.prompts])
        self.clip, self.net, self.eval_cfg = clip, net, ev.eval_cfg
        self.view = self._view_parts()
        networks = describe_networks(net, clip)
        fid_name, clip_name = column_names(networks)
        self.info = {
            "setting": self.sampler.name,
            "samples": len(self.prompts),
            "every_steps": self.every_steps,
            "protocol": self.run.name,
            "reference": reference["reference"],
            "metric_names": {"fid": fid_name, "clip_score": clip_name, "straightness": "straightness"},
            "networks": {k: networks[k] for k in ("fid_features", "clip_model")},
            "floor": reference.get("floor"),
        }
        self.best = self._read_best(store) if self.settings.keep_best else None
        self._ready = True
        log.info(
            "curves of %s: %s on %d fixed samples every %d steps (%s vs %s)",
            self.stage, self.sampler.name, len(self.prompts), self.every_steps, fid_name, reference["reference"],
        )  # fmt: skip
        return self.info

    def fixed_set(self, ev: Any, protocol: str) -> Any:
        """The evaluation set of `during_training.prompts`: against the teacher's images on them (teacher), or
        the image table's held-out images (holdout-images: the table's own set, its items replaced)."""
        from instaflow_core.evaluation.eval_set import TEACHER_SAME_SEEDS, EvalSet

        items = fixed_items(self.settings.prompts, self.settings.samples, ev.eval_cfg.seed)
        note = f"{len(items)} samples of evaluation.during_training.prompts"
        if protocol == _TEACHER:
            return EvalSet(
                name="curve-prompts", items=items, reference=TEACHER_SAME_SEEDS,
                source="evaluation.during_training.prompts", note=note, protocol=_TEACHER,
            )  # fmt: skip
        base = ev.eval_set
        return EvalSet(
            name=base.name, items=items, reference=base.reference, source=base.source,
            images_root=base.images_root, note=note, protocol=base.protocol,
        )  # fmt: skip

    def _view_parts(self) -> dict[str, Any]:
        """The parts the evaluated model shares with the student (text encoders loaded when training has none)."""
        base = self.base
        parts = dict(base.parts)
        if not base.text_parts():
            family = base.family
            loaded = family.load(self.base_dir, skip=(family.denoiser, *parts)).to(base.device)
            parts = {**loaded.parts, **parts}
        return parts

    # ---- every point ---------------------------------------------------------------------------------
    def __call__(self, step: int, ema_module: Any) -> dict[str, Any]:
        from instaflow_core.evaluation.sampling import evaluate_sampler

        if not self._ready:
            self.prepare()
        net = getattr(ema_module, "net", ema_module)  # the Velocity wrapper's denoiser
        family = self.base.family
        model = _FrozenText(family, {**self.view, family.denoiser: net}, self.base.folder, self._conditions)
        flows = self.stage in (Stage.PRETRAIN, Stage.REFLOW)
        result = evaluate_sampler(
            model, self.sampler, self.prompts, self.seeds, fid_net=self.net, clip_net=self.clip,
            reference=self.ref_stats, image_size=None, batch_size=self.eval_cfg.batch_size, latency_repeats=0,
            straightness_steps=self.eval_cfg.straightness_steps if flows else 0, text_emb=self.text_emb,
            resolution=self.eval_cfg.resolution,
        )  # fmt: skip
        out: dict[str, Any] = {"fid": float(result.fid), "clip_score": float(result.clip_score)}
        if result.straightness is not None:
            out["straightness"] = float(result.straightness)
        if self.settings.keep_best:
            self._keep_if_best(step, out, ema_module)
        return out

    # ---- keep_best -----------------------------------------------------------------------------------
    def best_dir(self) -> str:
        return f"{self.ckpt_dir}/{BEST_DIR}"

    def _read_best(self, store: Any) -> dict[str, Any] | None:
        uri = f"{self.best_dir()}/{BEST_FILE}"
        return json.loads(store.read_bytes(uri)) if store.exists(uri) else None

    def _better(self, value: float) -> bool:
        metric = self.settings.metric
        if self.best is None or self.best.get("metric") != metric:
            return True
        old = float(self.best["value"])
        return value < old if LOWER_IS_BETTER[metric] else value > old

    def _keep_if_best(self, step: int, numbers: dict[str, float], ema_module: Any) -> None:
        """Write the EMA weights, then best.json naming them (a kill in between leaves the older pair valid),
        then drop the older weights."""
        from instaflow_core.store import Store
        from instaflow_core.training.checkpoint import tensors_to_bytes

        metric = self.settings.metric
        value = numbers[metric]
        if not self._better(value):
            return
        store = Store(self.storage)
        name = f"ema-step-{step:09d}.safetensors"
        store.write_bytes(f"{self.best_dir()}/{name}", tensors_to_bytes(ema_module.state_dict()))
        old = self.best
        self.best = {"step": step, "metric": metric, "value": value, "weights": name, **numbers}
        store.write_bytes(f"{self.best_dir()}/{BEST_FILE}", json.dumps(self.best, indent=1).encode())
        if old and old.get("weights") not in (None, name):
            uri = f"{self.best_dir()}/{old['weights']}"
            if store.exists(uri):
                store.delete(uri)
        log.info("best %s so far at step %d: %.4g (%s)", metric, step, value, self.best_dir())

    # ---- the stage's summary -------------------------------------------------------------------------
    def summary(self, curve: dict[str, Any], setup_s: float) -> dict[str, Any]:
        """The curves for summary.json: what they are, every point, the cost, the best point."""
        from instaflow_core.store import Store

        eval_s, train_s = float(curve.get("eval_s", 0.0)), float(curve.get("train_s", 0.0))
        if not self._ready and self.settings.keep_best:  # nothing left to train: not prepared
            self.best = self._read_best(Store(self.storage))
        best = None
        if self.best is not None:
            best = {**self.best, "uri": f"{self.best_dir()}/{self.best['weights']}"}
        return {
            **self.info,
            "metric": self.settings.metric,
            "points": curve.get("points", []),
            "eval_s": eval_s,
            "train_s": train_s,
            "setup_s": setup_s,
            "cost_share": eval_s / max(eval_s + train_s, 1e-9),
            "best": best,
        }
