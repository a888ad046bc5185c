"""Exponential moving average of a model's weights (the copy the paper evaluates, decay 0.9999)."""

from __future__ import annotations

import copy

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
