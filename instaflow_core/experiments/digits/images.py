"""The digits image source (`curation.sources: [{path: sklearn.datasets.load_digits, format: digits}]`):
scikit-learn's bundled handwritten digits (1,797 real 8x8 images, grey levels 0..16, ten classes, shipped inside
the package: no download), registered in `curation.images.IMAGE_SOURCES`.

    load_digits -> images (N, 1, 8, 8) in [-1, 1] (v / 8 - 1) -> a fixed stratified split (`split_seed`)
    -> each image x `captions_per_image` templates ("a handwritten digit seven", "the number 7, written by hand")

The default table's 14,376 captions become 80 distinct prompts after curation.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import Tensor

from instaflow_core.config import ImageSetConfig
from instaflow_core.curation.images import ImageSet, read_images, stratified_split, templates_of
from instaflow_core.errors import DataError
from instaflow_core.evaluation.eval_set import IMAGE_TABLE_REFERENCE, EvalItem, EvalSet, derived_seed
from instaflow_core.evaluation.metrics import feature_stats, fid_from_stats
from instaflow_core.refs import TableRef

SOURCE = "sklearn.datasets.load_digits"
NOT_FID = "a digits metric, not FID: not comparable with any paper's number"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten digit {word}",
    "the number {digit}, written by hand",
    "a picture of the digit {word}",
    "{word}",
    "a scan of a handwritten {digit}",
    "an 8x8 image of the number {word}",
    "digit {digit}",
    "a small grey {word} drawn by someone",
)


def check_source(source: Any) -> None:
    if source.path not in (SOURCE, "digits"):
        raise DataError(f"format digits reads {SOURCE}: set the source's path to it (got {source.path!r})")


def load_image_set(source: Any, images_cfg: ImageSetConfig) -> ImageSet:
    """The digits with the fixed split. Grey levels 0..16 -> [-1, 1] (v / 8 - 1)."""
    check_source(source)
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (np.asarray(d.images, np.float32)[:, None] / 8.0 - 1.0).astype(np.float32)  # (N, 1, 8, 8)
    labels = np.asarray(d.target, np.int64)
    ids = [f"digits-{i:04d}" for i in range(len(labels))]
    return ImageSet(
        images, labels, ids, stratified_split(labels, images_cfg.holdout_fraction, images_cfg.split_seed)
    )


def caption(label: int, template: str) -> str:
    """A template filled for one class: {word} the class name, {digit} the numeral."""
    try:
        return template.format(word=DIGIT_WORDS[label], digit=label)
    except (KeyError, IndexError, ValueError) as err:
        raise DataError(f"curation.images.templates: {template!r} is not a valid template ({err})") from err


def caption_pairs(image_set: ImageSet, images_cfg: ImageSetConfig) -> list[tuple[int, str]]:
    """(image index, raw caption) for every row of the table, in table order."""
    templates = list(images_cfg.templates) or list(TEMPLATES)
    return [
        (i, caption(int(label), tpl))
        for i, (image_id, label) in enumerate(zip(image_set.image_ids, image_set.labels, strict=True))
        for tpl in templates_of(image_id, templates, images_cfg.captions_per_image)
    ]


def source_identity(source: Any) -> list[dict[str, Any]]:
    """The cache-key identity of the source: the dataset and the scikit-learn version that ships it."""
    check_source(source)
    import sklearn

    return [{"path": SOURCE, "size": 1797, "stamp": f"scikit-learn {sklearn.__version__}"}]


def eval_set(store: Any, images: TableRef, num_samples: int, seed: int) -> EvalSet:
    """`num_samples` prompts balanced over the classes, each a holdout caption of its class (cycling through
    them), each with a fixed noise seed; the reference is every held-out real image of the table."""
    _, captions, labels = read_images(store, images, "holdout")
    by_class: dict[int, list[str]] = {}
    for c, k in zip(captions, labels.tolist(), strict=True):
        by_class.setdefault(int(k), [])
        if c not in by_class[int(k)]:
            by_class[int(k)].append(c)
    classes = sorted(by_class)
    items = []
    for i in range(num_samples):
        k = classes[i % len(classes)]
        text = by_class[k][(i // len(classes)) % len(by_class[k])]
        items.append(EvalItem(prompt=text, seed=derived_seed("noise", seed, i), key=f"{k}#{i}"))
    return EvalSet(
        name="digits-holdout",
        items=items,
        reference=IMAGE_TABLE_REFERENCE,
        source=images.key(),
        images_root=images.model_dump_json(),
        note=(
            f"{num_samples} prompts balanced over {len(classes)} digits (holdout captions); the reference is the "
            f"held-out real images of {images.key()}: real images, but {NOT_FID}"
        ),
    )


def unique_images(store: Any, images: TableRef, split: str) -> tuple[Tensor, Tensor]:
    """One row per image of the split (the table repeats each image once per caption)."""
    x, _, labels = read_images(store, images, split)
    flat = x.reshape(len(x), -1)
    _, first = np.unique(np.column_stack([flat, labels[:, None]]), axis=0, return_index=True)
    keep = np.sort(first)
    return torch.from_numpy(x[keep]), torch.from_numpy(labels[keep])


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """(N, 1, H, W) in [-1, 1] -> uint8 (N, H, W, 3), as the pipeline's decoder output is converted."""
    img = ((np.clip(x, -1, 1) / 2 + 0.5) * 255).round().astype(np.uint8)[:, 0]
    return np.repeat(img[..., None], 3, axis=-1)


def reference_images(store: Any, eval_set: EvalSet, split: str = "holdout") -> np.ndarray:
    """The table's real images of a split, one per image, as uint8 (N, H, W, 3)."""
    images = TableRef(**json.loads(eval_set.images_root or "{}"))
    x, _ = unique_images(store, images, split)
    return _to_uint8(x.numpy())


def real_floor(store: Any, eval_set: EvalSet, net: Any, reference: Any, n: int) -> float:
    """FD of `n` real train images (balanced over classes, seeded) against the reference statistics."""
    images = TableRef(**json.loads(eval_set.images_root or "{}"))
    x, y = unique_images(store, images, "train")
    g = torch.Generator().manual_seed(0)
    classes = sorted(set(y.tolist()))
    rows = []
    for j, k in enumerate(classes):
        idx = torch.nonzero(y == k).flatten()
        want = n // len(classes) + (1 if j < n % len(classes) else 0)
        rows.append(
            idx[torch.randint(len(idx), (want,), generator=g)]
            if want > len(idx)
            else idx[torch.randperm(len(idx), generator=g)[:want]]
        )
    feats = net.image_features(_to_uint8(x[torch.cat(rows)].numpy()))
    return fid_from_stats(feature_stats(feats), reference)
