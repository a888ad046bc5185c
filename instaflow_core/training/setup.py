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
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
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

    FSDP: `cfg.fsdp.enabled` (a plugin built here, see `fsdp_plugin`) or the launcher's own FSDP settings
    (`launcher_args: ["--use_fsdp", ...]` or an accelerate config file: ACCELERATE_USE_FSDP / FSDP_* in the
    environment); the section wins when both are set. Without CUDA, accelerate only knows CPU data parallelism,
    so the FSDP mode is switched on here over the same gloo process group (how it is tested on CPU).
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    on_cpu = distributed and not torch.cuda.is_available()
    plugin = fsdp_plugin(cfg)
    want_fsdp = distributed and (plugin is not None or _env_flag("ACCELERATE_USE_FSDP"))
    if want_fsdp and plugin is None and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError(FSDP1_REFUSED)
    if plugin is not None and not distributed:
        log.warning("fsdp.enabled, but this is one process (WORLD_SIZE 1): training unsharded")
    if plugin is not None and cfg.fsdp.cpu_offload:
        # offloaded shards are gathered and broadcast on the CPU: accelerate then adds gloo beside nccl
        os.environ.setdefault("FSDP_OFFLOAD_PARAMS", "true")
    state = AcceleratorState._shared_state
    if state and (
        state.get("_mixed_precision") != cfg.mixed_precision
        or (state.get("distributed_type") == DistributedType.FSDP) != want_fsdp
    ):
        # accelerate keeps one process-wide state and refuses a second precision; stages of one pipeline
        # run in one process (reflow bf16, distill fp16 ...), so drop the precision part and keep the
        # process group (PartialState) as it is
        AcceleratorState._reset_state(reset_partial_state=False)
        if PartialState._shared_state.get("distributed_type") == DistributedType.FSDP:  # an earlier stage's
            PartialState._shared_state["distributed_type"] = (
                DistributedType.MULTI_GPU if torch.cuda.is_available() else DistributedType.MULTI_CPU
            )
    if on_cpu:
        acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=True)
        if want_fsdp:
            _fsdp_over_gloo(acc, plugin or FullyShardedDataParallelPlugin())
    else:
        acc = Accelerator(mixed_precision=cfg.mixed_precision, fsdp_plugin=plugin if distributed else None)
    log.info(
        "accelerate: %d process(es), device %s, mixed precision %s, distributed %s%s",
        acc.num_processes,
        acc.device,
        acc.mixed_precision,
        acc.distributed_type,
        " (FSDP2)" if acc.distributed_type == DistributedType.FSDP else "",
    )
    return acc


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _fsdp_over_gloo(acc: Accelerator, plugin: FullyShardedDataParallelPlugin) -> None:
    """Switch a CPU data-parallel Accelerator to FSDP, as AcceleratorState does for GPUs (accelerate 1.x sets
    the FSDP mode only for accelerator devices; FSDP2 itself runs on CPU tensors over gloo)."""
    if acc.mixed_precision != "no":  # only where the plugin names no policy, as accelerate does
        plugin.set_mixed_precision(acc.mixed_precision)
    acc.state.fsdp_plugin = plugin
    acc.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # what AcceleratorState does too


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PRECISION_DTYPE = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def fsdp_plugin(cfg: TrainConfig) -> FullyShardedDataParallelPlugin | None:
    """accelerate's FSDP2 plugin for `cfg.fsdp` (None when disabled). Block classes left empty are filled in
    from the model at prepare time (`resolve_fsdp_wrap`)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    f = cfg.fsdp
    if not f.enabled:
        return None
    param_dtype = _PRECISION_DTYPE[cfg.mixed_precision] if f.param_dtype == "auto" else _DTYPES[f.param_dtype]
    if param_dtype == torch.float32:
        param_dtype = None  # the master weights' dtype: no cast
    reduce_dtype = torch.float32 if f.reduce_dtype == "float32" and param_dtype is not None else None
    policy = {"blocks": "transformer_based_wrap", "size": "size_based_wrap", "none": "no_wrap"}[f.wrap]
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy=policy,
        transformer_cls_names_to_wrap=list(f.block_classes) if f.wrap == "blocks" else None,
        min_num_params=f.min_num_params if f.wrap == "size" else None,
        reshard_after_forward=f.reshard_after_forward,
        cpu_offload=f.cpu_offload,
        # always a policy object, so accelerate does not replace it with its own (bf16 reduce) from the precision
        mixed_precision_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
        activation_checkpointing=False,  # cfg.gradient_checkpointing switches the model's own
        state_dict_type="FULL_STATE_DICT",  # informational: the checkpoints go through training/checkpoint.py
    )


FSDP1_REFUSED = (
    "FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config (--fsdp_version 2), "
    "or use the section's fsdp.enabled"
)


def is_fsdp(acc: Accelerator) -> bool:
    """Whether `acc` shards the model (FSDP2); FSDP1 (accelerate's default `fsdp_version`) is refused."""
    if acc.distributed_type != DistributedType.FSDP:
        return False
    if acc.state.fsdp_plugin.fsdp_version != 2:
        raise ConfigError(FSDP1_REFUSED)
    return True


def resolve_fsdp_wrap(acc: Accelerator, model: nn.Module) -> list[str]:
    """Fill in the block classes FSDP wraps one by one when none were named: the `_no_split_modules` of the
    model or of the first submodule that declares them (the UNet inside StudentVelocity). Returns them."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = acc.state.fsdp_plugin
    fn = plugin.auto_wrap_policy
    if getattr(fn, "func", fn) is not transformer_auto_wrap_policy:
        return []
    names = list(plugin.transformer_cls_names_to_wrap or [])
    if not names:
        for m in model.modules():
            if getattr(m, "_no_split_modules", None):
                names = list(m._no_split_modules)
                break
    present = {type(m).__name__ for m in model.modules()}
    missing = [n for n in names if n not in present]
    if missing:
        raise ConfigError(
            f"fsdp.block_classes: {missing} not found in {type(model).__name__}; "
            f"its module classes include {sorted(present)[:12]}"
        )
    if not names:
        log.warning("FSDP: %s names no blocks: the whole model is one unit", type(model).__name__)
    plugin.transformer_cls_names_to_wrap = names
    return names


@torch.no_grad()
def broadcast_module(model: nn.Module, device: torch.device) -> None:
    """Give every rank rank 0's parameters and buffers (what DDP does in prepare), before FSDP shards them."""
    for t in [*model.parameters(), *model.buffers()]:
        here = t.device == device
        moved = t.detach() if here else t.detach().to(device)
        dist.broadcast(moved, src=0)
        if not here:
            t.copy_(moved)


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
