"""The digits ingest, the curation it feeds, and the classifier-backed metrics (no services)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instaflow_core.config import CaptionSource, CurationConfig, ImageSetConfig, load
from instaflow_core.curation.images import image_rows, source_captions, source_module, templates_of
from instaflow_core.curation.prompts import Curator, normalize, prompt_id
from instaflow_core.errors import ConfigError, DataError
from instaflow_core.evaluation.metrics import clip_score
from instaflow_core.experiments.digits import images as digits_images
from instaflow_core.experiments.digits.classifier import (
    DigitsAlignmentNet,
    DigitsFeatureNet,
    TrainedClassifier,
    prompt_digit,
    to_digit_pixels,
    train_classifier,
)
from instaflow_core.experiments.digits.images import SOURCE as DIGITS_SOURCE
from instaflow_core.experiments.digits.images import TEMPLATES, caption_pairs, load_image_set

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SOURCE = CaptionSource(path=DIGITS_SOURCE, format="digits")


@pytest.fixture(scope="module")
def image_set():
    return load_image_set(SOURCE, ImageSetConfig())


def test_the_split_is_fixed_stratified_and_real(image_set):
    assert image_set.images.shape == (1797, 1, 8, 8)
    assert image_set.images.min() == -1.0 and image_set.images.max() == 1.0
    train, holdout = image_set.split == "train", image_set.split == "holdout"
    assert (train.sum(), holdout.sum()) == (1078, 719)
    for k in range(10):  # stratified: every digit ~40% held out
        share = holdout[image_set.labels == k].mean()
        assert 0.38 < share < 0.42
    again = load_image_set(SOURCE, ImageSetConfig())
    assert (again.split == image_set.split).all()  # the same rows every time
    other = load_image_set(SOURCE, ImageSetConfig(split_seed=1))
    assert (other.split != image_set.split).any()


def test_captions_name_the_digit_in_several_templates(image_set):
    cfg = ImageSetConfig()
    assert source_module("digits") is digits_images
    assert cfg.templates == []  # no templates: the source's own
    pairs = caption_pairs(image_set, cfg)
    assert len(pairs) == 1797 * len(TEMPLATES)
    seven = [c for i, c in pairs if image_set.labels[i] == 7]
    assert "a handwritten digit seven" in seven and "the number 7, written by hand" in seven
    assert all(prompt_digit(c) == 7 for c in seven)
    few = ImageSetConfig(captions_per_image=2)
    picks = templates_of("digits-0001", list(TEMPLATES), few.captions_per_image)
    assert len(picks) == 2 and picks == templates_of(
        "digits-0001", list(TEMPLATES), 2
    )  # deterministic per image
    assert (
        len({tuple(templates_of(f"digits-{i:04d}", list(TEMPLATES), 2)) for i in range(50)}) > 1
    )  # images differ
    assert len(caption_pairs(image_set, few)) == 1797 * 2
    own = ImageSetConfig(templates=["{word}"])  # templates given: those, not the source's
    assert {c for _, c in caption_pairs(image_set, own)} == {"zero", "one", "two", "three", "four", "five", "six",
                                                             "seven", "eight", "nine"}  # fmt: skip


def test_curation_dedupes_the_table_captions_into_prompts():
    cur = Curator(min_chars=1, min_tokens=1, holdout_fraction=0.0)
    rows = cur.add(source_captions(SOURCE, ImageSetConfig()), DIGITS_SOURCE)
    assert len(rows) == 80  # 10 digits x 8 templates
    assert cur.report.read == 1797 * 8 and cur.report.dropped["duplicate"] == 1797 * 8 - 80


def test_image_rows_link_to_prompt_ids(image_set):
    table = image_rows(
        image_set, caption_pairs(image_set, ImageSetConfig(captions_per_image=1)), DIGITS_SOURCE
    )
    assert table.num_rows == 1797
    first = table.slice(0, 1).to_pylist()[0]
    assert first["prompt_id"] == prompt_id(normalize(first["caption"]))
    assert len(first["image"]) == 64 and first["split"] in ("train", "holdout")
    assert table.schema.field("image").metadata  # the (1, 8, 8) shape travels with the column


def test_bad_sources_and_templates_fail_in_one_line():
    with pytest.raises(DataError, match="sklearn.datasets.load_digits"):
        load_image_set(CaptionSource(path="mnist", format="digits"), ImageSetConfig())
    with pytest.raises(DataError, match="sklearn.datasets.load_digits"):
        source_captions(CaptionSource(path="mnist", format="digits"), ImageSetConfig())
    with pytest.raises(DataError, match="image format 'mnist' is not supported"):
        source_module("mnist")
    with pytest.raises(DataError, match="template"):
        source_captions(SOURCE, ImageSetConfig(templates=["digit {colour}"]))


def test_prompt_digit_reads_words_and_numerals():
    assert prompt_digit("a handwritten digit seven") == 7
    assert prompt_digit("the number 7, written by hand") == 7
    assert prompt_digit("an 8x8 image of the number three") == 3  # "8x8" names no digit
    assert prompt_digit("digit 3 or seven") is None  # two digits: no single answer
    assert prompt_digit("a red car") is None
    assert prompt_digit("") is None


def test_the_classifier_reads_held_out_digits_and_alignment_is_a_share(image_set):
    x = torch.from_numpy(image_set.images)
    y = torch.from_numpy(image_set.labels)
    tr, ho = torch.from_numpy(image_set.split == "train"), torch.from_numpy(image_set.split == "holdout")
    clf = train_classifier(x[tr], y[tr], steps=600, seed=0)
    acc = float((clf(x[ho]).argmax(1) == y[ho]).float().mean())
    assert acc >= 0.95  # the bar for a feature network worth reporting
    nets = DigitsAlignmentNet(DigitsFeatureNet(TrainedClassifier(clf, acc, int(tr.sum()))))
    img = (
        ((x[ho][:200] / 2 + 0.5) * 255)
        .round()
        .to(torch.uint8)[:, 0, :, :, None]
        .expand(-1, -1, -1, 3)
        .numpy()
    )
    torch.testing.assert_close(to_digit_pixels(img), x[ho][:200], atol=1 / 127.5, rtol=0)
    prompts = [f"digit {int(k)}" for k in y[ho][:200]]
    right = clip_score(nets.image_features(img), nets.text_features(prompts))
    wrong = clip_score(
        nets.image_features(img), nets.text_features([f"digit {(int(k) + 1) % 10}" for k in y[ho][:200]])
    )
    pred = nets.features.classes(img)
    assert right == pytest.approx(float((pred == y[ho][:200].numpy()).mean()))  # cosine of one-hots = share
    assert right > 0.9 and wrong < 0.1
    assert nets.features.image_features(img).shape == (200, 64)
    assert "not FID" in nets.features.label and "not CLIP" in nets.label


def test_the_preset_asks_for_pretraining_with_euler():
    cfg = load("digits")
    assert cfg.models.teacher == "pretrain" and cfg.pretraining is not None
    assert cfg.evaluation.fid_features == "digits-classifier"
    assert cfg.digits.model.text_hidden_size == 64 and cfg.digits.classifier.steps == 600
    assert cfg.digits.classifier.min_accuracy == 0.95
    with pytest.raises(ConfigError, match="generation.scheduler=euler"):
        load("digits", ["generation.scheduler=dpmsolver++"])
    with pytest.raises(ConfigError, match="pretraining"):
        load("tiny", ["models.teacher=pretrain", "generation.scheduler=euler"])
    # the keys that moved into the experiment's own section say where they went
    with pytest.raises(ConfigError, match="digits.model"):
        load("digits", ["models.digits.seed=1"])
    with pytest.raises(ConfigError, match="digits.classifier"):
        load("digits", ["evaluation.digits.classifier_steps=10"])
    assert CurationConfig(sources=[SOURCE]).images.holdout_fraction == 0.4


def test_images_are_stored_exactly_in_float16(image_set):
    assert np.array_equal(image_set.images.astype(np.float16).astype(np.float32), image_set.images)
