"""How training is set up and distributed (accelerate, optimizer, schedule, performance switches).

Kept apart from the loop (torchtitan style): the loop only sees a prepared model and optimizer and
an Accelerator to call backward / reduce / no_sync on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from instaflow_core.config import TrainConfig, TrainStageConfig
from instaflow_core.errors import ConfigError

log = logging.getLogger("instaflow.training")


# ------------------------------------------------------------------------------------------ stage plan
@dataclass(frozen=True)
class StageSpan:
    """One stage placed on the global step axis: optimizer steps [start, end) of the whole schedule."""

    index: int
    stage: TrainStageConfig
    start: int
    end: int
    micro_batch_size: int  # rows per forward on one process
    accumulation: int  # micro-batches per optimizer step on one process
    lr: float


def plan_stages(cfg: TrainConfig, world_size: int) -> list[StageSpan]:
    """Place every stage on the global step axis and work out its micro-batching.

    accumulation = batch_size / (micro_batch_size * world_size); micro_batch_size None = batch_size / world.
    """
    spans, start = [], 0
    for i, st in enumerate(cfg.stages):
        micro = st.micro_batch_size or st.batch_size // world_size
        if micro < 1 or st.batch_size % (micro * world_size):
            raise ConfigError(
                f"stages.{i}: batch_size {st.batch_size} is not a multiple of micro_batch_size "
                f"{st.micro_batch_size or micro} x {world_size} processes"
            )
        spans.append(
            StageSpan(
                index=i,
                stage=st,
                start=start,
                end=start + st.steps,
                micro_batch_size=micro,
                accumulation=st.batch_size // (micro * world_size),
                lr=st.lr if st.lr is not None else cfg.lr,
            )
        )
        start += st.steps
    return spans


def lr_at(step: int, spans: list[StageSpan], warmup_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based): the stage's lr, linear warmup over global steps."""
    span = next((s for s in spans if s.start <= step < s.end), spans[-1])
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return span.lr * warm


# ------------------------------------------------------------------------------------------ accelerate
def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """An Accelerator for this config: mixed precision from cfg, whatever processes the launcher set up.

    A multi-process launch (`accelerate launch --multi_gpu`, torchrun: WORLD_SIZE > 1) on a machine without
    CUDA becomes CPU data parallelism over gloo; accelerate would otherwise fall back to one process each.
    (`accelerate launch --cpu --num_processes N` needs mpirun instead.)
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != cfg.mixed_precision:
        # accelerate keeps one process-wide state and refuses a second precision; stages of one pipeline
        # run in one process (reflow bf16, distill fp16 ...), so drop the precision part and keep the
        # process group (PartialState) as it is
        AcceleratorState._reset_state(reset_partial_state=False)
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=distributed and not torch.cuda.is_available())
    log.info(
        "accelerate: %d process(es), device %s, mixed precision %s, distributed %s",
        acc.num_processes,
        acc.device,
        acc.mixed_precision,
        acc.distributed_type,
    )
    return acc


def apply_perf_switches(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """TF32, channels_last, gradient checkpointing, SDPA and torch.compile: applied on CUDA only.

    Returns the module to hand to accelerate (the compiled wrapper when compile is on). On other devices
    every switch is a logged no-op: they trade memory/precision for speed that only exists on a GPU.
    """
    wanted = [
        n for n in ("tf32", "channels_last", "gradient_checkpointing", "compile") if getattr(cfg, n)
    ] + ([] if cfg.sdpa else ["sdpa=false"])
    if device.type != "cuda":
        if wanted:
            log.info("device %s: ignoring CUDA-only switches %s", device.type, ", ".join(wanted))
        return model
    if cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.gradient_checkpointing:
        enable = getattr(model, "enable_gradient_checkpointing", None)
        if enable is None:
            log.warning(
                "gradient_checkpointing: %s has no enable_gradient_checkpointing()", type(model).__name__
            )
        else:
            enable()
    if not cfg.sdpa:
        # diffusers uses scaled_dot_product_attention by default; the switch turns it off for debugging
        set_proc = getattr(model, "set_attn_processor", None)
        if set_proc is not None:
            from diffusers.models.attention_processor import AttnProcessor

            set_proc(AttnProcessor())
    if wanted:
        log.info("CUDA switches on: %s", ", ".join(wanted))
    if cfg.compile:
        return torch.compile(model)
    return model


# ------------------------------------------------------------------------------------------ optimizer
def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; bitsandbytes' 8-bit AdamW when cfg.use_8bit_adam.

    The param groups start at lr 1.0: the LambdaLR from build_scheduler multiplies it into the real lr.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    kwargs = dict(lr=1.0, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ConfigError(
                "use_8bit_adam needs bitsandbytes (pip install bitsandbytes, CUDA only); or set use_8bit_adam=false"
            ) from err
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, spans: list[StageSpan]):
    """LambdaLR whose step counter is the global optimizer step (stage lr x linear warmup)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, spans, cfg.warmup_steps))
