"""How training is set up and distributed (accelerate, optimizer, schedule, speed switches on the UNet).

Kept apart from the loop (torchtitan style): the loop only sees a prepared model and optimizer and
an Accelerator to call backward / reduce / no_sync on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from instaflow_core.config import TrainConfig, TrainStageConfig
from instaflow_core.errors import ConfigError
from instaflow_core.models.switches import perf_flags, set_switches, set_tf32, switch_on

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


def switch_target(model: nn.Module) -> nn.Module:
    """The module that owns the switches: the denoiser of a family `Velocity` (`model.net`), else `model`."""
    net = getattr(model, "net", None)
    return net if isinstance(net, nn.Module) else model


def apply_perf_switches(model: nn.Module, cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """TF32, channels_last, gradient checkpointing, SDPA and torch.compile, set on the UNet itself.

    "auto" switches are on for CUDA and off elsewhere; true / false apply on any device (so a CPU run can
    check them). Everything happens in place (compile too, `nn.Module.compile()`), so the module handed to
    accelerate, the EMA copy and the checkpoints keep their plain names. Returns and logs the flags read back
    from the UNet; a switch asked for that the module does not have is logged as not applied.
    """
    target = switch_target(model)
    tf32 = switch_on(cfg.tf32, device) and device.type == "cuda"  # the flags mean nothing elsewhere
    if tf32:
        set_tf32(True)
    want = {
        "channels_last": switch_on(cfg.channels_last, device),
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "sdpa": cfg.sdpa,
        "compile": switch_on(cfg.compile, device),
    }
    got = set_switches(
        target,
        channels_last=want["channels_last"],
        gradient_checkpointing=want["gradient_checkpointing"],
        sdpa=None if cfg.sdpa else False,  # diffusers' default is SDPA already: leave custom processors alone
        compile=want["compile"] or None,  # never un-compile what the caller compiled
    )
    got = {**perf_flags(target), **got}
    # asked for, but the module has no such switch (a toy MLP has no attention, no checkpointing flag)
    missing = [k for k, v in want.items() if got[k] is None and (v if k != "sdpa" else not v)]
    applied = {k: v for k, v in got.items() if v is not None} | {"tf32": tf32}
    (log.warning if missing else log.info)(
        "switches on %s (%s): %s%s",
        type(target).__name__,
        device.type,
        ", ".join(f"{k}={v}" for k, v in applied.items()),
        f"; asked for but not applicable to this module: {', '.join(missing)}" if missing else "",
    )
    return applied


# ------------------------------------------------------------------------------------------ optimizer
ADAMW_IMPLS = ("fused", "foreach", "for-loop")


def make_adamw(
    params: list[nn.Parameter], *, impl: str = "auto", device: torch.device | None = None, **kwargs: Any
) -> torch.optim.AdamW:
    """torch AdamW with its implementation chosen explicitly (kept in `optimizer.defaults["impl"]`).

    "fused": one kernel per parameter group (CUDA; CPU from torch 2.4); "foreach": multi-tensor kernels;
    "for-loop": one kernel chain per tensor; "auto": fused when training on CUDA (`device`, else where the
    parameters are), torch's own default elsewhere (unchanged behaviour on CPU).
    """
    if impl == "auto":
        on_cuda = device.type == "cuda" if device is not None else bool(params) and params[0].is_cuda
        impl = "fused" if on_cuda else "default"
    flags = {
        "fused": {"fused": True},
        "foreach": {"foreach": True},
        "for-loop": {"foreach": False},
        "default": {},
    }
    if impl not in flags:
        raise ConfigError(f"adamw={impl!r}: choose auto or one of {list(ADAMW_IMPLS)}")
    opt = torch.optim.AdamW(params, **kwargs, **flags[impl])
    opt.defaults["impl"] = impl
    return opt


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device | None = None
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (`cfg.adamw`: fused on CUDA); 8-bit AdamW when cfg.use_8bit_adam.

    `device` is where training runs (the parameters may still be on the CPU: accelerate moves them later).

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
    return make_adamw(params, impl=cfg.adamw, device=device, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, spans: list[StageSpan]):
    """LambdaLR whose step counter is the global optimizer step (stage lr x linear warmup)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, spans, cfg.warmup_steps))
