"""Metric math (Frechet distance, CLIP score, gate), the COCO protocol helpers and the feature networks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from instaflow_core.config import EvaluationConfig, ModelsConfig
from instaflow_core.errors import ConfigError, DataError
from instaflow_core.evaluation.eval_set import (
    HOLDOUT_SET,
    TEACHER_REFERENCE,
    EvalSet,
    coco_eval_set,
    coco_set_name,
    holdout_eval_set,
    one_caption_per_image,
    resize_square,
)
from instaflow_core.evaluation.feature_nets import (
    clip_network,
    describe_networks,
    fid_network,
    load_clip,
    tiny_clip,
)
from instaflow_core.evaluation.metrics import (
    FeatureStats,
    clip_score,
    feature_stats,
    fid_from_stats,
    frechet_distance,
    measure_latency,
)
from instaflow_core.inference.images import image_grid
from instaflow_core.registration.rules import check_gate


# ------------------------------------------------------------------------------------------- Frechet
def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def _reference_fd(mu1, s1, mu2, s2) -> float:
    """Independent float64 reference: Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2), via symmetric eigh only."""
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(w)) @ v.T  # S1^(1/2)
    inner = r1 @ s2 @ r1
    ev = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(
        np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(ev, 0, None)))
    )


def test_frechet_one_dimensional_closed_form():
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, abs=1e-12)


def test_frechet_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-10)


def test_frechet_general_covariances_match_float64_reference():
    rng = np.random.default_rng(0)
    for d in (2, 8, 32):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _random_spd(rng, d), _random_spd(rng, d)  # they do not commute
        assert not np.allclose(s1 @ s2, s2 @ s1)
        got = frechet_distance(mu1, s1, mu2, s2)
        assert got == pytest.approx(_reference_fd(mu1, s1, mu2, s2), rel=1e-8, abs=1e-8)
        assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-8)  # symmetric
        assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-7)


def test_fid_from_samples_approaches_closed_form():
    rng = np.random.default_rng(1)
    d = 4
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = np.zeros(d), np.ones(d)
    x = rng.multivariate_normal(mu1, s1, size=200_000)
    y = rng.multivariate_normal(mu2, s2, size=200_000)
    exact = _reference_fd(mu1, s1, mu2, s2)
    assert fid_from_stats(feature_stats(x), feature_stats(y)) == pytest.approx(exact, rel=0.02)


def test_frechet_rank_deficient_statistics_stay_finite():
    # fewer samples than dimensions: singular covariances (the few-dozen-sample tiny preset hits this)
    rng = np.random.default_rng(2)
    a, b = feature_stats(rng.normal(size=(5, 32))), feature_stats(rng.normal(size=(5, 32)) + 1)
    value = fid_from_stats(a, b)
    assert np.isfinite(value) and value > 0


def test_feature_stats_roundtrip_and_errors():
    stats = feature_stats(np.arange(12, dtype=np.float32).reshape(4, 3))
    back = FeatureStats.from_bytes(stats.to_bytes())
    assert back.n == 4 and back.mu.dtype == np.float64
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    with pytest.raises(DataError):
        feature_stats(np.zeros((1, 3)))
    with pytest.raises(DataError):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ------------------------------------------------------------------------------------------- CLIP score
def test_clip_score_is_mean_cosine_by_hand():
    img = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    txt = np.array([[1.0, 1.0], [0.0, 5.0], [-1.0, 0.0]])
    # cosines: 1/sqrt(2), 1, -1 -> mean; not x100, negatives kept
    assert clip_score(img, txt) == pytest.approx((1 / np.sqrt(2) + 1 - 1) / 3, abs=1e-12)
    with pytest.raises(DataError):
        clip_score(img, txt[:2])


def test_tiny_clip_score_matches_a_hand_computation_on_the_network():
    net = tiny_clip()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 20, 24, 3), dtype=np.uint8)  # not square: resize + centre crop
    prompts = ["a red car", "a cat on a sofa", "a mountain lake"]
    got = clip_score(net.image_features(images), net.text_features(prompts))

    # by hand: preprocess, embed, normalise, dot
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(32, 38), mode="bicubic", antialias=True).clamp(0, 1)
    x = x[:, :, :, 3:35]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = net.model.get_image_features(pixel_values=(x - mean) / std)
        img = out if torch.is_tensor(out) else out.pooler_output
        ids = net.tokenizer(
            prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        out = net.model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
        txt = out if torch.is_tensor(out) else out.pooler_output
    cos = torch.nn.functional.cosine_similarity(img.double(), txt.double(), dim=1)
    assert got == pytest.approx(float(cos.mean()), abs=1e-5)
    assert -1.0 <= got <= 1.0


def test_tiny_clip_is_deterministic_and_labelled_a_stand_in():
    a, b = tiny_clip(), tiny_clip()
    images = np.full((2, 16, 16, 3), 128, dtype=np.uint8)
    np.testing.assert_array_equal(a.image_features(images), b.image_features(images))
    info = describe_networks(a, a)
    assert "stand-in" in info["fid_features"] and "stand-in" in info["clip_model"]
    assert info["fid_paper_comparable"] is False and info["clip_paper_comparable"] is False


def test_clip_from_a_local_folder_counts_as_real_weights(tmp_path):
    net = tiny_clip()
    net.model.save_pretrained(tmp_path / "clip")
    net.tokenizer.save_pretrained(tmp_path / "clip")
    loaded = load_clip(str(tmp_path / "clip"))
    images = np.random.default_rng(3).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        loaded.image_features(images), net.image_features(images), rtol=1e-5, atol=1e-6
    )
    assert loaded.paper_comparable and "real weights" in loaded.label
    # the same folder as FID features: real weights, but Frechet distance on CLIP is not FID
    fd = fid_network(EvaluationConfig(fid_features=str(tmp_path / "clip")), ModelsConfig())
    assert not fd.paper_comparable and "not FID" in fd.label


def test_unavailable_networks_fail_with_a_clear_message(tmp_path):
    models = ModelsConfig()
    # torch-fidelity needs torchvision: not importable here; either way the message says what to provide
    with pytest.raises(ConfigError, match="inception"):
        fid_network(EvaluationConfig(fid_features="inception", inception_weights=None), models)
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        fid_network(EvaluationConfig(fid_features="dinov2"), models)
    with pytest.raises(ConfigError, match="no such folder"):
        clip_network(EvaluationConfig(clip_model=str(tmp_path / "missing")), models)


# ------------------------------------------------------------------------------------------------- gate
def test_gate_passes_better_blocks_worse():
    champ = {"fid": 20.0, "clip_score": 0.30}
    better = check_gate({"fid": 19.0, "clip_score": 0.31}, champ, 0.5, 0.005)
    assert better.passed, better.reasons
    within = check_gate({"fid": 20.5, "clip_score": 0.295}, champ, 0.5, 0.005)  # exactly at both limits
    assert within.passed, within.reasons
    worse_fid = check_gate({"fid": 20.51, "clip_score": 0.31}, champ, 0.5, 0.005)
    assert not worse_fid.passed and any("fid" in r and "> allowed" in r for r in worse_fid.reasons)
    worse_clip = check_gate({"fid": 19.0, "clip_score": 0.29}, champ, 0.5, 0.005)
    assert not worse_clip.passed and worse_clip.summary().startswith("BLOCKED")
    assert check_gate({"fid": 99.0}, None, 0.5, 0.005).passed  # no champion yet
    assert not check_gate({"clip_score": 0.4}, champ, 0.5, 0.005).passed  # unmeasured FID blocks


def test_measure_latency_counts_warmup_and_repeats():
    calls = []
    lat = measure_latency(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6 and lat.repeats == 4
    assert lat.min_s <= lat.median_s <= lat.max_s


def test_image_grid_layout():
    imgs = np.stack([np.full((2, 3, 3), i, dtype=np.uint8) for i in range(5)])
    grid = image_grid(imgs, cols=4)
    assert grid.shape == (4, 12, 3)
    assert grid[2, 0, 0] == 4 and grid[2, 3, 0] == 0  # fifth image starts row two, rest black


# ------------------------------------------------------------------------------------------------- COCO
def _coco(n_images: int = 6) -> dict:
    images = [{"id": 100 + i, "file_name": f"{100 + i:012d}.jpg"} for i in range(n_images)]
    anns = []
    for i in range(n_images):
        for k in range(5):
            anns.append(
                {"id": 1000 + 10 * i + k, "image_id": 100 + i, "caption": f" image {i}  caption {k} "}
            )
    return {"info": {"year": 2017}, "images": images, "annotations": anns}


def test_one_caption_per_image_is_deterministic_and_order_free():
    data = _coco()
    rows = one_caption_per_image(data, seed=0)
    assert [r[0] for r in rows] == list(range(100, 106))
    assert all(r[2].startswith(f"image {r[0] - 100} caption") and "  " not in r[2] for r in rows)
    shuffled = {**data, "annotations": list(reversed(data["annotations"]))}
    assert one_caption_per_image(shuffled, seed=0) == rows
    assert one_caption_per_image(data, seed=1) != rows  # the seed picks other captions


def test_coco_eval_set_samples_and_seeds(tmp_path):
    blob = json.dumps(_coco()).encode()
    small = coco_eval_set(
        blob, source="captions_val2017.json", num_samples=3, seed=0, images_root=str(tmp_path)
    )
    full = coco_eval_set(
        blob, source="captions_val2017.json", num_samples=6, seed=0, images_root=str(tmp_path)
    )
    assert small.name == "coco2017-val" and small.reference == "coco-images"
    by_key = {it.key: it for it in full.items}
    assert all(by_key[it.key] == it for it in small.items)  # a sample keeps prompt and seed as N grows
    assert len(set(full.seeds)) == 6
    assert EvalSet.from_dict(small.to_dict()) == small
    assert small.describe()["paper_comparable"] is True
    with pytest.raises(DataError, match="only 6"):
        coco_eval_set(blob, source="x.json", num_samples=7, seed=0, images_root=None)
    no_images = coco_eval_set(blob, source="captions_val2014.json", num_samples=3, seed=0, images_root=None)
    assert no_images.reference == TEACHER_REFERENCE and len(no_images.reference_items) == 3
    assert coco_set_name("captions_val2014.json", {}) == "coco2014-val"


def test_holdout_set_repeats_prompts_with_new_seeds_and_says_so():
    rows = [("p1", "a cat"), ("p2", "a dog"), ("p3", "a car")]
    es = holdout_eval_set(rows, source="prompts@v3", num_samples=7, seed=0)
    assert es.name == HOLDOUT_SET and es.reference == TEACHER_REFERENCE
    assert len(es.items) == 7 and len({(it.prompt, it.seed) for it in es.items}) == 7
    assert set(es.prompts) == {"a cat", "a dog", "a car"}
    assert not set(es.seeds) & {it.seed for it in es.reference_items}  # reference uses other noise
    assert "teacher" in es.note and es.describe()["paper_comparable"] is False
    with pytest.raises(DataError):
        holdout_eval_set([], source="prompts@v3", num_samples=4, seed=0)


def test_resize_square_centre_crops_then_resizes():
    img = np.zeros((10, 20, 3), dtype=np.uint8)
    img[:, 5:15] = 255  # the centre square is white, the sides black
    out = resize_square(img, 4)
    assert out.shape == (4, 4, 3) and out.min() == 255
