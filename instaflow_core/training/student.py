"""The student of a training stage: built from its base model, fed text embeddings from the frozen encoder."""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from torch import Tensor, nn

from instaflow_core.errors import DataError
from instaflow_core.models.components import SDComponents
from instaflow_core.models.loading import load_components
from instaflow_core.models.velocity import encode_prompts

STAGE_META = "instaflow.json"  # next to model_index.json: what made this folder (the teacher has one too)
SCRATCH = "scratch"  # TrainConfig.init_from: the base model's architecture, fresh weights


def load_student(
    base_folder: str | Path, init_from: str | Path | None = None, *, dtype: str = "float32"
) -> SDComponents:
    """The base model's components, the UNet replaced by `init_from` when given (a local path)."""
    comps = load_components(Path(base_folder), dtype=dtype)
    if init_from is not None:
        load_unet_weights(comps.unet, Path(init_from))
    return comps


def fresh_weights(unet: nn.Module, seed: int) -> nn.Module:
    """A new module of `unet`'s class and config with random weights from `seed` (diffusers models only)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return type(unet).from_config(unet.config).to(device=unet.device, dtype=unet.dtype)


def _strip_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoints of `StudentVelocity` / `UNetVelocity` prefix UNet keys with `unet.`: drop it."""
    if state and all(k.startswith("unet.") for k in state):
        return {k[len("unet.") :]: v for k, v in state.items()}
    return {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")} or state


def load_unet_weights(unet: UNet2DConditionModel, source: Path) -> None:
    """Copy weights into `unet` from a diffusers folder, a UNet folder, a .safetensors file or a checkpoint."""
    if not source.exists():
        raise DataError(f"init_from {source}: not found")
    if source.is_dir() and (source / "unet").is_dir():
        source = source / "unet"
    if source.is_dir() and (source / "ema.safetensors").is_file():  # a training checkpoint: its EMA weights
        source = source / "ema.safetensors"
    if source.is_dir():
        files = sorted(source.glob("*.safetensors"))
        if not files:
            raise DataError(f"init_from {source}: no .safetensors weights in the folder")
        state: dict[str, Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
    elif source.suffix == ".safetensors":
        state = load_file(str(source))
    else:
        raise DataError(
            f"init_from {source}: expected a diffusers folder, a UNet folder or a .safetensors file"
        )
    state = _strip_prefix(state)
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise DataError(
            f"init_from {source}: weights do not fit the base UNet ({str(err).splitlines()[0]})"
        ) from err


class PromptEmbeddings:
    """Prompts -> (B, 77, D) from the frozen text encoder, with an LRU cache per prompt.

    A triplet table repeats each prompt `images_per_prompt` times and an epoch revisits all of them, so the
    cache saves most encoder calls; `max_entries` bounds it (77 x 768 floats = 236 KB per prompt for SD 1.5,
    so 1024 entries hold ~240 MB on the training device).
    """

    def __init__(self, text_encoder: nn.Module, tokenizer: Any, max_entries: int = 1024) -> None:
        self.text_encoder, self.tokenizer, self.max_entries = text_encoder, tokenizer, max_entries
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self.hits = self.misses = 0

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], device: torch.device | None = None) -> Tensor:
        device = device or self.text_encoder.device
        if self.text_encoder.device != device:
            self.text_encoder.to(device)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        if missing:
            emb = encode_prompts(self.text_encoder, self.tokenizer, missing)  # (M, 77, D)
            for p, e in zip(missing, emb, strict=True):
                self._cache[p] = e
        out = []
        for p in prompts:
            self._cache.move_to_end(p)
            out.append(self._cache[p])
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return torch.stack(out).to(device)  # (B, 77, D)


def save_stage_folder(
    base_folder: str | Path,
    unet: UNet2DConditionModel,
    out: str | Path,
    meta: dict[str, Any] | None = None,
    *,
    variants: bool = False,
    sample_size: int | None = None,
) -> Path:
    """Write `out` = what a one-step pipeline needs: the base's VAE, text encoder, tokenizer and scheduler,
    `unet` as the new UNet (safetensors), a model_index.json without safety checker / feature extractor, and a
    meta file; see `models.folder_layout.copy_components` for what is (not) copied.

    `variants` also writes fp16 copies of the three networks (`*.fp16.safetensors`, `models.save_variants`).
    `sample_size`: the latent side the UNet was trained at, recorded in unet/config.json when it differs from
    the base's (a 256 px pilot of SD 1.5 then samples at 256 px by default). The folder loads with
    `InstaFlowPipeline.from_pretrained` and diffusers' own `DiffusionPipeline.from_pretrained`.
    """
    from instaflow_core.models.folder_layout import copy_components, write_fp16_variant

    base, out = Path(base_folder), Path(out)
    if out.exists():
        shutil.rmtree(out)
    copy_components(base, out, ("vae", "text_encoder", "tokenizer", "scheduler"), variants=variants)
    if sample_size is not None and unet.config.sample_size != sample_size:
        unet.register_to_config(sample_size=int(sample_size))
    unet.save_pretrained(out / "unet", safe_serialization=True)
    if variants:
        write_fp16_variant(out / "unet")
    if meta:
        (out / STAGE_META).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
    return out
