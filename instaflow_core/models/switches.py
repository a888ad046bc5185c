"""GPU speed switches set on a module itself (the UNet, the VAE), and read back from it.

Every stage that runs a UNet (generation's teacher, training's student, the one-step pipeline) sets its switches
through `set_switches`, on the module that owns them, never on a wrapper: diffusers keeps attention processors,
`is_gradient_checkpointing` and the weights' memory format on the UNet, and `nn.Module.compile()` compiles in
place, so `unet.dtype`, `unet.config`, state dicts and every caller holding the module keep working.
`perf_flags` reads the state back, so logs say what is on, not what was asked for.

Config values are `true` / `false` / `"auto"` (`config.Switch`); `switch_on(value, device)` turns "auto" into
"on when the device is CUDA".
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def switch_on(value: bool | str | None, device: torch.device | str) -> bool:
    """A config switch for a stage on `device`: "auto" = on CUDA only; true / false as given."""
    if value == "auto":
        return torch.device(device).type == "cuda"
    return bool(value)


def _attn_classes() -> tuple[type, type]:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return AttnProcessor2_0, AttnProcessor


def _spatial_weight(model: nn.Module) -> Tensor | None:
    """The first 4-D parameter with a kernel larger than 1x1 (a 1x1 weight is channels_last either way)."""
    for p in model.parameters():
        if p.dim() == 4 and p.shape[-1] * p.shape[-2] > 1:
            return p
    return None


def perf_flags(model: nn.Module) -> dict[str, Any]:
    """The switches as `model` holds them; None: the module has no such switch.

    sdpa: every attention processor is diffusers' AttnProcessor2_0 (torch's scaled_dot_product_attention);
    channels_last: the convolution weights' memory format; gradient_checkpointing: diffusers' flag;
    compile: `nn.Module.compile()` was called (the compiled callable lives on the module).
    """
    procs = getattr(model, "attn_processors", None)
    sdpa = None
    if procs:
        sdpa_cls, _ = _attn_classes()
        sdpa = all(isinstance(p, sdpa_cls) for p in procs.values())
    w = _spatial_weight(model)
    return {
        "sdpa": sdpa,
        "channels_last": None if w is None else bool(w.is_contiguous(memory_format=torch.channels_last)),
        "gradient_checkpointing": getattr(model, "is_gradient_checkpointing", None),
        "compile": getattr(model, "_compiled_call_impl", None) is not None,
    }


def set_switches(
    model: nn.Module,
    *,
    sdpa: bool | None = None,
    channels_last: bool | None = None,
    gradient_checkpointing: bool | None = None,
    compile: bool | None = None,
    compile_mode: str | None = None,
    compile_backend: str = "inductor",
) -> dict[str, Any]:
    """Turn switches on (True) or off (False) on `model` in place; None leaves a switch as it is.

    sdpa: AttnProcessor2_0 vs the classic AttnProcessor (bmm + softmax + bmm). channels_last: NHWC weights
    (activations follow). gradient_checkpointing: recompute each block in backward. compile:
    `model.compile(mode=compile_mode, dynamic=False)` in place (applied last: the other switches change what is
    traced); False drops the compiled callable. compile_mode "reduce-overhead" adds CUDA graphs (static shapes
    only), "max-autotune" also tunes the GEMMs. A switch is set only when the module is not already in that
    state (so calling this before every batch costs nothing).

    Returns the flags read back for every switch asked for: None where the module has no such switch (a
    module without attention processors asked for sdpa, say), so the caller can say so.
    """
    now = perf_flags(model)
    if sdpa is not None and now["sdpa"] is not None and now["sdpa"] != sdpa:
        sdpa_cls, classic_cls = _attn_classes()
        model.set_attn_processor(sdpa_cls() if sdpa else classic_cls())
    if (
        channels_last is not None
        and now["channels_last"] is not None
        and now["channels_last"] != channels_last
    ):
        model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if gradient_checkpointing is not None and now["gradient_checkpointing"] is not None:
        if gradient_checkpointing and not now["gradient_checkpointing"]:
            model.enable_gradient_checkpointing()
        elif not gradient_checkpointing and now["gradient_checkpointing"]:
            model.disable_gradient_checkpointing()
    if compile is not None and compile != now["compile"]:
        if compile:
            model.compile(mode=compile_mode, backend=compile_backend, dynamic=False)
        else:
            model._compiled_call_impl = None  # back to the eager forward
    got = perf_flags(model)
    asked = {
        "sdpa": sdpa,
        "channels_last": channels_last,
        "gradient_checkpointing": gradient_checkpointing,
        "compile": compile,
    }
    return {k: got[k] for k, v in asked.items() if v is not None}


def drop_compiled(model: nn.Module) -> nn.Module:
    """Forget in-place compilation on `model` and its submodules (a deep copy would call the original's graph)."""
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    return model


def set_tf32(on: bool) -> None:
    """torch's process-wide TF32 flags for float32 matmuls and cuDNN convolutions (Ampere and newer)."""
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
