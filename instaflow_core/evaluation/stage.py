"""The evaluation stage as one object: `Evaluation` (the evaluation config in, JSON-able results out).

    ev = Evaluation(eval_cfg, models_cfg, storage, prompts, experiment)
    ev.reference(teacher)         feature statistics of the reference images (COCO, the teacher's own
                                  generations, or an image table's held-out real images), computed once per
                                  (image set, feature network, size) and kept in the store at eval/reference-stats/
    ev.evaluate(label, model, reference)   one row per sampler setting of a model: FID (vs the reference), CLIP
                                  score, latency per image, straightness (rectified flows), a sample grid PNG
    ev.grid(teacher, models)      the labelled comparison grid (rows: models at their key setting, columns:
                                  `evaluation.grid_prompts`)
    results_body(rows, reference) the comparison as one JSON body and its display table

The sampler settings per model (`model_specs`): the teacher at its own sampler with guidance; a 1-RF / 2-RF at
each of `rf_steps`; a one-step model at one step without guidance, as the paper. The networks are the configured
ones (Inception / CLIP / DINOv2 / the tiny stand-ins: feature_nets.py) or an experiment's own
(`EXPERIMENT_NETWORKS`: the digits classifier). The Prefect tasks (tasks/evaluation.py) are one call each into
this object plus caching, progress and artifacts.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from instaflow_core.config import EvaluationConfig, ModelsConfig, StorageConfig, stable_hash
from instaflow_core.errors import DataError
from instaflow_core.evaluation import protocols
from instaflow_core.evaluation.eval_set import (
    IMAGE_TABLE_REFERENCE,
    TEACHER_REFERENCES,
    TEACHER_SAME_SEEDS,
    EvalSet,
    build_eval_set,
    derived_seed,
    load_images,
)
from instaflow_core.evaluation.feature_nets import clip_network, describe_networks, fid_network
from instaflow_core.evaluation.metrics import FeatureStats
from instaflow_core.evaluation.names import EXPERIMENT_NETWORKS
from instaflow_core.evaluation.paper_table import labelled_grid
from instaflow_core.evaluation.sampling import (
    Sampler,
    SamplerSpec,
    batched_features,
    evaluate_sampler,
    generate_images,
)
from instaflow_core.inference.images import png_bytes
from instaflow_core.models.loading import load_model
from instaflow_core.refs import ModelKind, ModelRef, RefName, TableRef
from instaflow_core.store import Store

log = logging.getLogger("instaflow.evaluation")

CONTROL = RefName.CONTROL  # the models-dict label of distill(teacher), the paper's control (teacher_control)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60]


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def teacher_spec(eval_cfg: EvaluationConfig) -> SamplerSpec:
    """The teacher's reference path: its own sampler with classifier-free guidance (25 steps, w=5 in the paper)."""
    return SamplerSpec(
        name=f"teacher_{eval_cfg.teacher_steps}step",
        model_kind="teacher",
        solver="dpmsolver++",
        steps=eval_cfg.teacher_steps,
        guidance=eval_cfg.teacher_guidance,
    )


def model_specs(eval_cfg: EvaluationConfig, label: str, model: ModelRef) -> list[SamplerSpec]:
    """What to evaluate for one model: the teacher path; a 2-RF at each of `rf_steps` with `rf_guidance`;
    a one-step (InstaFlow) model at one step without guidance, as the paper."""
    kind = model.kind or label
    if kind == ModelKind.TEACHER:
        return [teacher_spec(eval_cfg)]
    if kind in (
        ModelKind.RF1,
        ModelKind.RF2,
    ):  # rectified flows (a pretrained teacher is a 1-RF): Euler steps
        name = ModelKind.RF1 if kind == ModelKind.RF1 else label
        return [
            SamplerSpec(f"{name}_{n}step", kind, "euler", n, eval_cfg.rf_guidance)
            for n in sorted(set(eval_cfg.rf_steps))
        ]
    return [SamplerSpec(f"{label}_1step", kind, "euler", 1, 1.0)]


def input_identity(eval_cfg: EvaluationConfig, storage_cfg: StorageConfig) -> dict[str, Any]:
    """Size and mtime/ETag of the COCO captions file (cache-key material: a replaced file is noticed)."""
    if not eval_cfg.coco_captions:
        return {}
    store = Store(storage_cfg)
    path = eval_cfg.coco_captions
    try:
        if path.startswith("s3://"):
            info = store.fs.info(store.fs_path(path))
        else:
            st = store.local_path(path).stat()
            info = {"size": st.st_size, "mtime": st.st_mtime}
    except FileNotFoundError as err:
        raise DataError(f"evaluation.coco_captions: {path} not found") from err
    keep = ("size", "mtime", "ETag", "LastModified")
    return {"coco_captions": path, **{k: str(info[k]) for k in keep if k in info}}


@dataclass
class Evaluation:
    """One evaluation configuration over one evaluation set (see the module docstring). `experiment` is the
    config section of an experiment whose networks the config names (the `digits` section), else None."""

    eval_cfg: EvaluationConfig
    models_cfg: ModelsConfig
    storage: StorageConfig
    prompts: TableRef | None
    experiment: Any = None
    _set: EvalSet | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.store = Store(self.storage)

    @property
    def eval_set(self) -> EvalSet:
        if self._set is None:
            self._set = build_eval_set(self.eval_cfg, self.store, self.prompts)
        return self._set

    def networks(self) -> tuple[Any, Any]:
        """(CLIP-score net, Frechet-distance net): the configured ones, or an experiment's own
        (`digits-classifier`: trained on the real train images of the evaluation set's image table)."""
        cfg = self.eval_cfg
        own = {cfg.fid_features, cfg.clip_model} & set(EXPERIMENT_NETWORKS)
        clip_exp = fd_exp = None
        if own:
            module = importlib.import_module(EXPERIMENT_NETWORKS[own.pop()])
            clip_exp, fd_exp = module.networks(self.store, self.eval_set, self.experiment)
        clip = clip_exp if cfg.clip_model in EXPERIMENT_NETWORKS else clip_network(cfg, self.models_cfg)
        net = fd_exp if cfg.fid_features in EXPERIMENT_NETWORKS else fid_network(cfg, self.models_cfg, clip)
        # the FID network sees images through the protocol's resize pipeline
        return clip, protocols.protocol_features(net, self.run_settings())

    def run_settings(self) -> Any:
        """The protocol this evaluation runs (evaluation/protocols.py): its name, size, resize, prefix."""
        return protocols.run_settings(self.eval_cfg, self.eval_set)

    def _reference_generator(self) -> str:
        ref = self.eval_set.reference
        if ref == IMAGE_TABLE_REFERENCE:
            return "real-images (image table holdout)"
        if ref in TEACHER_REFERENCES:
            return "teacher" if ref == TEACHER_SAME_SEEDS else "teacher (other seeds)"
        return "coco-images"

    # ---- the reference statistics ---------------------------------------------------------------------
    def reference(
        self, teacher: ModelRef, on_progress: Callable[[float], None] | None = None
    ) -> dict[str, Any]:
        """Feature statistics of the reference images, computed once per (image set, feature network, size) and
        kept in the store; -> {uri, key, eval_set, network, reference, n, computed, [floor, classifier_accuracy]}."""
        cfg, store, eval_set = self.eval_cfg, self.store, self.eval_set
        clip, net = self.networks()
        run = self.run_settings()
        material: dict[str, Any] = {"set": eval_set.key(), "net": net.name, **run.cache_material()}
        if eval_set.reference in TEACHER_REFERENCES:
            # teacher-made references change with the teacher and its sampler settings
            material["teacher"] = teacher.key()
            material["sampler"] = teacher_spec(cfg).__dict__
            if cfg.resolution is not None:  # left out when native: statistics computed before it existed stay
                material["resolution"] = cfg.resolution
        key = stable_hash(material)
        uri = store.ref("eval", "reference-stats", f"{_slug(eval_set.name)}-{_slug(net.name)}-{key}.npz")
        label = protocols.record(run, protocols.facts_of(run, net, clip, len(eval_set.ref_items())))
        info = {
            "uri": uri,
            "key": key,
            "eval_set": eval_set.describe(label),
            "network": net.label,
            "reference": self._reference_generator(),
        }
        if eval_set.reference == IMAGE_TABLE_REFERENCE:  # real held-out images, with the real-vs-real floor
            from instaflow_core.curation.images import image_source_of  # curation imports no evaluation

            module = image_source_of(store, TableRef.model_validate_json(eval_set.images_root or "{}"))
            stats = batched_features([module.reference_images(store, eval_set)], net, None)
            store.write_bytes(uri, stats.to_bytes())
            floor = module.real_floor(store, eval_set, net, stats, len(eval_set.items))
            log.info("reference: %d held-out real images; floor (real train vs holdout) %.4f", stats.n, floor)
            accuracy = getattr(getattr(getattr(clip, "features", None), "clf", None), "accuracy", None)
            return {**info, "n": stats.n, "computed": True, "floor": floor, "classifier_accuracy": accuracy}
        if store.exists(uri):
            stats = FeatureStats.from_bytes(store.read_bytes(uri))
            log.info("reference statistics found in the store: %s (%d images)", uri, stats.n)
            return {**info, "n": stats.n, "computed": False}

        bs = cfg.batch_size
        items = (
            eval_set.ref_items()
        )  # the teacher's seeds, the sampled COCO images, or all val2014 images (30k)
        if eval_set.reference in TEACHER_REFERENCES:
            sampler = Sampler(
                load_model(teacher, self.storage, self.models_cfg), teacher_spec(cfg), cfg.resolution
            )
            batches: Iterator[np.ndarray] = (
                sampler([it.prompt for it in items[sl]], [it.seed for it in items[sl]])
                for sl in _batches(len(items), bs)
            )
        else:
            batches = (
                load_images(store.read_bytes, eval_set.images_root, [it.image_file for it in items[sl]], None)
                for sl in _batches(len(items), bs)
            )
        stats = batched_features(_tick(batches, on_progress, bs / max(1, len(items))), net, None)
        store.write_bytes(uri, stats.to_bytes())
        log.info("reference statistics written: %s (%d images)", uri, stats.n)
        return {**info, "n": stats.n, "computed": True}

    # ---- one model ------------------------------------------------------------------------------------
    def evaluate(
        self,
        label: str,
        model: ModelRef,
        reference: dict[str, Any],
        on_setting: Callable[[str], Callable[[float], None] | None] | None = None,
    ) -> list[dict[str, Any]]:
        """One row per sampler setting of this model: FID (vs the reference statistics), CLIP score, latency per
        image, straightness (rectified flows), and a sample grid PNG in the store. `on_setting(name)` returns a
        progress callback for that setting."""
        cfg, store, eval_set = self.eval_cfg, self.store, self.eval_set
        clip, net = self.networks()
        networks = describe_networks(net, clip)
        ref_stats = FeatureStats.from_bytes(store.read_bytes(reference["uri"]))
        loaded = load_model(model, self.storage, self.models_cfg)
        prompts_all, seeds_all = eval_set.prompts, eval_set.seeds
        run = self.run_settings()
        # (N, D), shared by every sampler setting; the protocol's caption prefix goes to the CLIP text only
        text_emb = clip.text_features([run.caption_prefix + p for p in prompts_all])
        run_key = stable_hash(
            {"set": eval_set.key(), "model": model.key(), "eval": cfg.model_dump(mode="json")}
        )
        rows = []
        for spec in model_specs(cfg, label, model):
            result = evaluate_sampler(
                loaded, spec, prompts_all, seeds_all, fid_net=net, clip_net=clip, reference=ref_stats,
                image_size=None, batch_size=cfg.batch_size, latency_repeats=cfg.latency_repeats,
                straightness_steps=cfg.straightness_steps, text_emb=text_emb,
                on_progress=on_setting(spec.name) if on_setting else None, resolution=cfg.resolution,
            )  # fmt: skip
            grid_uri = store.ref("eval", "runs", run_key, f"{spec.name}.png")
            store.write_bytes(grid_uri, png_bytes(result.grid))
            rows.append(
                {
                    "name": spec.name,
                    "model_kind": spec.model_kind,
                    "solver": spec.solver,
                    "steps": spec.steps,
                    "guidance": spec.guidance,
                    **result.metrics(),
                    "model": model.key(),
                    "model_uri": model.uri,
                    "grid_uri": grid_uri,
                    "networks": networks,
                    "reference": reference["reference"],
                    "eval_set": eval_set.name,
                    "protocol": run.name,
                }
            )
            log.info(
                "%s: fid %.3f clip %.4f latency %.4fs",
                spec.name,
                result.fid,
                result.clip_score,
                result.latency_s,
            )
        return rows

    # ---- the labelled grid ----------------------------------------------------------------------------
    def grid(
        self, teacher: ModelRef, models: dict[str, ModelRef], code_version: str
    ) -> dict[str, Any] | None:
        """The labelled comparison grid PNG in the store (eval/grids/<key>.png): one row per model at its key
        setting (`grid_rows`), one column per `evaluation.grid_prompts`, every row from the same noise seeds, so
        a column shows what each model makes of the same X0; {uri, rows, columns}, or None without prompts."""
        cfg = self.eval_cfg
        prompts = list(cfg.grid_prompts)
        if not prompts:
            return None
        labels = list(cfg.grid_labels or prompts)
        seeds = [derived_seed("grid", cfg.seed, i) for i in range(len(prompts))]
        rows = grid_rows(cfg, teacher, models)
        images = [
            generate_images(
                load_model(ref, self.storage, self.models_cfg), spec, prompts, seeds, len(prompts)
            )
            for _, ref, spec in rows
        ]
        grid = labelled_grid(images, [label for label, _, _ in rows], labels)
        key = stable_hash(
            {
                "rows": [(label, ref.key(), spec.__dict__) for label, ref, spec in rows],
                "prompts": prompts,
                "seeds": seeds,
                "code": code_version,
            }
        )
        uri = self.store.uri("eval", "grids", f"{key}.png")
        self.store.write_bytes(uri, png_bytes(grid))
        log.info("labelled grid %s: rows %s", uri, [label for label, _, _ in rows])
        return {"uri": uri, "rows": [label for label, _, _ in rows], "columns": labels}


def grid_rows(
    eval_cfg: EvaluationConfig, teacher: ModelRef, models: dict[str, ModelRef]
) -> list[tuple[str, ModelRef, SamplerSpec]]:
    """(row label, model, sampler setting) of every grid row, in order. For a pretrained (1-RF) teacher the rows
    are the paper's story: the teacher at its most steps, the teacher at one step, the 2-RF at one step,
    InstaFlow at one step; other teachers: the teacher's reference path, then the 2-RF and InstaFlow."""
    out: list[tuple[str, ModelRef, SamplerSpec]] = []
    if teacher.kind == ModelKind.RF1:
        n = max(eval_cfg.rf_steps)
        out.append(
            (
                f"teacher {n}-step",
                teacher,
                SamplerSpec(f"1rf_{n}step", ModelKind.RF1, "euler", n, eval_cfg.rf_guidance),
            )
        )
        out.append(
            (
                "1-RF 1-step",
                teacher,
                SamplerSpec("1rf_1step", ModelKind.RF1, "euler", 1, eval_cfg.rf_guidance),
            )
        )
    else:
        spec = teacher_spec(eval_cfg)
        out.append((f"teacher {spec.steps}-step", teacher, spec))
    if models.get(ModelKind.RF2) is not None:
        spec = SamplerSpec("2rf_1step", ModelKind.RF2, "euler", 1, eval_cfg.rf_guidance)
        out.append(("2-RF 1-step", models[ModelKind.RF2], spec))
    if models.get(ModelKind.INSTAFLOW) is not None:
        spec = SamplerSpec("instaflow_1step", ModelKind.INSTAFLOW, "euler", 1, 1.0)
        out.append(("InstaFlow 1-step", models[ModelKind.INSTAFLOW], spec))
    return out


def _tick(
    batches: Iterator[np.ndarray], on_progress: Callable[[float], None] | None, step: float
) -> Iterator[np.ndarray]:
    done = 0.0
    for b in batches:
        yield b
        done += step
        if on_progress is not None:
            on_progress(done)


# -------------------------------------------------------------------------------------------- results
def display_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The comparison table as people read it (rounded, one line per evaluated setting); the metric columns
    are named by the networks that computed them (`FD(tiny-CLIP)`, not `FID`, unless the real ones ran)."""
    from instaflow_core.evaluation.names import column_names

    def r(x: Any, nd: int) -> Any:
        return None if x is None else round(float(x), nd)

    def heads(row: dict[str, Any]) -> tuple[str, str]:  # the networks say what their numbers are
        return column_names(row.get("networks"))

    return [
        {
            "model": row["name"],
            "solver": row["solver"],
            "steps": row["steps"],
            "guidance": row["guidance"],
            heads(row)[0]: r(row["fid"], 3),
            heads(row)[1]: r(row["clip_score"], 4),
            "latency_s": r(row["latency_s"], 4),
            "straightness": r(row["straightness"], 5),
            "samples": row["samples"],
            "protocol": row.get("protocol"),
        }
        for row in rows
    ]


def results_body(rows: list[dict[str, Any]], reference: dict[str, Any], code_version: str) -> dict[str, Any]:
    """The comparison as one JSON body: the set, the networks, the reference, every row and the display table."""
    if not rows:
        raise DataError("evaluation produced no rows: pass at least the teacher or one model")
    return {
        "eval_set": reference["eval_set"],
        "networks": rows[0]["networks"],
        "reference": {k: reference[k] for k in ("uri", "n", "reference", "network")},
        "rows": rows,
        "table": display_rows(rows),
        "code_version": code_version,
    }


def caveat(networks: dict[str, Any], eval_set: dict[str, Any]) -> str:
    """One line: whether these numbers compare with the paper's, and why not."""
    if "not_comparable_because" in eval_set:  # the protocol's label (protocols.not_comparable_because)
        reasons = eval_set["not_comparable_because"]
        if not reasons:
            return f"protocol {eval_set['protocol']}: comparable with the paper's numbers"
        return f"protocol {eval_set['protocol']}, NOT paper-comparable: " + "; ".join(reasons)
    if (
        networks["fid_paper_comparable"]
        and eval_set["paper_comparable"]
        and networks["clip_paper_comparable"]
    ):
        return "standard networks on COCO (comparable with the paper's protocol)"
    return "NOT paper-comparable: " + "; ".join(
        x
        for x in (
            None if networks["fid_paper_comparable"] else f"FID features: {networks['fid_features']}",
            None if networks["clip_paper_comparable"] else f"CLIP: {networks['clip_model']}",
            None if eval_set["paper_comparable"] else f"reference: {eval_set['reference']}",
        )
        if x
    )
