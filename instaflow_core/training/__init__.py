"""Reflow and distillation training on accelerate.

    from instaflow_core.training import train, TrainResult, BatchRequest

Modules (torchtitan style, one concern each): `loop` (the training loop, `train`), `setup` (accelerate,
optimizer, LR schedule, CUDA switches, the stage plan), `data` (batch sources, sharding, resume position),
`checkpoint` (atomic checkpoints on any fsspec URI, RNG capture), `ema`.
"""

from instaflow_core.training.checkpoint import Checkpointer
from instaflow_core.training.data import BatchRequest, BatchSource
from instaflow_core.training.ema import EMA
from instaflow_core.training.loop import TrainResult, train
from instaflow_core.training.setup import StageSpan, lr_at, make_accelerator, plan_stages

__all__ = [
    "EMA",
    "BatchRequest",
    "BatchSource",
    "Checkpointer",
    "StageSpan",
    "TrainResult",
    "lr_at",
    "make_accelerator",
    "plan_stages",
    "train",
]
