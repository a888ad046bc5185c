"""Running a model under evaluation: the teacher's own sampler or a rectified flow's Euler path, from fixed seeds."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from instaflow_core.errors import DataError
from instaflow_core.evaluation.metrics import (
    GRID_IMAGES,
    FeatureStats,
    Latency,
    clip_score,
    feature_stats,
    fid_from_stats,
    measure_latency,
)
from instaflow_core.inference.generate import flow_images, teacher_images
from instaflow_core.inference.images import image_grid
from instaflow_core.models.family import Model


@dataclass(frozen=True)
class SamplerSpec:
    """One evaluated row: which model, which solver, how many steps, which guidance."""

    name: str  # e.g. teacher@25, 2rf@1, 2rf@25, instaflow@1
    model_kind: str  # teacher | 2rf | instaflow
    solver: str  # dpmsolver++ (teacher) | euler (rectified flows)
    steps: int
    guidance: float


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Sampler:
    """Prompts + seeds -> uint8 images (B, H, W, 3) for one SamplerSpec: text encode + sampler + VAE decode.

    The teacher runs its own sampler (its family's scheduler, guidance as the family takes it); rectified flows
    run `inference.generate.flow_images` (the Euler path a user of `instaflow sample` or the registered model
    gets), from X0 = noise_from_seeds(seeds) in both cases.
    """

    def __init__(self, model: Model, spec: SamplerSpec, resolution: int | None = None) -> None:
        self.model = model.to(_device())
        self.spec = spec
        self.resolution = resolution  # px; None = the model's native size
        self.shape = model.latent_shape(resolution)  # (C, h, w); ConfigError when it does not fit

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        spec = self.spec
        if spec.solver != "euler":
            schedulers = (
                self.model.family.schedulers
            )  # the teacher's own sampler; its family's first by default
            solver = spec.solver if spec.solver in schedulers or not schedulers else schedulers[0]
            return teacher_images(
                self.model, list(prompts), list(seeds), spec.steps, spec.guidance, solver,
                resolution=self.resolution,
            )  # fmt: skip
        return flow_images(
            self.model, list(prompts), list(seeds), spec.steps, spec.guidance, resolution=self.resolution,
            batch_size=max(1, len(prompts)),
        )  # fmt: skip


def generate_images(
    model: Model, spec: SamplerSpec, prompts: Sequence[str], seeds: Sequence[int], batch_size: int = 16
) -> np.ndarray:
    """uint8 images (B, H, W, 3) for the prompts, `batch_size` at a time."""
    if len(prompts) != len(seeds):
        raise DataError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    sampler = Sampler(model, spec)
    out = [
        sampler(prompts[i : i + batch_size], seeds[i : i + batch_size])
        for i in range(0, len(prompts), batch_size)
    ]
    if not out:
        raise DataError("no prompts to generate images for")
    return np.concatenate(out)


def image_latency(model: Model, spec: SamplerSpec, prompt: str, seed: int, repeats: int) -> Latency:
    """Seconds per image at batch 1: text encode + denoiser passes (CFG included) + VAE decode, warm, median."""
    sampler = Sampler(model, spec)
    return measure_latency(lambda: sampler([prompt], [seed]), repeats=repeats)


@torch.no_grad()
def flow_straightness(
    model: Model,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance: float = 1.0,
    resolution: int | None = None,
) -> float:
    """rectified_flow.straightness of a velocity model along its own Euler path (0 = straight).

    Meaningful for rectified-flow models only (the denoiser predicts velocity); an SD teacher predicts noise.
    """
    from instaflow_core.rectified_flow import noise_from_seeds, straightness

    dev = _device()
    model.to(dev)
    x0 = noise_from_seeds(list(seeds), model.latent_shape(resolution)).to(dev)
    cond, weight = model.family.with_guidance(model.encode(list(prompts)), guidance)
    uncond = model.negative([""]) if weight > 1.0 else None
    return straightness(model.velocity(), x0, cond, steps, guidance=weight, uncond=uncond)


@dataclass
class SamplerResult:
    """The metrics of one sampler setting on the evaluation set, and a grid of its first samples."""

    fid: float
    clip_score: float
    latency_s: float | None  # None: not measured (latency_repeats=0)
    straightness: float | None
    samples: int
    grid: np.ndarray = field(repr=False)

    def metrics(self) -> dict[str, Any]:
        return {
            "fid": self.fid,
            "clip_score": self.clip_score,
            "latency_s": self.latency_s,
            "straightness": self.straightness,
            "samples": self.samples,
        }


def batched_features(batches: Iterable[np.ndarray], net: Any, image_size: int) -> FeatureStats:
    """Feature statistics of uint8 image batches, resized to `image_size` with the COCO protocol first."""
    from instaflow_core.evaluation.eval_set import resize_batch

    feats = [net.image_features(resize_batch(images, image_size)) for images in batches]
    if not feats:
        raise DataError("no images to compute feature statistics of")
    return feature_stats(np.concatenate(feats))


def evaluate_sampler(
    model: Model,
    spec: SamplerSpec,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    fid_net: Any,
    clip_net: Any,
    reference: FeatureStats,
    image_size: int,
    batch_size: int,
    latency_repeats: int,
    straightness_steps: int,
    text_emb: np.ndarray | None = None,
    on_progress: Callable[[float], None] | None = None,
    resolution: int | None = None,
) -> SamplerResult:
    """Generate the evaluation set batch by batch (only features and the grid's images are kept), then FID
    against `reference`, CLIP score against the prompts, latency at batch 1, straightness for flows.
    `latency_repeats=0` / `straightness_steps=0` leave those out (None): the curves during training
    (evaluation/curves.py) measure neither every time."""
    from instaflow_core.evaluation.eval_set import resize_batch

    if len(prompts) != len(seeds) or len(prompts) < 2:
        raise DataError(f"evaluation needs >= 2 prompts with one seed each ({len(prompts)} / {len(seeds)})")
    sampler = Sampler(model, spec, resolution)
    if text_emb is None:
        text_emb = clip_net.text_features(list(prompts))  # (N, D)
    fid_feats, img_emb, grid = [], [], []
    n = len(prompts)
    for i in range(0, n, batch_size):
        images = sampler(prompts[i : i + batch_size], seeds[i : i + batch_size])  # uint8 (b, H, W, 3)
        fid_feats.append(fid_net.image_features(resize_batch(images, image_size)))
        img_emb.append(clip_net.image_features(images))
        kept = sum(len(g) for g in grid)
        if kept < GRID_IMAGES:
            grid.append(images[: GRID_IMAGES - kept])
        if on_progress is not None:
            on_progress(min(1.0, (i + batch_size) / n))
    stats = feature_stats(np.concatenate(fid_feats))
    latency = None
    if latency_repeats > 0:
        latency = measure_latency(lambda: sampler([prompts[0]], [seeds[0]]), repeats=latency_repeats)
    straight = None
    if spec.solver == "euler" and straightness_steps > 0:
        k = min(n, batch_size)
        straight = flow_straightness(
            model, prompts[:k], seeds[:k], straightness_steps, spec.guidance, resolution
        )
    return SamplerResult(
        fid=fid_from_stats(stats, reference),
        clip_score=clip_score(np.concatenate(img_emb), text_emb),
        latency_s=latency.median_s if latency is not None else None,
        straightness=straight,
        samples=stats.n,
        grid=image_grid(np.concatenate(grid), 4),
    )
