"""Evaluation metrics: Frechet distance (FID), CLIP score, latency, straightness, and the promotion gate.

The math (first half) is pure numpy in float64. The second half runs a model under evaluation: the teacher's
N-step DPM-Solver path with classifier-free guidance, or a rectified flow's Euler path (2-RF at 1 and N steps,
InstaFlow at one step), each from the same fixed seeds, then decodes to uint8 images.

Conventions:
- FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) on feature statistics (numbers like the paper's only
  with the standard Inception network, see feature_nets).
- CLIP score = mean cosine similarity of CLIP image and text embeddings (in [-1, 1], NOT x100 and not clipped
  at 0): the paper's 0.304 for InstaFlow-0.9B is on this scale.
- Latency per image = text encoding + the sampler's UNet passes + VAE decode at batch 1, after a warm-up call,
  median of repeats.
"""

from __future__ import annotations

import io
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import linalg

from instaflow_core.errors import DataError


# ---------------------------------------------------------------------------------------- statistics
@dataclass
class FeatureStats:
    """Mean (D,) and covariance (D, D) of a feature set, float64, with the sample count."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mu=self.mu, sigma=self.sigma, n=np.array(self.n))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> FeatureStats:
        with np.load(io.BytesIO(data)) as z:
            return cls(mu=z["mu"].astype(np.float64), sigma=z["sigma"].astype(np.float64), n=int(z["n"]))


def feature_stats(features: np.ndarray) -> FeatureStats:
    """(N, D) features -> FeatureStats (unbiased covariance, as pytorch-fid / torch-fidelity)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise DataError(f"feature statistics need at least 2 feature vectors (N, D); got shape {f.shape}")
    return FeatureStats(mu=f.mean(axis=0), sigma=np.cov(f, rowvar=False), n=f.shape[0])


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """scipy's matrix square root (older SciPy returns (root, error) under disp=False; 1.16+ just the root)."""
    out = linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2)) with scipy's sqrtm; when the product
    is near singular (fewer samples than dimensions), eps is added to the diagonals as in pytorch-fid. Tiny
    imaginary parts from numerical error are dropped; large ones raise.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise DataError(
            f"Frechet distance: mismatched statistics {mu1.shape}/{s1.shape} vs {mu2.shape}/{s2.shape}"
        )
    diff = mu1 - mu2
    covmean = _sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise DataError(f"Frechet distance: imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, D) and (N, D) -> (N,), float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise DataError(f"CLIP score: {a.shape[0]} image embeddings vs {b.shape[0]} text embeddings")
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum((a / np.maximum(na, 1e-12)) * (b / np.maximum(nb, 1e-12)), axis=1)


def clip_score(image_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """Mean cosine similarity between paired image and text embeddings (not x100, not clipped)."""
    return float(cosine_rows(image_emb, text_emb).mean())


# ------------------------------------------------------------------------------------------ latency
@dataclass
class Latency:
    median_s: float
    min_s: float
    max_s: float
    repeats: int


def measure_latency(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> Latency:
    """Wall time of `fn()` (warm: `warmup` untimed calls first), median over `repeats`.

    CUDA work is synchronised before each clock read so asynchronous kernels are counted.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return Latency(statistics.median(times), min(times), max(times), len(times))


# --------------------------------------------------------------------------------------------- gate
@dataclass
class GateDecision:
    passed: bool
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return ("PASSED: " if self.passed else "BLOCKED: ") + "; ".join(self.reasons)


def check_gate(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    max_fid_increase: float,
    max_clip_decrease: float,
) -> GateDecision:
    """Promote only if FID <= champion FID + max_fid_increase and CLIP >= champion CLIP - max_clip_decrease.

    No champion yet: passes. A metric the champion lacks is not compared; one the candidate lacks blocks (a
    model without measured quality must not replace one with it).
    """
    if champion is None:
        return GateDecision(True, ["no champion yet"])
    reasons, ok = [], True
    for key, limit, worse_if_higher in (
        ("fid", max_fid_increase, True),
        ("clip_score", max_clip_decrease, False),
    ):
        champ, cand = champion.get(key), candidate.get(key)
        if champ is None or not math.isfinite(champ):
            reasons.append(f"{key}: champion has none, not compared")
            continue
        if cand is None or not math.isfinite(cand):
            ok = False
            reasons.append(f"{key}: candidate has none (champion {champ:.4f})")
            continue
        delta = cand - champ if worse_if_higher else champ - cand  # > 0 means the candidate is worse
        within = delta <= limit + 1e-12
        ok &= within
        word = "increase" if worse_if_higher else "decrease"
        reasons.append(
            f"{key} {cand:.4f} vs champion {champ:.4f}: {word} {max(delta, 0.0):.4f} "
            f"{'<=' if within else '>'} allowed {limit:g}"
        )
    return GateDecision(ok, reasons)


# ------------------------------------------------------------------------------ running a model under test
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

    The teacher runs its scheduler (teacher.solve_teacher, CFG when guidance > 1); rectified flows run the
    InstaFlowPipeline's Euler loop (the same path a user of the pipeline or the registered model gets), from
    X0 = noise_from_seeds(seeds) in both cases.
    """

    def __init__(self, components: Any, spec: SamplerSpec) -> None:
        self.components = components.to(_device())
        self.spec = spec
        self.pipe = None
        if spec.solver == "euler":
            from instaflow_core.pipeline import InstaFlowPipeline

            self.pipe = InstaFlowPipeline.from_components(components)
            self.pipe.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        from instaflow_core.models import latent_shape
        from instaflow_core.teacher import decode_latents, noise_from_seeds, solve_teacher

        spec = self.spec
        if self.pipe is None:
            x1 = solve_teacher(
                self.components, list(prompts), list(seeds), steps=spec.steps, guidance=spec.guidance,
                scheduler=spec.solver, device=_device(),
            )  # fmt: skip
            return decode_latents(self.components.vae, x1, batch_size=max(1, len(prompts)))
        from instaflow_core.pipeline import to_uint8

        x0 = noise_from_seeds(list(seeds), latent_shape(self.components))  # (B, 4, h, w) from CPU generators
        out = self.pipe(
            list(prompts),
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance,
            latents=x0,
            output_type="np",
        )
        return to_uint8(out.images)


def generate_images(
    components: Any, spec: SamplerSpec, prompts: Sequence[str], seeds: Sequence[int], batch_size: int = 16
) -> np.ndarray:
    """uint8 images (B, H, W, 3) for the prompts, `batch_size` at a time."""
    if len(prompts) != len(seeds):
        raise DataError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    sampler = Sampler(components, spec)
    out = [
        sampler(prompts[i : i + batch_size], seeds[i : i + batch_size])
        for i in range(0, len(prompts), batch_size)
    ]
    if not out:
        raise DataError("no prompts to generate images for")
    return np.concatenate(out)


def image_latency(components: Any, spec: SamplerSpec, prompt: str, seed: int, repeats: int) -> Latency:
    """Seconds per image at batch 1: text encode + UNet passes (CFG included) + VAE decode, warm, median."""
    sampler = Sampler(components, spec)
    return measure_latency(lambda: sampler([prompt], [seed]), repeats=repeats)


@torch.no_grad()
def flow_straightness(
    components: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float = 1.0
) -> float:
    """rectified_flow.straightness of a velocity UNet along its own Euler path (0 = straight).

    Meaningful for rectified-flow models only (the UNet predicts velocity); a diffusion teacher predicts noise.
    """
    from instaflow_core.models import UNetVelocity, latent_shape
    from instaflow_core.rectified_flow import straightness
    from instaflow_core.teacher import noise_from_seeds

    dev = _device()
    components.to(dev)
    velocity = UNetVelocity(components.unet, components.text_encoder, components.tokenizer)
    x0 = noise_from_seeds(list(seeds), latent_shape(components)).to(dev)
    cond = velocity.encode(list(prompts))
    uncond = velocity.encode([""]) if guidance > 1.0 else None
    return straightness(velocity, x0, cond, steps, guidance=guidance, uncond=uncond)


def image_grid(images: np.ndarray, cols: int = 4) -> np.ndarray:
    """(B, H, W, 3) uint8 -> one (rows*H, cols*W, 3) grid, unused cells black."""
    if len(images) == 0:
        raise DataError("no images for a grid")
    b, h, w, c = images.shape
    cols = max(1, min(cols, b))
    rows = math.ceil(b / cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = img
    return grid


# ------------------------------------------------------------------------------------- one evaluated setting
GRID_IMAGES = 16  # samples per setting in its grid


@dataclass
class SamplerResult:
    """The metrics of one sampler setting on the evaluation set, and a grid of its first samples."""

    fid: float
    clip_score: float
    latency_s: float
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
    from instaflow_core.coco import resize_batch

    feats = [net.image_features(resize_batch(images, image_size)) for images in batches]
    if not feats:
        raise DataError("no images to compute feature statistics of")
    return feature_stats(np.concatenate(feats))


def evaluate_sampler(
    components: Any,
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
) -> SamplerResult:
    """Generate the evaluation set batch by batch (only features and the grid's images are kept), then FID
    against `reference`, CLIP score against the prompts, latency at batch 1, straightness for flows."""
    from instaflow_core.coco import resize_batch

    if len(prompts) != len(seeds) or len(prompts) < 2:
        raise DataError(f"evaluation needs >= 2 prompts with one seed each ({len(prompts)} / {len(seeds)})")
    sampler = Sampler(components, spec)
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
    latency = measure_latency(lambda: sampler([prompts[0]], [seeds[0]]), repeats=latency_repeats)
    straight = None
    if spec.solver == "euler":
        k = min(n, batch_size)
        straight = flow_straightness(components, prompts[:k], seeds[:k], straightness_steps, spec.guidance)
    return SamplerResult(
        fid=fid_from_stats(stats, reference),
        clip_score=clip_score(np.concatenate(img_emb), text_emb),
        latency_s=latency.median_s,
        straightness=straight,
        samples=stats.n,
        grid=image_grid(np.concatenate(grid)),
    )


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
