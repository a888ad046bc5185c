"""Evaluation tasks: reference statistics (cached in the store), one model's metrics, the results table.

Each task returns small JSON-able dicts (URIs and numbers), never images or tensors. The reference statistics
are cached twice: by Prefect (cache key from the references and config sections) and in the store itself,
keyed by (image set, feature network, image size), so another run, flow or machine reuses them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
from prefect import task

from instaflow_core.config import (
    EvaluationConfig,
    ModelsConfig,
    RegistrationConfig,
    StorageConfig,
    stable_hash,
)
from instaflow_core.errors import DataError
from instaflow_core.evaluation import protocols
from instaflow_core.evaluation.digits import (
    DIGITS_NET,
    IMAGE_TABLE_REFERENCE,
    DigitsAlignmentNet,
    digits_networks,
    real_floor,
    reference_images,
)
from instaflow_core.evaluation.eval_set import (
    TEACHER_REFERENCES,
    TEACHER_SAME_SEEDS,
    EvalSet,
    build_eval_set,
    load_images,
)
from instaflow_core.evaluation.feature_nets import clip_network, describe_networks, fid_network
from instaflow_core.evaluation.metrics import FeatureStats
from instaflow_core.evaluation.sampling import Sampler, SamplerSpec, batched_features, evaluate_sampler
from instaflow_core.inference.images import png_bytes
from instaflow_core.models.loading import load_model
from instaflow_core.refs import ModelKind, ModelRef, TableRef
from instaflow_core.store import Store
from tasks.artifacts import Progress, publish_markdown, publish_table
from tasks.caching import code_version, stage_cache_key
from tasks.retries import STORE_RETRIES
from tasks.tracking.runs import log_evaluation_run

logger = logging.getLogger("instaflow.tasks.evaluation")

EVAL_TABLE_KEY = "instaflow-evaluate"
CONTROL = (
    "control"  # the models-dict label of distill(teacher), the paper's control (distillation.teacher_control)
)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60]


def teacher_spec(eval_cfg: EvaluationConfig) -> SamplerSpec:
    """The teacher's reference path: DPM-Solver++ with classifier-free guidance (25 steps, w=5 in the paper)."""
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


def _reference_generator(eval_set: EvalSet) -> str:
    if eval_set.reference == IMAGE_TABLE_REFERENCE:
        return "real-images (image table holdout)"
    if eval_set.reference in TEACHER_REFERENCES:
        return "teacher" if eval_set.reference == TEACHER_SAME_SEEDS else "teacher (other seeds)"
    return "coco-images"


def _networks(eval_cfg: EvaluationConfig, models_cfg: ModelsConfig, store: Store, eval_set: EvalSet) -> tuple:
    """(CLIP-score net, Frechet-distance net): the configured ones, or the digits classifier's (`digits-classifier`,
    trained on the real train images of the evaluation set's image table)."""
    digits = None
    if DIGITS_NET in (eval_cfg.fid_features, eval_cfg.clip_model):
        if eval_set.reference != IMAGE_TABLE_REFERENCE:
            raise DataError(f"{DIGITS_NET} metrics need prompts curated from an image source (format digits)")
        d = eval_cfg.digits
        images = TableRef.model_validate_json(eval_set.images_root or "{}")
        digits = digits_networks(store, images, d.classifier_steps, d.classifier_seed, d.min_accuracy)
    clip = digits if eval_cfg.clip_model == DIGITS_NET else clip_network(eval_cfg, models_cfg)
    net = digits.features if eval_cfg.fid_features == DIGITS_NET else fid_network(eval_cfg, models_cfg, clip)
    # the FID network sees images through the protocol's resize pipeline
    return clip, protocols.protocol_features(net, protocols.run_settings(eval_cfg, eval_set))


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def _tick(batches: Iterator[np.ndarray], progress: Progress, step: float) -> Iterator[np.ndarray]:
    done = 0.0
    for b in batches:
        yield b
        done += step
        progress.update(done)


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


# -------------------------------------------------------------------------------------------- reference
@task(cache_key_fn=stage_cache_key, persist_result=True, name="evaluate-reference-stats", **STORE_RETRIES)
def reference_stats(
    eval_cfg: EvaluationConfig,
    models_cfg: ModelsConfig,
    storage_cfg: StorageConfig,
    prompts: TableRef | None,
    teacher: ModelRef,
    inputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Feature statistics of the reference images (COCO, or the teacher's own generations), computed once per
    (image set, feature network, size) and kept in the store at eval/reference-stats/. `inputs` (the captions
    file's identity) only feeds the cache key."""
    store = Store(storage_cfg)
    eval_set = build_eval_set(eval_cfg, store, prompts)
    clip, net = _networks(eval_cfg, models_cfg, store, eval_set)
    run = protocols.run_settings(eval_cfg, eval_set)
    material: dict[str, Any] = {"set": eval_set.key(), "net": net.name, **run.cache_material()}
    if eval_set.reference in TEACHER_REFERENCES:
        # teacher-made references change with the teacher and its sampler settings
        material["teacher"] = teacher.key()
        material["sampler"] = teacher_spec(eval_cfg).__dict__
        if (
            eval_cfg.resolution is not None
        ):  # left out when native: statistics computed before it existed stay
            material["resolution"] = eval_cfg.resolution
    key = stable_hash(material)
    uri = store.ref("eval", "reference-stats", f"{_slug(eval_set.name)}-{_slug(net.name)}-{key}.npz")
    label = protocols.record(run, protocols.facts_of(run, net, clip, len(eval_set.ref_items())))
    info = {
        "uri": uri,
        "key": key,
        "eval_set": eval_set.describe(label),
        "network": net.label,
        "reference": _reference_generator(eval_set),
    }
    if eval_set.reference == IMAGE_TABLE_REFERENCE:  # real held-out images, with the real-vs-real floor
        stats = batched_features([reference_images(store, eval_set)], net, None)
        store.write_bytes(uri, stats.to_bytes())
        floor = real_floor(store, eval_set, net, stats, len(eval_set.items))
        logger.info("reference: %d held-out real images; floor (real train vs holdout) %.4f", stats.n, floor)
        return {
            **info,
            "n": stats.n,
            "computed": True,
            "floor": floor,
            "classifier_accuracy": clip.features.clf.accuracy
            if isinstance(clip, DigitsAlignmentNet)
            else None,
        }
    if store.exists(uri):
        stats = FeatureStats.from_bytes(store.read_bytes(uri))
        logger.info("reference statistics found in the store: %s (%d images)", uri, stats.n)
        return {**info, "n": stats.n, "computed": False}

    progress = Progress(f"reference features ({eval_set.name}, {net.name})")
    bs = eval_cfg.batch_size
    items = eval_set.ref_items()  # the teacher's seeds, the sampled COCO images, or all val2014 images (30k)
    if eval_set.reference in TEACHER_REFERENCES:
        sampler = Sampler(
            load_model(teacher, storage_cfg, models_cfg), teacher_spec(eval_cfg), eval_cfg.resolution
        )
        batches = (
            sampler([it.prompt for it in items[sl]], [it.seed for it in items[sl]])
            for sl in _batches(len(items), bs)
        )
    else:
        batches = (
            load_images(store.read_bytes, eval_set.images_root, [it.image_file for it in items[sl]], None)
            for sl in _batches(len(items), bs)
        )
    stats = batched_features(_tick(batches, progress, bs / max(1, len(items))), net, None)
    store.write_bytes(uri, stats.to_bytes())
    logger.info("reference statistics written: %s (%d images)", uri, stats.n)
    return {**info, "n": stats.n, "computed": True}


# ----------------------------------------------------------------------------------------------- a model
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
) -> list[dict[str, Any]]:
    """One row per sampler setting of this model: FID (vs the reference statistics), CLIP score, latency per
    image, straightness (rectified flows), and a sample grid PNG in the store. `inputs` feeds the cache key."""
    store = Store(storage_cfg)
    eval_set = build_eval_set(eval_cfg, store, prompts)
    clip, net = _networks(eval_cfg, models_cfg, store, eval_set)
    networks = describe_networks(net, clip)
    ref_stats = FeatureStats.from_bytes(store.read_bytes(reference["uri"]))
    components = load_model(model, storage_cfg, models_cfg)
    prompts_all, seeds_all = eval_set.prompts, eval_set.seeds
    run = protocols.run_settings(eval_cfg, eval_set)
    # (N, D), shared by every sampler setting; the protocol's caption prefix goes to the CLIP text only
    text_emb = clip.text_features([run.caption_prefix + p for p in prompts_all])
    run_key = stable_hash(
        {"set": eval_set.key(), "model": model.key(), "eval": eval_cfg.model_dump(mode="json")}
    )
    rows = []
    for spec in model_specs(eval_cfg, label, model):
        progress = Progress(f"evaluate {spec.name}")
        result = evaluate_sampler(
            components,
            spec,
            prompts_all,
            seeds_all,
            fid_net=net,
            clip_net=clip,
            reference=ref_stats,
            image_size=None,  # the protocol's resize runs in front of the FID network (_networks)
            batch_size=eval_cfg.batch_size,
            latency_repeats=eval_cfg.latency_repeats,
            straightness_steps=eval_cfg.straightness_steps,
            text_emb=text_emb,
            on_progress=progress.update,
            resolution=eval_cfg.resolution,
        )
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
        logger.info(
            "%s: fid %.3f clip %.4f latency %.4fs", spec.name, result.fid, result.clip_score, result.latency_s
        )
    return rows


# ------------------------------------------------------------------------------------------------ results
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


@task(cache_key_fn=stage_cache_key, persist_result=True, name="evaluate-results", **STORE_RETRIES)
def write_results(
    storage_cfg: StorageConfig, rows: list[dict[str, Any]], reference: dict[str, Any]
) -> dict[str, Any]:
    """The comparison as JSON in the store (eval/results/<hash>.json) and as the `instaflow-eval` table artifact."""
    if not rows:
        raise DataError("evaluation produced no rows: pass at least the teacher or one model")
    store = Store(storage_cfg)
    networks = rows[0]["networks"]
    eval_set = reference["eval_set"]
    body = {
        "eval_set": eval_set,
        "networks": networks,
        "reference": {k: reference[k] for k in ("uri", "n", "reference", "network")},
        "rows": rows,
        "table": display_rows(rows),
        "code_version": code_version(),
    }
    key = stable_hash(body)
    uri = store.ref("eval", "results", f"{key}.json")
    store.write_bytes(uri, json.dumps(body, indent=2, sort_keys=True).encode())
    table = display_rows(rows)
    caveat = _caveat(networks, eval_set)
    publish_table(EVAL_TABLE_KEY, table, description=f"Evaluation on {eval_set['name']}; {caveat}")
    publish_markdown(
        "instaflow-evaluate-notes",
        f"### Evaluation notes\n\n- protocol: {eval_set.get('protocol')} ({caveat})\n- set: {eval_set['note']}\n"
        f"- FID features: {networks['fid_features']}\n"
        f"- CLIP: {networks['clip_model']}\n- results: `{uri}`",
        description="Which networks and reference images the evaluation used",
    )
    return {"uri": uri, "key": key, **body}


def _caveat(networks: dict[str, Any], eval_set: dict[str, Any]) -> str:
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
