"""Stages 5 and 6 as Prefect flows on the tiny preset: evaluate (teacher, 2-RF at 1 and N steps, one-step model),
then register + gate, and the champion loads by alias."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from instaflow_core.config import load
from instaflow_core.curation.prompts import PROMPTS_SCHEMA
from instaflow_core.models.sd import build_tiny
from instaflow_core.refs import ModelRef
from instaflow_core.store import Store, create_table, merge_rows, table_ref
from tasks.caching import prefect_settings


def _prompts_table(store: Store):
    texts = ["a red car", "a cat on a sofa", "a mountain lake", "a bowl of fruit", "a city at night", "a dog"]
    rows = [
        {
            "prompt_id": f"p{i}",
            "text": t,
            "source": "test",
            "split": "holdout" if i < 4 else "train",
            "n_tokens": len(t.split()) + 2,
            "flags": [],
        }
        for i, t in enumerate(texts)
    ]
    merge_rows(create_table(store, "prompts", PROMPTS_SCHEMA), rows, on="prompt_id")
    return table_ref(store, "prompts")


def _model(store: Store, tmp_path, kind: str, seed: int) -> ModelRef:
    """A tiny random SD folder in the store standing in for a trained model (plumbing, not quality)."""
    from instaflow_core.config import TinyModelConfig

    folder = build_tiny(TinyModelConfig(seed=seed)).save(tmp_path / kind)
    uri = store.uri("models", kind)
    store.put_dir(folder, uri)
    return ModelRef(uri=uri, kind=kind, config_hash=f"test-{seed}", source="test")


@pytest.mark.timeout(600)
def test_evaluate_then_register_on_tiny(prefect_api, local_storage_cfg, tmp_path):
    import mlflow
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.evaluate import evaluate_flow
    from flows.register import register_flow
    from tasks.teacher import teacher_model
    from tasks.tracking.client import mlflow_client
    from tasks.tracking.promotion import CHAMPION

    cfg = load(
        "tiny",
        [
            f"storage.root={local_storage_cfg.root}",
            "evaluation.num_samples=4",
            "evaluation.batch_size=4",
            "evaluation.teacher_steps=2",
            "evaluation.rf_steps=[1,2]",
            "evaluation.straightness_steps=2",
            "evaluation.latency_repeats=1",
            "registration.model_name=tiny-test",
            "registration.rf_model_name=tiny-test-2rf",
        ],
    )
    store = Store(cfg.storage)
    prompts = _prompts_table(store)
    teacher = teacher_model.fn(cfg.models, cfg.storage)
    models = {"2rf": _model(store, tmp_path, "2rf", 1), "instaflow": _model(store, tmp_path, "instaflow", 2)}

    with prefect_settings(cfg.storage, cfg.orchestration):
        result = evaluate_flow(cfg, models, teacher, prompts)

    names = [row["model"] for row in result["table"]]
    assert names == ["teacher_2step", "2rf_1step", "2rf_2step", "instaflow_1step"]
    for name, m in result["metrics"].items():
        assert np.isfinite(m["fid"]) and m["fid"] >= -1e-6, name
        assert -1.0 <= m["clip_score"] <= 1.0 and m["latency_s"] > 0 and m["samples"] == 4
        assert (m["straightness"] is None) == (name.startswith("teacher"))
    # stand-ins are said so, everywhere the numbers go
    assert "stand-in" in result["networks"]["fid_features"] and "stand-in" in result["networks"]["clip_model"]
    # no COCO: the teacher protocol, the teacher's own images on the same prompts and seeds as the reference
    assert (
        result["eval_set"]["reference"] == "teacher-same-seeds" and not result["eval_set"]["paper_comparable"]
    )
    assert result["eval_set"]["protocol"] == "teacher-4"
    assert any("not one of the paper's" in r for r in result["eval_set"]["not_comparable_because"])
    assert {row["protocol"] for row in result["table"]} == {"teacher-4"}  # the results table says which ran
    # the teacher against its own images on the same seeds: zero (a check of the reference)
    assert result["metrics"]["teacher_2step"]["fid"] == pytest.approx(0.0, abs=1e-6)

    saved = json.loads(store.read_bytes(result["uri"]))
    assert saved["table"] == result["table"]
    assert all(store.exists(row["grid_uri"]) for row in saved["rows"])
    stats_uri = saved["reference"]["uri"]
    assert store.exists(stats_uri) and saved["reference"]["n"] == 4

    async def _artifacts():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["instaflow-evaluate"]))
            )

    import asyncio

    artifacts = asyncio.run(_artifacts())
    assert artifacts
    data = max(artifacts, key=lambda a: a.created).data  # this evaluation's (other tests publish the key too)
    rows = json.loads(data) if isinstance(data, str) else data
    assert {r["model"] for r in rows} == set(names)
    assert {r["protocol"] for r in rows} == {"teacher-4"}

    with mlflow_client(cfg.registration, cfg.storage) as client:
        run = client.get_run(result["run_id"])
        assert run.data.metrics["instaflow_1step.fid"] == pytest.approx(
            result["metrics"]["instaflow_1step"]["fid"]
        )
        assert "stand-in" in run.data.tags["instaflow.fid_features"]
        assert run.data.tags["instaflow.paper_comparable"] == "false"
        # the protocol and its settings are params of the evaluation run
        params = run.data.params
        assert params["protocol"] == "teacher-4" and run.data.tags["instaflow.protocol"] == "teacher-4"
        assert params["protocol.key"] == "teacher" and params["protocol.image_size"] == "32"
        assert params["protocol.resize"] == "clean" and params["protocol.clip_model"] == "tiny"

    # an unchanged second evaluation: cache hits, and the same MLflow run (no duplicate)
    with prefect_settings(cfg.storage, cfg.orchestration):
        again = evaluate_flow(cfg, models, teacher, prompts)
    assert again["run_id"] == result["run_id"] and again["table"] == result["table"]

    lineage = {"prompts": prompts, "teacher": teacher, "triplets": "db/triplets@v7"}
    with prefect_settings(cfg.storage, cfg.orchestration):
        registered = register_flow(cfg, models["instaflow"], result, lineage, rf_model=models["2rf"])
    assert (
        registered["aliases"] == [CHAMPION] and registered["gate"]["promoted"]
    )  # first version: no champion yet
    assert registered["rf"]["model_name"] == "tiny-test-2rf" and registered["rf"]["aliases"] == [CHAMPION]
    with mlflow_client(cfg.registration, cfg.storage) as client:
        mv = client.get_model_version("tiny-test", registered["version"])
        tags = mv.tags
        assert tags["instaflow.prompts_version"] == str(prompts.version)
        assert tags["instaflow.triplets_version"] == "7"
        assert tags["instaflow.teacher"] == teacher.source
        assert tags["instaflow.config_hash.evaluation"] == cfg.section_hash("evaluation")
        assert tags["instaflow.prefect_flow_run_id"] and tags["instaflow.code_version"]
        assert float(tags["metric.fid"]) == pytest.approx(result["metrics"]["instaflow_1step"]["fid"])
        assert (
            tags["instaflow.eval_protocol"] == "teacher-4" and tags["instaflow.paper_comparable"] == "false"
        )
        rf_mv = client.get_model_version("tiny-test-2rf", registered["rf"]["version"])
        assert float(rf_mv.tags["metric.fid"]) == pytest.approx(result["metrics"]["2rf_2step"]["fid"])

        model = mlflow.pyfunc.load_model(f"models:/tiny-test@{CHAMPION}")
        images = model.predict(pd.DataFrame({"prompt": ["a red car"], "seed": [0]}))
        assert images.shape == (1, 16, 16, 3) and images.dtype == np.uint8


def test_coco_reference_statistics_are_cached_in_the_store(local_storage_cfg, tmp_path):
    """A miniature COCO (captions JSON + JPEG folder): reference features computed once, then read back."""
    from PIL import Image

    from instaflow_core.config import EvaluationConfig, ModelsConfig
    from instaflow_core.evaluation.metrics import FeatureStats
    from instaflow_core.evaluation.stage import input_identity
    from tasks.evaluation import reference_stats

    images_dir = tmp_path / "val2017"
    images_dir.mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(5):
        name = f"{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8)).save(images_dir / name)
        images.append({"id": i, "file_name": name})
        anns += [{"id": 10 * i + k, "image_id": i, "caption": f"photo {i} number {k}"} for k in range(2)]
    captions = tmp_path / "captions_val2017.json"
    captions.write_text(json.dumps({"images": images, "annotations": anns}))

    eval_cfg = EvaluationConfig(
        coco_captions=str(captions), coco_images=str(images_dir), num_samples=4, image_size=16, batch_size=3,
        fid_features="tiny", clip_model="tiny",
    )  # fmt: skip
    teacher = ModelRef(uri="unused", kind="teacher")  # real images: the teacher is not needed
    inputs = input_identity(eval_cfg, local_storage_cfg)
    assert inputs["coco_captions"] == str(captions) and int(inputs["size"]) > 0
    first = reference_stats.fn(eval_cfg, ModelsConfig(), local_storage_cfg, None, teacher, inputs)
    assert first["computed"] and first["n"] == 4 and first["reference"] == "coco-images"
    assert first["eval_set"]["name"] == "coco2017-val" and first["eval_set"]["protocol"] == "coco2017-5k"
    # COCO 2017 with tiny stand-ins and 4 samples: the protocol ran, the label says why it is not the paper's
    why = " | ".join(first["eval_set"]["not_comparable_because"])
    assert not first["eval_set"]["paper_comparable"] and "4 samples" in why and "not the Inception" in why
    stats = FeatureStats.from_bytes(Store(local_storage_cfg).read_bytes(first["uri"]))
    assert stats.mu.shape == (32,) and np.isfinite(stats.sigma).all()
    second = reference_stats.fn(eval_cfg, ModelsConfig(), local_storage_cfg, None, teacher, inputs)
    assert not second["computed"] and second["uri"] == first["uri"]


def test_coco2014_30k_reference_is_every_val2014_image(local_storage_cfg, tmp_path):
    """A COCO-2014-shaped fixture (captions_val2014.json + val2014/ of differently sized JPEGs, one image without
    captions): protocol coco2014-30k samples captions from the captioned images, but its reference statistics
    cover ALL images of the file, resized as the protocol says (LANCZOS to 256, then to the network's input)."""
    from PIL import Image

    from instaflow_core.config import EvaluationConfig, ModelsConfig
    from instaflow_core.evaluation.feature_nets import tiny_clip
    from instaflow_core.evaluation.metrics import FeatureStats, feature_stats
    from instaflow_core.evaluation.protocols import ProtocolFeatures
    from tasks.evaluation import reference_stats

    images_dir = tmp_path / "val2014"
    images_dir.mkdir()
    rng = np.random.default_rng(1)
    images, anns, pixels = [], [], []
    for i in range(7):
        name = f"COCO_val2014_{i:012d}.jpg"
        arr = rng.integers(0, 256, size=(20 + 3 * i, 40 - 2 * i, 3), dtype=np.uint8)
        Image.fromarray(arr).save(images_dir / name, quality=95)
        with Image.open(images_dir / name) as im:
            pixels.append(np.asarray(im.convert("RGB")))
        images.append({"id": i, "file_name": name})
        if i < 6:  # image 6 has no caption: never a sample, still part of the reference
            anns += [{"id": 10 * i + k, "image_id": i, "caption": f"photo {i} number {k}"} for k in range(2)]
    captions = tmp_path / "captions_val2014.json"
    captions.write_text(json.dumps({"images": images, "annotations": anns}))

    eval_cfg = EvaluationConfig(
        protocol="coco2014-30k", coco_captions=str(captions), coco_images=str(images_dir), num_samples=3,
        batch_size=4, fid_features="tiny", clip_model="tiny",
    )  # fmt: skip
    teacher = ModelRef(uri="unused", kind="teacher")
    ref = reference_stats.fn(eval_cfg, ModelsConfig(), local_storage_cfg, None, teacher, {})
    es = ref["eval_set"]
    assert es["protocol"] == "coco2014-30k" and es["samples"] == 3 and es["reference_images"] == 7
    assert ref["n"] == 7 and ref["reference"] == "coco-images"
    assert es["protocol_settings"]["image_size"] == 256 and es["protocol_settings"]["resize"] == "clean"
    assert es["protocol_settings"]["caption_prefix"] == "A photo depicts "
    why = " | ".join(es["not_comparable_because"])
    assert "3 samples, coco2014-30k uses 30000" in why and "reference set of 7 images" in why
    stats = FeatureStats.from_bytes(Store(local_storage_cfg).read_bytes(ref["uri"]))
    expected = feature_stats(ProtocolFeatures(tiny_clip(), 256, "clean").image_features(pixels))
    np.testing.assert_allclose(stats.mu, expected.mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats.sigma, expected.sigma, rtol=1e-6, atol=1e-9)
