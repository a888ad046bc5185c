"""The one-step generator's speed switches: SDPA, channels_last and torch.compile with CUDA graphs.

    model = load_model_folder(folder, dtype="float16")  # inference.generate; or an InstaFlowPipeline
    speed_up(model)  # on CUDA: channels_last + compile(mode="reduce-overhead") of the denoiser and VAE decoder

A one-step image at batch 1 is launch-bound, not FLOP-bound: ~1,340 small kernels (UNet ~890, text encoder
~310, VAE decoder ~140) for ~3.3 TFLOP, so eager PyTorch spends more time launching than computing.
`mode="reduce-overhead"` records each compiled network as a CUDA graph (one launch per replay); it needs
static shapes, which a server at a fixed batch and resolution has (each new shape compiles and records once
more: the first call per shape takes a minute or two). Everything is set on the modules in place
(models/switches.py), so the pipeline object, its config and `save_pretrained` are unchanged.
"""

from __future__ import annotations

from typing import Any

from instaflow_core.models.switches import perf_flags, set_switches, switch_on


def speed_up(
    pipe: Any,
    *,
    compile: bool | str = "auto",
    channels_last: bool | str = "auto",
    sdpa: bool = True,
    mode: str | None = "reduce-overhead",
    backend: str = "inductor",
) -> dict[str, dict[str, Any]]:
    """Set the switches on the denoiser and the VAE of `pipe` (a loaded Model, or a pipeline with .unet / .vae)
    ("auto": on when it runs on CUDA).

    compile covers the UNet and the VAE decoder (the two networks of a one-step image that cost); `mode` is
    torch.compile's (None = default, "reduce-overhead" = CUDA graphs, "max-autotune" = also tune GEMMs).
    compile=False drops an earlier compilation. Returns the flags read back per module.
    """
    net = pipe.denoiser if hasattr(pipe, "denoiser") else pipe.unet
    device = next(net.parameters()).device
    cl, comp = switch_on(channels_last, device), switch_on(compile, device)
    kw: dict[str, Any] = dict(compile_mode=mode, compile_backend=backend)
    set_switches(net, sdpa=sdpa, channels_last=cl, compile=comp, **kw)
    set_switches(pipe.vae, sdpa=sdpa, channels_last=cl)
    set_switches(pipe.vae.decoder, compile=comp, **kw)
    return {
        "unet": perf_flags(net),
        "vae": perf_flags(pipe.vae) | {"compile": perf_flags(pipe.vae.decoder)["compile"]},
    }
