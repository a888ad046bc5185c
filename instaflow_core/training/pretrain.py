"""Teacher pretraining: what the `pretrain` stage adds to the training core (the loop and loss are reflow's).

    a fresh model (the digits experiment's, seeded)  -> `save_initial_folder` -> the stage's base folder
    the prompts table version -> its image table (curation/images.py) -> the train images whose captions the
    curation kept, encoded by the model family's VAE encode (X1 = latent * scaling factor)
    -> `image_batches`: micro-batches (x0 ~ N(0, I) drawn fresh, x1, caption) -> reflow_batch_loss
    -> the 1-Rectified Flow (ModelKind.RF1), saved like the 2-RF and InstaFlow folders

Independent noise is the difference from reflow: a triplet fixes X0 by its seed (the teacher's coupling); here
every micro-batch draws its rows and its X0 from a generator seeded by (seed, stage, micro-batch index, rank),
so each image meets new noise every time and a resumed run draws exactly what the uninterrupted one would.
The train split is read into memory once (1,078 8x8 digits are 0.3 MB; a streaming reader for large image
sets would replace `_load_pairs`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from instaflow_core.config import StorageConfig
from instaflow_core.errors import DataError
from instaflow_core.refs import TableRef
from instaflow_core.store import Store

INITIAL_META = {"kind": "1rf-init", "source": "digits"}


def save_initial_folder(family: str, model_cfg: Any, folder: Path) -> str:
    """Build the fresh model of a family from its config section (`digits.model`, seeded) as a diffusers folder;
    returns its weights hash."""
    from instaflow_core.models.family import get_family

    get_family(family).build(model_cfg).save(folder)
    h = hashlib.sha256()
    for rel in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        h.update((folder / rel).read_bytes())
    weights = h.hexdigest()[:12]
    (folder / "instaflow.json").write_text(json.dumps({**INITIAL_META, "weights": weights}))
    return weights


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") & ((1 << 63) - 1)


def _load_pairs(prompts: TableRef, storage: StorageConfig) -> tuple[np.ndarray, list[str]]:
    """The train images (pixels) and captions of the image table these prompts were curated with, limited to
    captions the curation kept."""
    from instaflow_core.curation.images import images_of, read_images
    from instaflow_core.store import open_ref

    store = Store(storage)
    images = images_of(store, prompts)
    if images is None:
        raise DataError(
            f"{prompts.key()} was not curated from images: teacher pretraining needs an image source "
            "(curation.sources: [{path: sklearn.datasets.load_digits, format: digits}])"
        )
    with store.guard(f"read prompt ids of {prompts.key()}"):
        kept = open_ref(store, prompts).to_lance().to_table(columns=["prompt_id"]).column("prompt_id")
    x, captions, _ = read_images(store, images, "train", kept.to_pylist())
    return x, captions


def check_pretrain_inputs(prompts: TableRef, storage: StorageConfig, need: int) -> int:
    """Rows pretraining will read; DataError when there are fewer than one micro-batch per process (`need`)."""
    x, _ = _load_pairs(prompts, storage)
    if x.shape[0] < need:
        raise DataError(
            f"{prompts.key()}: {x.shape[0]} train images with curated captions, fewer than {need}"
        )
    return int(x.shape[0])


@torch.no_grad()
def encode_images(model: Any, pixels: np.ndarray, batch_size: int = 4096) -> torch.Tensor:
    """Pixels (N, C, H, W) in [-1, 1] -> X1 (N, C, h, w) float32 on the CPU, through the family's VAE encode."""
    out = []
    for chunk in torch.from_numpy(pixels).split(batch_size):
        out.append(model.family.encode_images(model, chunk).cpu())
    return torch.cat(out)


def image_batches(
    prompts: TableRef, storage: StorageConfig, model: Any, latent_shape: tuple[int, ...], seed: int = 0
) -> Callable[[Any], Iterator[dict]]:
    """A batch factory for `training.train`: endless (x0 fresh noise, x1 a train image's latent, its caption)
    micro-batches, rows drawn with replacement, every draw from a generator seeded by the micro-batch index."""
    pixels, captions = _load_pairs(prompts, storage)
    x1_all = encode_images(model, pixels)  # (N, C, h, w)
    if tuple(x1_all.shape[1:]) != tuple(latent_shape):
        raise DataError(
            f"the images encode to latents {tuple(x1_all.shape[1:])}; the model takes {latent_shape}"
        )
    n = x1_all.shape[0]

    def factory(req: Any) -> Iterator[dict]:
        i = req.start
        shape = (req.micro_batch_size, *x1_all.shape[1:])
        while True:
            g = torch.Generator().manual_seed(
                _seed(seed, req.seed, req.stage_index, i, req.rank, req.world_size)
            )
            rows = torch.randint(n, (req.micro_batch_size,), generator=g)
            x0 = torch.randn(shape, generator=g)
            yield {
                "x0": x0,
                "x1": x1_all[rows],
                "prompt": [captions[r] for r in rows.tolist()],
                "triplet_id": [f"{i}:{r}" for r in rows.tolist()],  # per-batch key of the loss's t draw
            }
            i += 1

    return factory
