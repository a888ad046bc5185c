"""Image sources: an (image, caption) table in the store, for teacher pretraining and real-image evaluation.

An image source is a `curation.sources` entry whose format names an image dataset instead of a caption file.
Each lives in its experiment's package and registers here (`IMAGE_SOURCES`: format -> module path, imported on
first use); today `format: digits`, scikit-learn's bundled handwritten digits (experiments/digits/images.py).
The module provides

    load_image_set(source, images_cfg) -> ImageSet     images (N, C, H, W) in [-1, 1], labels, ids, a fixed split
    caption_pairs(image_set, images_cfg)               (image index, raw caption) per table row, in order
    source_identity(source)                            the cache-key identity of the dataset
    eval_set(store, images, num_samples, seed)         the evaluation set of prompts curated from it

and this module turns it into the table:

    images -> a fixed stratified train/holdout split (`curation.images.split_seed`) -> each image x its
    captions -> one row per (image, caption), keyed by pair_id = hash(image id, caption)

The same captions, in table order, are what the curation stage reads from the source (`source_captions`):
they go through the usual Curator (normalise, filter, dedupe, split) into the `prompts` table. Each image row
carries the `prompt_id` of its normalised caption; pretraining trains on the train rows whose prompt the
curation kept (`read_images`). The prompts table's metadata names the image table version it was curated with
(`images_of`): lineage as data, and how the pretrain and evaluation stages find the images of a prompts version.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa

from instaflow_core.config import ImageSetConfig
from instaflow_core.curation.prompts import normalize, prompt_id
from instaflow_core.errors import DataError
from instaflow_core.refs import TableRef

# format -> the module of an image source (experiments register theirs here)
IMAGE_SOURCES = {"digits": "instaflow_core.experiments.digits.images"}
IMAGES_META_KEY = "images"  # in the prompts table's metadata: the image table ref (JSON) it was curated with


@dataclass
class ImageSet:
    """Images (N, C, H, W) float32 in [-1, 1], their class labels (N,), ids and split ("train" / "holdout")."""

    images: np.ndarray
    labels: np.ndarray
    image_ids: list[str]
    split: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.images.shape[1:])


def is_image_source(source: Any) -> bool:
    return getattr(source, "format", None) in IMAGE_SOURCES


def source_module(fmt: str) -> ModuleType:
    """The module of the image source `fmt`."""
    if fmt not in IMAGE_SOURCES:
        raise DataError(f"image format {fmt!r} is not supported (known: {', '.join(sorted(IMAGE_SOURCES))})")
    return importlib.import_module(IMAGE_SOURCES[fmt])


def stratified_split(labels: np.ndarray, holdout_fraction: float, seed: int) -> np.ndarray:
    """'train' / 'holdout' per row: scikit-learn's stratified split (the same rows for the same seed)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    _, holdout = train_test_split(idx, test_size=holdout_fraction, stratify=labels, random_state=seed)
    split = np.full(len(labels), "train", dtype=object)
    split[holdout] = "holdout"
    return split


def templates_of(image_id: str, templates: list[str], per_image: int | None) -> list[str]:
    """The templates one image is captioned with: all of them, or `per_image` chosen by its id."""
    if per_image is None or per_image >= len(templates):
        return list(templates)
    start = int.from_bytes(hashlib.sha256(f"captions:{image_id}".encode()).digest()[:4], "big") % len(
        templates
    )
    return [templates[(start + j) % len(templates)] for j in range(per_image)]


def source_captions(source: Any, images_cfg: ImageSetConfig) -> list[str]:
    """What curation reads from an image source: every row's raw caption, in table order."""
    mod = source_module(source.format)
    image_set = mod.load_image_set(source, images_cfg)
    return [c for _, c in mod.caption_pairs(image_set, images_cfg)]


def source_identity(source: Any) -> list[dict[str, Any]]:
    """The cache-key identity of an image source."""
    return source_module(source.format).source_identity(source)


# ------------------------------------------------------------------------------------------------ the table
def images_schema(shape: tuple[int, ...]) -> pa.Schema:
    from instaflow_core.store import tensor_field

    return pa.schema(
        [
            pa.field("pair_id", pa.string(), nullable=False),
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("label", pa.int32()),
            pa.field("caption", pa.string()),  # normalised (prompts.normalize), as in the prompts table
            pa.field("prompt_id", pa.string()),
            pa.field("split", pa.string()),
            tensor_field("image", shape, pa.float16(), nullable=False),  # pixels in [-1, 1], (C, H, W)
            pa.field("source", pa.string()),
        ]
    )


def image_rows(image_set: ImageSet, pairs: list[tuple[int, str]], source: str) -> pa.Table:
    """The table's rows: one per (image, caption) pair; 8x8 grey levels v/8 - 1 are exact in float16."""
    from instaflow_core.store import to_tensor_column

    idx = np.array([i for i, _ in pairs], dtype=np.int64)
    texts = [normalize(c) for _, c in pairs]
    ids = [image_set.image_ids[i] for i in idx]
    cols = {
        "pair_id": pa.array(
            [hashlib.sha256(f"{a}|{b}".encode()).hexdigest()[:16] for a, b in zip(ids, texts, strict=True)]
        ),
        "image_id": pa.array(ids, pa.string()),
        "label": pa.array(image_set.labels[idx].astype(np.int32)),
        "caption": pa.array(texts, pa.string()),
        "prompt_id": pa.array([prompt_id(t) for t in texts], pa.string()),
        "split": pa.array([str(s) for s in image_set.split[idx]], pa.string()),
        "image": to_tensor_column(image_set.images[idx].astype(np.float16), pa.float16()),
        "source": pa.array([source] * len(idx), pa.string()),
    }
    schema = images_schema(image_set.shape)
    return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)


def write_image_table(
    store: Any, source: Any, images_cfg: ImageSetConfig, metadata: dict[str, Any]
) -> TableRef:
    """Build the source's rows and sync the table to them in one merge (new rows in, changed rows updated,
    rows this configuration no longer makes deleted); returns the reference to the version written."""
    from instaflow_core.store import create_table, open_table, set_metadata, table_ref

    mod = source_module(source.format)
    image_set = mod.load_image_set(source, images_cfg)
    rows = image_rows(image_set, mod.caption_pairs(image_set, images_cfg), mod.SOURCE)
    table = create_table(store, images_cfg.table, rows.schema)
    with store.guard(f"commit table {images_cfg.table!r}"):
        (
            table.merge_insert("pair_id")
            .when_matched_update_all(
                where="target.split != source.split OR target.prompt_id != source.prompt_id"
            )
            .when_not_matched_insert_all()
            .when_not_matched_by_source_delete()
            .execute(rows)
        )
    splits = {s: int(n) for s, n in zip(*np.unique(image_set.split, return_counts=True), strict=True)}
    set_metadata(
        open_table(store, images_cfg.table),
        {
            **metadata,
            "source": mod.SOURCE,
            "format": source.format,
            "images": len(image_set.labels),
            "image_splits": splits,
        },  # fmt: skip
    )
    return table_ref(store, images_cfg.table, config_hash=metadata.get("config_hash", ""))


def image_source_of(store: Any, images: TableRef) -> ModuleType:
    """The source module that made an image table (its metadata's `format`; tables from before it was recorded
    are digits tables)."""
    from instaflow_core.store import get_metadata, open_ref

    return source_module(get_metadata(open_ref(store, images)).get("format") or "digits")


def images_of(store: Any, prompts: TableRef) -> TableRef | None:
    """The image table version a prompts table version was curated with (None: captions-only curation)."""
    from instaflow_core.store import get_metadata, open_ref

    raw = get_metadata(open_ref(store, prompts)).get(IMAGES_META_KEY)
    return TableRef(**json.loads(raw)) if raw else None


def read_images(
    store: Any, images: TableRef, split: str, prompt_ids: list[str] | None = None
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(images (N, C, H, W) float32, captions, labels) of one split, optionally only rows of these prompts."""
    from instaflow_core.store import from_tensor_column, open_ref, tensor_shape

    table = open_ref(store, images)
    flt = f"split = '{split}'"
    if prompt_ids is not None:
        flt += " AND prompt_id IN (" + ",".join(f"'{p}'" for p in sorted(set(prompt_ids))) + ")"
    with store.guard(f"read {images.key()}"):
        data = table.to_lance().to_table(columns=["image", "caption", "label"], filter=flt)
    if data.num_rows == 0:
        raise DataError(
            f"{images.key()} has no {split} images{' with curated captions' if prompt_ids else ''}"
        )
    shape = tensor_shape(table.schema.field("image"))
    x = from_tensor_column(data.column("image"), shape).astype(np.float32)
    return x, data.column("caption").to_pylist(), data.column("label").to_numpy().astype(np.int64)
