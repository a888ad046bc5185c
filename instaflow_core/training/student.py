"""The student of a training stage: built from its base model, fed conditions from the frozen text encoders.

- `load_student(base_folder, init_from)`: the base model (the 2-RF's teacher, or the 2-RF for distillation) of
  whatever family, with its denoiser optionally replaced by `init_from` (a diffusers folder, a denoiser folder,
  a .safetensors state dict, or a training checkpoint folder whose EMA weights are taken).
- the trainable module is `Model.velocity()`: the denoiser under its own name and the family's velocity mapping,
  no text encoder inside, so DDP, the EMA copy and the checkpoints carry the denoiser alone (for SD 1.5 the text
  encoder would add 123M frozen parameters to every checkpoint and EMA update; for FLUX, T5 alone is 4.7B).
- `ConditionCache`: conditions from the frozen encoders, computed per batch and kept per prompt (an empty caption
  gets the family's unconditional condition, the one classifier-free guidance samples with).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from instaflow_core.errors import DataError
from instaflow_core.models.family import Condition, Model, family_of
from instaflow_core.models.loading import load_source

SCRATCH = "scratch"
TEXT_PARTS = (
    "text_encoder",
    "tokenizer",
)  # component name prefixes of what computes the conditions  # TrainConfig.init_from: the base model's architecture, fresh weights


def load_student(
    base_folder: str | Path,
    init_from: str | Path | None = None,
    *,
    dtype: str = "float32",
    skip_text: bool = False,
) -> Model:
    """The base model, its denoiser replaced by `init_from` when given (a local path); `skip_text` leaves the
    text encoders and tokenizers out (training on stored conditions)."""
    folder = Path(base_folder)
    if skip_text:
        family = family_of(folder)
        parts = (*family.required, *family.optional)
        model = family.load(folder, dtype=dtype, skip=tuple(c for c in parts if c.startswith(TEXT_PARTS)))
    else:
        model = load_source(folder, dtype=dtype)
    if init_from is not None:
        load_denoiser_weights(model.denoiser, Path(init_from), model.family.denoiser)
    return model


def _strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Checkpoints of a `Velocity` prefix the denoiser's keys with its name (`unet.`, `transformer.`): drop it."""
    p = prefix + "."
    if state and all(k.startswith(p) for k in state):
        return {k[len(p) :]: v for k, v in state.items()}
    return {k[len(p) :]: v for k, v in state.items() if k.startswith(p)} or state


def load_denoiser_weights(net: nn.Module, source: Path, name: str = "unet") -> None:
    """Copy weights into the denoiser `net` (component `name`) from a diffusers folder, a denoiser folder, a
    .safetensors file or a training checkpoint (its EMA weights)."""
    if not source.exists():
        raise DataError(f"init_from {source}: not found")
    if source.is_dir() and (source / name).is_dir():
        source = source / name
    if source.is_dir() and (source / "ema.safetensors").is_file():  # a training checkpoint: its EMA weights
        source = source / "ema.safetensors"
    if source.is_dir():
        files = sorted(f for f in source.glob("*.safetensors") if len(f.name.split(".")) == 2)
        if not files:
            raise DataError(f"init_from {source}: no .safetensors weights in the folder")
        state: dict[str, Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
    elif source.suffix == ".safetensors":
        state = load_file(str(source))
    else:
        raise DataError(
            f"init_from {source}: expected a diffusers folder, a {name} folder or a .safetensors file"
        )
    state = _strip_prefix(state, name)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise DataError(
            f"init_from {source}: weights do not fit the base {name} ({str(err).splitlines()[0]})"
        ) from err


class ConditionCache:
    """Prompts -> their Condition from the frozen text encoders, with an LRU cache per prompt.

    A triplet table repeats each prompt `images_per_prompt` times and an epoch revisits all of them, so the
    cache saves most encoder calls; `max_entries` bounds it (77 x 768 floats = 236 KB per prompt for SD 1.5,
    so 1024 entries hold ~240 MB on the training device).
    """

    def __init__(self, model: Model, max_entries: int = 1024) -> None:
        self.model, self.max_entries = model, max_entries
        self._cache: OrderedDict[str, Condition] = OrderedDict()
        self.hits = self.misses = 0

    def encoders_to(self, device: torch.device) -> None:
        for name, module in self.model.modules().items():
            if name.startswith("text_encoder") and next(module.parameters()).device != device:
                module.to(device)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], device: torch.device | None = None) -> Condition:
        if device is not None:
            self.encoders_to(device)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        texts = [p for p in missing if p]
        if texts:
            cond = self.model.encode(texts)  # M rows
            for i, p in enumerate(texts):
                self._cache[p] = cond.rows(slice(i, i + 1))
        if "" in missing:
            # an empty (dropped) caption trains the unconditional input that guidance samples with: the family's
            # negative condition of "" (SD: the encoded ""; SDXL: zeros, force_zeros_for_empty_prompt)
            self._cache[""] = self.model.negative([""])
        out = []
        for p in prompts:
            self._cache.move_to_end(p)
            out.append(self._cache[p])
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        cond = Condition.cat(out)  # B rows
        return cond.to(device) if device is not None else cond
