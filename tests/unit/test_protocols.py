"""Evaluation protocols: the resize pipelines (pixels fed to the network, against independent PIL code), the
paper-comparable rules one by one, choosing a protocol, and fetching only what the evaluation networks need."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from instaflow_core.config import EvaluationConfig, load
from instaflow_core.errors import ConfigError
from instaflow_core.evaluation import protocols as P
from instaflow_core.evaluation.eval_set import resize_batch
from instaflow_core.evaluation.feature_nets import (
    HUB_ALLOW,
    HUB_IGNORE,
    load_clip,
    load_inception,
    tiny_clip,
)


class Recorder:
    """A stand-in feature network that keeps what it was given (features: the per-image channel means)."""

    name = "recorder"
    label = "recorder (stand-in, not paper-comparable)"
    paper_comparable = False

    def __init__(self, input_size: int | None = 37, **attrs: object) -> None:
        self.input_size = input_size
        self.seen: list[np.ndarray] = []
        for k, v in attrs.items():
            setattr(self, k, v)

    def image_features(self, images: np.ndarray) -> np.ndarray:
        self.seen.append(np.array(images))
        return np.asarray(images, dtype=np.float64).mean(axis=(1, 2))


def _images(n: int = 3, h: int = 41, w: int = 54, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


# independent implementations of the two pipelines (PIL for the PIL steps, loops for TF 1.x bilinear)
def _crop(im: Image.Image, rounding: str) -> Image.Image:
    w, h = im.size
    s = min(w, h)
    if rounding == "torchvision":  # torchvision center_crop: int(round((W - S) / 2))
        left, top = int(round((w - s) / 2.0)), int(round((h - s) / 2.0))
    else:
        left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s))


def _clean_reference(img: np.ndarray, size: int | None, net_size: int) -> np.ndarray:
    """clean-fid as GigaGAN runs it: centre crop, LANCZOS to `size` (uint8), then PIL bicubic on each channel
    as a float image to the network size, clipped to [0, 255]."""
    im = _crop(Image.fromarray(img), "torchvision")
    if size is not None:
        im = im.resize((size, size), resample=Image.Resampling.LANCZOS)
    arr = np.asarray(im)
    chans = []
    for c in range(3):
        f = Image.fromarray(arr[:, :, c].astype(np.float32))  # mode "F"
        chans.append(np.asarray(f.resize((net_size, net_size), resample=Image.Resampling.BICUBIC)))
    return np.clip(np.stack(chans, axis=-1), 0, 255)


def _tf1_bilinear_loops(x: np.ndarray, size: int) -> np.ndarray:
    """TensorFlow 1.x resize_bilinear, align_corners=False: source = index * in / out (no half-pixel shift)."""
    h, w, c = x.shape
    x = x.astype(np.float64)
    out = np.zeros((size, size, c))
    for i in range(size):
        sy = i * h / size
        y0 = int(math.floor(sy))
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(size):
            sx = j * w / size
            x0 = int(math.floor(sx))
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = (1 - fx) * x[y0, x0] + fx * x[y0, x1]
            bottom = (1 - fx) * x[y1, x0] + fx * x[y1, x1]
            out[i, j] = (1 - fy) * top + fy * bottom
    return out


def _legacy_reference(img: np.ndarray, size: int | None, net_size: int | None) -> np.ndarray:
    """torch-fidelity's legacy path: centre crop, PIL bicubic to `size` (uint8), then TF 1.x bilinear."""
    im = _crop(Image.fromarray(img), "floor")
    if size is not None:
        im = im.resize((size, size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(im)
    return arr if net_size is None else _tf1_bilinear_loops(arr, net_size)


# ------------------------------------------------------------------------------------------ resize pipelines
def test_clean_pipeline_is_lanczos_then_float_bicubic():
    images = _images()
    net = Recorder(37)
    P.ProtocolFeatures(net, 24, "clean").image_features(images)
    (fed,) = net.seen
    assert fed.shape == (3, 37, 37, 3) and fed.dtype == np.float32  # not rounded: clean-fid keeps floats
    for got, img in zip(fed, images, strict=True):
        np.testing.assert_allclose(got, _clean_reference(img, 24, 37), atol=1e-3)


def test_legacy_tf_pipeline_is_bicubic_then_tf1_bilinear():
    images = _images()
    net = Recorder(37)
    P.ProtocolFeatures(net, 24, "legacy-tf").image_features(images)
    (fed,) = net.seen
    for got, img in zip(fed, images, strict=True):
        np.testing.assert_allclose(got, _legacy_reference(img, 24, 37), atol=1e-3)
    # TF 1.x bilinear is not PIL's (half-pixel centres): the difference is why legacy-tf numbers differ
    first = np.asarray(Image.fromarray(images[0]).crop((6, 0, 47, 41)).resize((24, 24), Image.BICUBIC))
    pil_bilinear = np.asarray(Image.fromarray(first).resize((37, 37), Image.BILINEAR), dtype=np.float64)
    assert np.abs(fed[0] - pil_bilinear).max() > 5


def test_the_two_pipelines_feed_different_pixels_and_native_skips_the_first_resize():
    images = _images()
    clean, legacy = Recorder(37), Recorder(37)
    P.ProtocolFeatures(clean, 24, "clean").image_features(images)
    P.ProtocolFeatures(legacy, 24, "legacy-tf").image_features(images)
    assert np.abs(clean.seen[0] - legacy.seen[0]).mean() > 1.0
    # native size: centre crop, then straight to the network's input; sizes may differ image to image
    mixed = [_images(1, 30, 50, seed=1)[0], _images(1, 64, 48, seed=2)[0]]
    net = Recorder(37)
    feats = P.ProtocolFeatures(net, None, "clean").image_features(mixed)
    assert feats.shape == (2, 3) and len(net.seen) == 1  # one call: all at the network's input size
    for got, img in zip(net.seen[0], mixed, strict=True):
        np.testing.assert_allclose(got, _clean_reference(img, None, 37), atol=1e-3)


def test_inception_like_networks_do_the_legacy_second_resize_themselves():
    """torch-fidelity's Inception resizes to 299 with TF 1.x bilinear itself and takes uint8 only: under
    legacy-tf it gets the first resize's uint8 pixels (grouped by size), under clean the rounded clean pixels."""
    images = [_images(1, 41, 54, seed=3)[0], _images(1, 20, 20, seed=4)[0], _images(1, 50, 40, seed=5)[0]]
    attrs = {"resizes_like": "legacy-tf", "uint8_input": True}
    legacy = Recorder(45, **attrs)
    feats = P.ProtocolFeatures(legacy, None, "legacy-tf").image_features(images)
    assert [s.shape[1] for s in legacy.seen] == [41, 20, 40]  # native crops: one network call per size
    for i, img in enumerate(images):
        np.testing.assert_array_equal(feats[i], _legacy_reference(img, None, None).mean(axis=(0, 1)))
    clean = Recorder(45, **attrs)
    P.ProtocolFeatures(clean, None, "clean").image_features(images)
    (fed,) = clean.seen
    assert fed.dtype == np.uint8
    for got, img in zip(fed, images, strict=True):
        assert np.abs(got.astype(np.float64) - _clean_reference(img, None, 45)).max() <= 0.5 + 1e-3


def test_legacy_tf_keeps_the_earlier_numbers_of_the_stand_ins():
    """The tiny CLIP at 32 px and a network without an input size (the digits classifier) see exactly what they
    saw before the protocols (resize_square to evaluation.image_size)."""
    images = _images(4, 16, 16)
    net = tiny_clip()
    before = net.image_features(resize_batch(images, 32))
    np.testing.assert_array_equal(P.ProtocolFeatures(net, 32, "legacy-tf").image_features(images), before)
    digits_like = Recorder(None)
    P.ProtocolFeatures(digits_like, 8, "legacy-tf").image_features(images)
    np.testing.assert_array_equal(digits_like.seen[0], resize_batch(images, 8))


# ---------------------------------------------------------------------------------------------- label rules
PAPER_5K = P.RunFacts(
    protocol=P.COCO2017_5K,
    samples=5000,
    reference_images=5000,
    image_size=None,
    resize="clean",
    fid_network=P.INCEPTION_WEIGHTS,
    clip_model=P.PAPER_CLIP,
    clip_arch=P.PAPER_CLIP_ARCH,
    caption_prefix="",
)
PAPER_30K = dataclasses.replace(
    PAPER_5K,
    protocol=P.COCO2014_30K,
    samples=30000,
    reference_images=40504,
    image_size=256,
    caption_prefix=P.GIGAGAN_CLIP_PREFIX,
)


def _only(facts: P.RunFacts, text: str) -> None:
    reasons = P.not_comparable_because(facts)
    assert len(reasons) == 1 and text in reasons[0], reasons


def test_paper_settings_are_comparable():
    assert P.not_comparable_because(PAPER_5K) == []
    assert P.not_comparable_because(PAPER_30K) == []
    # coco2017-5k pins no resize and no prefix (not published): either is accepted
    assert (
        P.not_comparable_because(dataclasses.replace(PAPER_5K, resize="legacy-tf", caption_prefix="x ")) == []
    )


def test_rule_network_must_be_the_checked_inception():
    _only(dataclasses.replace(PAPER_5K, fid_network="inception-v3-compat"), "not the Inception-v3")
    _only(dataclasses.replace(PAPER_5K, fid_network="tiny"), "FID network tiny")


def test_rule_protocol_must_be_a_paper_protocol():
    _only(dataclasses.replace(PAPER_5K, protocol=P.TEACHER), "not one of the paper's")
    _only(dataclasses.replace(PAPER_5K, protocol=P.HOLDOUT_IMAGES), "not one of the paper's")


def test_rule_sample_count():
    _only(dataclasses.replace(PAPER_5K, samples=500), "500 samples, coco2017-5k uses 5000")
    _only(dataclasses.replace(PAPER_30K, samples=5000), "5000 samples, coco2014-30k uses 30000")


def test_rule_image_size():
    _only(dataclasses.replace(PAPER_5K, image_size=256), "image size 256 px, coco2017-5k uses native")
    _only(dataclasses.replace(PAPER_30K, image_size=None), "image size native, coco2014-30k uses 256 px")


def test_rule_clip_model_and_its_architecture():
    _only(
        dataclasses.replace(PAPER_5K, clip_model="openai/clip-vit-base-patch32", clip_arch="ViT-B/32"), "CLIP"
    )
    # the right name on other weights (e.g. a mislabelled folder in the cache) is caught by the architecture
    _only(dataclasses.replace(PAPER_5K, clip_arch="ViT-B/32"), "ViT-B/32")
    _only(dataclasses.replace(PAPER_5K, clip_model="/models/clip-g"), "/models/clip-g")


def test_rules_pinned_by_coco2014_30k_reference_resize_prefix():
    _only(dataclasses.replace(PAPER_30K, reference_images=30000), "reference set of 30000 images")
    _only(dataclasses.replace(PAPER_30K, resize="legacy-tf"), "resize legacy-tf, coco2014-30k uses clean")
    _only(dataclasses.replace(PAPER_30K, caption_prefix=""), "CLIP caption prefix")


def test_record_names_the_protocol_and_its_settings():
    cfg = EvaluationConfig(num_samples=16, fid_features="tiny")
    run = P.settings(cfg, P.PROTOCOLS[P.TEACHER], 16)
    rec = P.record(run, P.facts_of(run, tiny_clip(), tiny_clip(), 16))
    assert rec["protocol"] == "teacher-16" and rec["paper_comparable"] is False
    assert (
        rec["protocol_settings"]["image_size"] == "native" and rec["protocol_settings"]["resize"] == "clean"
    )
    assert (
        rec["protocol_settings"]["clip_model"] == "tiny" and rec["protocol_settings"]["fid_network"] == "tiny"
    )
    assert len(rec["not_comparable_because"]) == 3  # network, protocol, CLIP


# ------------------------------------------------------------------------------------------ choosing, settings
def test_choose_protocol():
    choose = P.choose_protocol
    assert choose("auto", coco_year="2017", coco_images=True, image_table=False).key == P.COCO2017_5K
    assert choose("auto", coco_year="2014", coco_images=True, image_table=False).key == P.COCO2014_30K
    assert choose("auto", coco_year="2014", coco_images=False, image_table=False).key == P.TEACHER
    assert choose("auto", coco_year=None, coco_images=False, image_table=False).key == P.TEACHER
    assert choose("auto", coco_year=None, coco_images=False, image_table=True).key == P.HOLDOUT_IMAGES
    assert choose("teacher", coco_year=None, coco_images=False, image_table=True).key == P.TEACHER
    with pytest.raises(ConfigError, match="COCO 2014 val captions, but .* COCO 2017"):
        choose("coco2014-30k", coco_year="2017", coco_images=True, image_table=False)
    with pytest.raises(ConfigError, match="needs evaluation.coco_captions"):
        choose("coco2017-5k", coco_year=None, coco_images=False, image_table=False)
    with pytest.raises(ConfigError, match="cannot tell the COCO year"):
        choose("auto", coco_year="", coco_images=True, image_table=False)
    with pytest.raises(ConfigError, match="image table"):
        choose("holdout-images", coco_year=None, coco_images=False, image_table=False)


def test_settings_take_the_protocols_values_unless_overridden():
    cfg = EvaluationConfig(coco_captions="c.json", coco_images="val2014/", protocol="coco2014-30k")
    run = P.settings(cfg, P.PROTOCOLS[P.COCO2014_30K], 30000)
    assert (run.image_size, run.resize, run.caption_prefix) == (256, "clean", P.GIGAGAN_CLIP_PREFIX)
    own = cfg.model_copy(update={"image_size": None, "resize": "legacy-tf", "caption_prefix": ""})
    run = P.settings(own, P.PROTOCOLS[P.COCO2014_30K], 30000)
    assert (run.image_size, run.resize, run.caption_prefix) == (None, "legacy-tf", "")
    assert P.settings(EvaluationConfig(), P.PROTOCOLS[P.COCO2017_5K], 5000).image_size is None  # native
    with pytest.raises(ConfigError, match="evaluation.protocol=coco2014-30k needs"):
        load("tiny", ["evaluation.protocol=coco2014-30k"])


def test_presets_name_their_protocols(tmp_path: Path):
    sd15 = load("sd15", ["storage.root=/tmp/x"]).evaluation
    assert sd15.protocol == "auto" and sd15.resize == "clean" and sd15.clip_model == P.PAPER_CLIP
    assert sd15.num_samples == 5000 and sd15.image_size == "protocol" and sd15.fid_features == "inception"
    assert load("tiny", ["storage.root=/tmp/x"]).evaluation.protocol == "teacher"
    digits = load("digits", ["storage.root=/tmp/x"]).evaluation
    assert digits.protocol == "holdout-images" and digits.resize == "legacy-tf" and digits.image_size == 8


# ------------------------------------------------------------------------------------------ fetching weights
LAION_G14_FILES = [
    ".gitattributes",
    "README.md",
    "config.json",
    "merges.txt",
    "model.safetensors",
    "open_clip_config.json",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
    "preprocessor_config.json",
    "pytorch_model.bin",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
]


def test_clip_repo_patterns_take_model_safetensors_and_configs_only():
    from huggingface_hub.utils import filter_repo_objects

    picked = sorted(
        filter_repo_objects(LAION_G14_FILES, allow_patterns=HUB_ALLOW, ignore_patterns=HUB_IGNORE)
    )
    assert picked == [
        "config.json",
        "merges.txt",
        "model.safetensors",
        "preprocessor_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
    ]


def test_a_clip_repo_loads_from_a_cache_without_the_open_clip_copy(tmp_path: Path):
    """The hub cache holds model.safetensors + configs only (the listing names open_clip's copy and the .bin
    files too): loading the CLIP asks for nothing else, so an offline load works; the label still sees that the
    weights are not ViT-g/14."""
    from huggingface_hub import snapshot_download

    from tests.support.hub_cache import install_in_hub_cache, offline_hub

    repo = tmp_path / "repo"
    net = tiny_clip()
    net.model.save_pretrained(repo)
    net.tokenizer.save_pretrained(repo)
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"):
        (repo / name).write_bytes(b"not needed")
    (repo / "open_clip_config.json").write_text("{}")
    hf_home = tmp_path / "hf"
    install_in_hub_cache(repo, hf_home, P.PAPER_CLIP, allow_patterns=HUB_ALLOW, ignore_patterns=HUB_IGNORE)
    with offline_hub(hf_home):
        loaded = load_clip(P.PAPER_CLIP)
        with pytest.raises(Exception, match="open_clip_model.safetensors"):  # the earlier patterns wanted it
            snapshot_download(
                P.PAPER_CLIP, local_files_only=True, allow_patterns=["*.json", "*.txt", "*.safetensors"]
            )
    assert P.clip_identity(loaded) == (P.PAPER_CLIP, "ViT-32/8 (2 layers)")
    facts = dataclasses.replace(PAPER_5K, clip_model=P.clip_identity(loaded)[0], clip_arch=loaded.arch)
    _only(facts, "ViT-32/8")


def test_inception_weights_hash_is_checked_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    wrong = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    wrong.write_bytes(b"not the inception weights")
    with pytest.raises(ConfigError) as err:
        load_inception(str(wrong))
    text = str(err.value)
    assert "\n" not in text and "sha256" in text and P.INCEPTION_WEIGHTS in text and "6726825d" in text
    # a file with the published hash passes the check and goes on to torch-fidelity (absent here)
    import hashlib

    from instaflow_core.evaluation import feature_nets

    monkeypatch.setattr(
        feature_nets, "INCEPTION_SHA256_PREFIX", hashlib.sha256(wrong.read_bytes()).hexdigest()[:8]
    )
    try:
        import torch_fidelity  # noqa: F401
    except Exception:  # noqa: BLE001 - torch-fidelity needs torchvision
        with pytest.raises(ConfigError, match="needs torch-fidelity"):
            load_inception(str(wrong))
