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
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
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


# ------------------------------------------------------------------------------------- one evaluated setting
GRID_IMAGES = 16  # samples per setting in its grid
