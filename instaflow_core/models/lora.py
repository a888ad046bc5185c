"""Weight deltas and LoRA for the one-step pipeline.

The original InstaFlow demo's "LoRA" is a weight-delta merge: (fine-tuned SD 1.5 UNet - SD 1.5 UNet) * scale is
added to the InstaFlow UNet, which shares SD 1.5's architecture. Kohya-style up/down LoRA files go through
diffusers' `load_lora_weights` (which converts Kohya / A1111 key names) and are fused into the weights so the
Euler loop pays nothing for them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from instaflow_core.errors import DataError

StateLike = Mapping[str, Tensor] | str | Path
WEIGHTS = "diffusion_pytorch_model.safetensors"
SHARD_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def load_state(source: StateLike) -> dict[str, Tensor]:
    """A denoiser state dict from a mapping, a .safetensors file, a denoiser folder or a diffusers pipeline folder
    (its unet/ or transformer/)."""
    if isinstance(source, Mapping):
        return dict(source)
    from safetensors.torch import load_file

    path = Path(source)
    if path.is_dir():
        folders = [path, path / "unet", path / "transformer"]
        found = next((f / WEIGHTS for f in folders if (f / WEIGHTS).is_file()), None)
        if found is None:  # a sharded denoiser (FLUX's transformer): every shard its index names
            index = next((f / SHARD_INDEX for f in folders if (f / SHARD_INDEX).is_file()), None)
            if index is not None:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                return {k: v for shard in shards for k, v in load_file(str(index.parent / shard)).items()}
            raise DataError(f"{path}: no unet/ or transformer/diffusion_pytorch_model.safetensors inside")
        path = found
    if path.suffix != ".safetensors" or not path.is_file():
        raise DataError(f"UNet weights {path}: expected a .safetensors file or a diffusers folder")
    return load_file(str(path))


def weight_delta(finetuned: StateLike, base: StateLike) -> dict[str, Tensor]:
    """finetuned - base, key by key (float32), for the keys both hold with equal shapes."""
    ft, bs = load_state(finetuned), load_state(base)
    return {k: ft[k].float() - bs[k].float() for k in ft if k in bs and ft[k].shape == bs[k].shape}


@torch.no_grad()
def merge_weight_delta(
    pipe: Any, finetuned_unet_state: StateLike, base_unet_state: StateLike, scale: float = 1.0
) -> Any:
    """unet += scale * (finetuned - base), in place; `pipe` is a pipeline (its .unet) or a UNet. Returns `pipe`.

    Every UNet tensor must be present in both states with the UNet's shape: a delta from another architecture
    is refused rather than half applied.
    """
    unet = getattr(pipe, "unet", pipe)
    ft, bs = load_state(finetuned_unet_state), load_state(base_unet_state)
    target = unet.state_dict()  # tensors share storage with the parameters: add_ updates the model
    bad = [
        k
        for k, v in target.items()
        if k not in ft or k not in bs or ft[k].shape != v.shape or bs[k].shape != v.shape
    ]
    if bad:
        raise DataError(
            f"weight delta does not match the UNet: {len(bad)} of {len(target)} tensors missing or of another "
            f"shape (first: {bad[0]})"
        )
    for name, param in target.items():
        delta = ft[name].to(param.device, torch.float32) - bs[name].to(param.device, torch.float32)
        param.copy_((param.float() + scale * delta).to(param.dtype))
    return pipe


def load_lora(
    pipe: Any,
    lora: str | Path | Mapping[str, Tensor],
    scale: float = 1.0,
    *,
    fuse: bool = True,
    adapter_name: str | None = None,
) -> Any:
    """Load a LoRA (diffusers, PEFT or Kohya format: file, folder or state dict) into `pipe`; fuse it at `scale`.

    Fused (the default): the weights change in place and the LoRA layers are removed, so sampling costs the same
    as without it. Unfused: the adapter stays active at `scale` (switch or combine with `pipe.set_adapters`).
    """
    source = dict(lora) if isinstance(lora, Mapping) else str(lora)
    if isinstance(source, str) and not Path(source).exists():
        raise DataError(f"LoRA weights not found: {source}")
    try:
        pipe.load_lora_weights(source, adapter_name=adapter_name)
    except (ValueError, KeyError, OSError) as err:
        raise DataError(
            f"cannot load LoRA {lora if not isinstance(lora, Mapping) else '<dict>'}: {err}"
        ) from err
    if fuse:
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()
    else:
        names = pipe.get_active_adapters()
        pipe.set_adapters(names, [scale] * len(names))
    return pipe
