"""Exponential moving average of a model's weights (the copy the paper evaluates, decay 0.9999).

`EMA` is a full copy (one process, DDP); `ShardedEMA` keeps the average sharded like an FSDP2 model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from instaflow_core.models.switches import drop_compiled


class EMA:
    """Keeps `model` = decay * model + (1 - decay) * live weights after every optimizer step.

    The copy is made from the raw module before accelerate wraps it (so it carries no DDP wrapper and no
    autocast patch), lives on the training device in the live weights' dtype, and never needs gradients.
    Buffers (e.g. norm statistics) are copied, not averaged. `update` is one multi-tensor `_foreach_lerp_` (a
    few kernels for all of the UNet's tensors, not two per tensor). A UNet compiled in place is copied eager.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        # a deep copy keeps the original's compiled callable, which would run the LIVE weights: drop it
        self.model = drop_compiled(copy.deepcopy(model)).eval().requires_grad_(False)

    def to(self, device: torch.device | str) -> EMA:
        self.model.to(device)
        return self

    @torch.no_grad()
    def copy_from(self, live: nn.Module) -> EMA:
        """Reset the average to the live weights."""
        for e, p in zip(self.model.state_dict().values(), live.state_dict().values(), strict=True):
            e.copy_(p)
        return self

    @torch.no_grad()
    def update(self, live: nn.Module) -> None:
        ema_p = [p for p in self.model.parameters() if p.is_floating_point()]
        live_p = [p.detach() for p in live.parameters() if p.is_floating_point()]
        if len(ema_p) != len(live_p):
            raise RuntimeError("EMA copy and live model have different parameter lists")
        # lerp(ema, live, 1 - decay) == decay * ema + (1 - decay) * live, one fused kernel per device
        torch._foreach_lerp_(
            ema_p, [p.to(e.dtype) for p, e in zip(live_p, ema_p, strict=True)], 1.0 - self.decay
        )
        for b_ema, b_live in zip(self.model.buffers(), live.buffers(), strict=True):
            b_ema.copy_(b_live)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters live on the meta device (no memory) and whose buffers are real copies:
    the unsharded module's shape, kept beside an FSDP model (which is sharded in place) to rebuild from."""
    memo: dict[int, Any] = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    return drop_compiled(copy.deepcopy(model, memo))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's slice of a sharded (DTensor) parameter, as a plain tensor sharing its memory."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class ShardedEMA:
    """The EMA of an FSDP2-sharded model, sharded the same way: every process averages only its own slice of
    each parameter (FSDP2 gives every parameter one dim-0 slice per process), so the full average is exactly
    the one an unsharded EMA would hold, at 1/world of its memory and with no communication per step.

    The sharded copy is built from `skeleton` (a `meta_copy` of the model taken before it was sharded): it
    gets the live model's mesh as one FSDP unit (no forward ever runs it) and is filled from the live slices.
    `state_dict`, `load_state_dict` and `export` are collectives: every process must call them.
    """

    def __init__(self, skeleton: nn.Module, live: nn.Module, decay: float) -> None:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        self.decay = float(decay)
        self.skeleton = skeleton
        first = next(p for p in live.parameters() if isinstance(p, DTensor))
        model = copy.deepcopy(skeleton).requires_grad_(False)  # meta parameters: nothing allocated yet
        fully_shard(model, mesh=first.device_mesh)
        self.model = model.to_empty(device=_local(first).device).eval()  # this process's slices only
        self.copy_from(live)

    @torch.no_grad()
    def copy_from(self, live: nn.Module) -> ShardedEMA:
        """Reset the average to the live weights (slice by slice)."""
        for (name, e), (_, p) in zip(self.model.named_parameters(), live.named_parameters(), strict=True):
            if e.shape != p.shape or _local(e).shape != _local(p).shape:
                raise RuntimeError(f"EMA and live model are sharded differently at {name}")
            _local(e).copy_(_local(p))
        for b_ema, b_live in zip(self.model.buffers(), live.buffers(), strict=True):
            b_ema.copy_(b_live)
        return self

    @torch.no_grad()
    def update(self, live: nn.Module) -> None:
        ema_p = [_local(p) for p in self.model.parameters() if p.is_floating_point()]
        live_p = [_local(p.detach()) for p in live.parameters() if p.is_floating_point()]
        if len(ema_p) != len(live_p):
            raise RuntimeError("EMA copy and live model have different parameter lists")
        torch._foreach_lerp_(
            ema_p, [p.to(e.dtype) for p, e in zip(live_p, ema_p, strict=True)], 1.0 - self.decay
        )
        for b_ema, b_live in zip(self.model.buffers(), live.buffers(), strict=True):
            b_ema.copy_(b_live)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full (unsharded) EMA weights on the main process's CPU; {} on the others."""
        from instaflow_core.training.checkpoint import gather_model_state

        return gather_model_state(self.model)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load full weights given on the main process ({} elsewhere): each process keeps its slices."""
        from instaflow_core.training.checkpoint import scatter_model_state

        scatter_model_state(self.model, state)

    def export(self) -> nn.Module | None:
        """The averaged weights as a plain, unsharded module on the main process's CPU (None elsewhere)."""
        state = self.state_dict()
        if not state:
            return None
        plain = copy.deepcopy(self.skeleton)
        plain.load_state_dict(state, assign=True)  # meta parameters replaced by the gathered tensors
        return plain.to("cpu").eval().requires_grad_(False)
