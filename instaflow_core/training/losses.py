"""Batch losses for the training loop: reflow and one-step distillation, the stage's loss kind read per batch."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from instaflow_core.rectified_flow import distill_loss, reflow_loss, sample_t
from instaflow_core.training.student import ConditionCache


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def reflow_batch_loss(
    embed: ConditionCache,
    t_schedule: str = "uniform",
    huber_c: float = 0.001,
    seed: int = 0,
    caption_dropout: float = 0.0,
) -> Callable[[nn.Module, dict], Tensor]:
    """loss_fn(model, batch) for reflow (and teacher pretraining): E ||(X1 - X0) - v(X_t, t | text)|| with t
    from `t_schedule`, a `caption_dropout` share of the captions replaced by "" (so guidance has an
    unconditional model).

    The times (and dropped captions) come from a CPU generator seeded per micro-batch from `seed` and the
    batch's (prompt, noise seed) rows, so a resumed run draws the same t for the same batch as the uninterrupted run would.
    """

    def loss_fn(model: nn.Module, batch: dict) -> Tensor:
        x0, x1 = batch["x0"], batch["x1"]  # (B, C, h, w)
        gen = torch.Generator().manual_seed(_batch_seed(seed, batch))
        t = sample_t(x0.shape[0], t_schedule, generator=gen, device=x0.device)  # (B,)
        cond = embed(drop_captions(batch["prompt"], caption_dropout, gen), x0.device)  # B rows
        return reflow_loss(model, x0, x1, cond, t, kind=_loss_kind(batch), huber_c=huber_c)

    return loss_fn


def distill_batch_loss(
    embed: ConditionCache,
    huber_c: float = 0.001,
    decode: Callable[[Tensor], Tensor] | None = None,
    lpips: Callable[[Tensor, Tensor], Tensor] | None = None,
    caption_dropout: float = 0.0,
) -> Callable[[nn.Module, dict], Tensor]:
    """loss_fn(model, batch) for one-step distillation: X0 + v(X0, 0) against the 2-RF output X1."""

    def loss_fn(model: nn.Module, batch: dict) -> Tensor:
        x0, x1 = batch["x0"], batch["x1"]
        prompts = batch["prompt"]
        if caption_dropout > 0:
            prompts = drop_captions(
                prompts, caption_dropout, torch.Generator().manual_seed(_batch_seed(0, batch))
            )
        cond = embed(prompts, x0.device)
        kind = _loss_kind(batch)
        return distill_loss(model, x0, x1, cond, kind=kind, huber_c=huber_c, decode=decode, lpips=lpips)

    return loss_fn


def drop_captions(prompts: list[str], p: float, gen: torch.Generator) -> list[str]:
    """Each caption replaced by "" with probability p (drawn from `gen`; nothing drawn when p = 0)."""
    if p <= 0:
        return prompts
    drop = (torch.rand(len(prompts), generator=gen) < p).tolist()
    return ["" if d else text for text, d in zip(prompts, drop, strict=True)]


def _loss_kind(batch: dict) -> str:
    """The loop puts the current TrainStageConfig in `batch["stage"]`; its `.loss` picks the distance."""
    stage = batch.get("stage")
    return stage.loss if stage is not None else "l2"


def _batch_seed(seed: int, batch: dict) -> int:
    # The rows' own identity, (prompt, noise seed), not their triplet ids: those hash the teacher's name, which for
    # a trained teacher holds the store's location, so the same rebuild elsewhere would draw other times.
    if "seed" in batch:
        key = "|".join(f"{p}\x1f{s}" for p, s in zip(batch["prompt"], batch["seed"], strict=True))
    elif batch.get("triplet_id") is not None:
        key = "|".join(map(str, batch["triplet_id"]))
    else:
        key = str(batch["x0"].flatten()[:4].tolist())
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") & ((1 << 63) - 1)
