"""Digits metrics with a real feature network: a classifier the evaluation trains on the real train images.

`evaluation.fid_features: digits-classifier` and `evaluation.clip_model: digits-classifier` select them
(registered in `evaluation.stage.EXPERIMENT_NETWORKS`; the settings are `digits.classifier`):

- `DigitsFeatureNet`: the classifier's 64 penultimate activations. The Frechet distance in them, between
  generated and held-out real images, is a digits metric (feature FD): NOT FID, and labelled so everywhere.
- `DigitsAlignmentNet`: prompt alignment, the CLIP-score analogue: image features are the one-hot class the
  classifier reads, text features the one-hot digit the prompt names, so the "CLIP score" (mean cosine of the
  pairs) is exactly the share of images classified as the prompt's digit.
- `real_floor`: the FD of real train images against the same holdout reference, at the generated sets' size
  (the FD's small-sample bias depends on the set sizes): what a generator that reproduced real digits scores.

The classifier (an MLP 64 -> 128 -> 64 -> 10, +-1 pixel shifts as augmentation) is trained once per image
table version and settings, and kept in the store (eval/classifiers/); its holdout accuracy is reported and
checked against `digits.classifier.min_accuracy`.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from instaflow_core.config import stable_hash
from instaflow_core.errors import DataError
from instaflow_core.evaluation.eval_set import IMAGE_TABLE_REFERENCE, EvalSet
from instaflow_core.experiments.digits.config import DIGITS_NET, DigitsClassifierConfig
from instaflow_core.experiments.digits.images import DIGIT_WORDS, NOT_FID, unique_images
from instaflow_core.refs import TableRef


class DigitClassifier(nn.Module):
    """64 -> 128 -> 64 -> 10 MLP on (B, 1, 8, 8) in [-1, 1]; `features` are the 64 penultimate activations."""

    def __init__(self, hidden: int = 128, features: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(hidden, features),
            nn.ReLU(),
        )
        self.head = nn.Linear(features, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x.clamp(-1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _shift(x: Tensor, g: torch.Generator) -> Tensor:
    """A random +-1 pixel translation of the batch (background -1 padding): cheap augmentation."""
    pad = nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = (int(v) for v in torch.randint(0, 3, (2,), generator=g))
    return pad[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


def train_classifier(x: Tensor, y: Tensor, steps: int, seed: int) -> DigitClassifier:
    """AdamW (lr 2e-3, wd 1e-2) at batch 256 for `steps`, half the batches shifted; fixed seed; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = DigitClassifier()
        opt = torch.optim.AdamW(clf.parameters(), 2e-3, weight_decay=1e-2)
        for _ in range(steps):
            rows = torch.randint(x.shape[0], (256,), generator=g)
            xb = _shift(x[rows], g) if torch.rand((), generator=g) < 0.5 else x[rows]
            loss = nn.functional.cross_entropy(clf(xb), y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return clf.eval().requires_grad_(False)


@dataclass
class TrainedClassifier:
    model: DigitClassifier
    accuracy: float  # on the holdout images
    n_train: int


def digits_classifier(store: Any, images: TableRef, steps: int, seed: int) -> TrainedClassifier:
    """The classifier of this image table version and settings: loaded from the store, or trained and kept."""
    from safetensors.torch import load, save

    key = stable_hash({"images": images.key(), "steps": steps, "seed": seed, "arch": "mlp-128-64"})
    uri = store.uri("eval", "classifiers", f"digits-{key}.safetensors")
    meta_uri = store.uri("eval", "classifiers", f"digits-{key}.json")
    clf = DigitClassifier()
    if store.exists(uri) and store.exists(meta_uri):
        clf.load_state_dict(load(store.read_bytes(uri)))
        meta = json.loads(store.read_bytes(meta_uri))
        return TrainedClassifier(
            clf.eval().requires_grad_(False), float(meta["accuracy"]), int(meta["n_train"])
        )
    x_tr, y_tr = unique_images(store, images, "train")
    x_ho, y_ho = unique_images(store, images, "holdout")
    clf = train_classifier(x_tr, y_tr, steps, seed)
    with torch.no_grad():
        acc = float((clf(x_ho).argmax(1) == y_ho).float().mean())
    store.write_bytes(uri, save(clf.state_dict()))
    store.write_bytes(
        meta_uri, json.dumps({"accuracy": acc, "n_train": len(y_tr), "n_holdout": len(y_ho)}).encode()
    )
    return TrainedClassifier(clf, acc, len(y_tr))


def to_digit_pixels(images: np.ndarray) -> Tensor:
    """uint8 (B, H, W, 3) -> grey (B, 1, 8, 8) in [-1, 1] (area-resized when not 8x8)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().mean(dim=-1)[:, None] / 127.5 - 1.0
    if x.shape[-2:] != (8, 8):
        x = nn.functional.interpolate(x, size=(8, 8), mode="area")
    return x


@dataclass
class DigitsFeatureNet:
    """FeatureNet: the classifier's penultimate features (64-d), for the digits feature FD."""

    clf: TrainedClassifier
    name: str = DIGITS_NET
    metric: str = "FD (digits classifier)"
    paper_comparable: bool = False

    @property
    def label(self) -> str:
        return (
            f"digits classifier penultimate features (an MLP the pipeline trained on {self.clf.n_train} real train "
            f"images; holdout accuracy {self.clf.accuracy:.3f}); Frechet distance in them is {NOT_FID}"
        )

    @torch.no_grad()
    def image_features(self, images: np.ndarray) -> np.ndarray:
        return self.clf.model.features(to_digit_pixels(images)).double().numpy()

    @torch.no_grad()
    def classes(self, images: np.ndarray) -> np.ndarray:
        return self.clf.model(to_digit_pixels(images)).argmax(1).numpy()


_WORD = {w: i for i, w in enumerate(DIGIT_WORDS)}
_DIGIT = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|\d)\b")  # a name or a lone numeral ("8x8" is neither)


def prompt_digit(prompt: str) -> int | None:
    """The digit a prompt names ("a handwritten digit seven", "the number 7"), or None (none, or several)."""
    found = {_WORD[t] if t in _WORD else int(t) for t in _DIGIT.findall(prompt.lower())}
    return found.pop() if len(found) == 1 else None


def _one_hot(classes: list[int | None]) -> np.ndarray:
    out = np.zeros((len(classes), 10))
    for i, c in enumerate(classes):
        if c is not None:
            out[i, c] = 1.0
    return out


@dataclass
class DigitsAlignmentNet:
    """The CLIP-score slot for digits: mean cosine of one-hot (classified digit, prompt's digit) = alignment."""

    features: DigitsFeatureNet
    name: str = DIGITS_NET
    metric: str = "prompt alignment"
    paper_comparable: bool = False

    @property
    def label(self) -> str:
        return (
            "prompt alignment: the share of images the digits classifier (holdout accuracy "
            f"{self.features.clf.accuracy:.3f}) reads as the prompt's digit (the CLIP-score analogue, not CLIP)"
        )

    def image_features(self, images: np.ndarray) -> np.ndarray:
        return _one_hot([int(c) for c in self.features.classes(images)])

    def text_features(self, prompts: list[str]) -> np.ndarray:
        return _one_hot([prompt_digit(p) for p in prompts])


def digits_networks(store: Any, images: TableRef, cfg: DigitsClassifierConfig) -> DigitsAlignmentNet:
    """The classifier-backed networks (alignment net; its `.features` is the feature net); DataError when the
    classifier reads fewer than `min_accuracy` of the holdout images right (its metrics would mean little)."""
    clf = digits_classifier(store, images, cfg.steps, cfg.seed)
    if clf.accuracy < cfg.min_accuracy:
        raise DataError(
            f"the digits classifier reads {clf.accuracy:.3f} of the holdout images right, below "
            f"digits.classifier.min_accuracy={cfg.min_accuracy}: raise digits.classifier.steps"
        )
    return DigitsAlignmentNet(DigitsFeatureNet(clf))


def networks(store: Any, eval_set: EvalSet, section: Any) -> tuple[DigitsAlignmentNet, DigitsFeatureNet]:
    """(the CLIP-score slot, the Frechet-distance slot) for an evaluation on an image table's holdout."""
    if eval_set.reference != IMAGE_TABLE_REFERENCE:
        raise DataError(f"{DIGITS_NET} metrics need prompts curated from an image source (format digits)")
    cfg = section.classifier if section is not None else DigitsClassifierConfig()
    align = digits_networks(store, TableRef.model_validate_json(eval_set.images_root or "{}"), cfg)
    return align, align.features


def stats_bytes(images: np.ndarray, net: Any) -> bytes:
    from instaflow_core.evaluation.metrics import feature_stats

    buf = io.BytesIO(feature_stats(net.image_features(images)).to_bytes())
    return buf.getvalue()
