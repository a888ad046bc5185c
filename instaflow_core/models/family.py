"""Model families: the one seam where a teacher architecture plugs into every stage.

A family is one module under `models/` (or an experiment's package) holding one `ModelFamily` subclass. It owns
everything that differs between SD 1.x, SDXL, SD 3.x, FLUX and the digits pixel model, and nothing else does:

    load        a diffusers folder (or a single checkpoint file) -> `Model` (its named parts)
    encode      prompts -> `Condition` (sequence embeddings, pooled embeddings, masks, extra inputs)
    velocity    v(x_t, t, cond) in the project's convention (t = 0 noise, t = 1 image, v = X1 - X0): the one
                place a family's own timestep, sign and latent packing are applied
    geometry    latent channels, native size, down-sampling (from configs alone, before any weights load)
    latents     VAE encode / decode with the family's scaling and shift factors
    teacher     the teacher's own sampler (its diffusers scheduler), from our noise X0 to our latent X1
    student     save the trained denoiser as a folder of the teacher's own layout, and build a fresh one

Generation, training, evaluation, inference, ONNX export and the demo hold a `Model` and call these; the math
they share (interpolation, Euler, guidance, losses) is `rectified_flow.py`. Families are found by name or from a
folder's model_index.json (`family_of`) through `FAMILIES`, a registry of module paths imported on first use,
so importing this module loads no family and no network class.

Adding a family: write `models/<name>.py` with a `ModelFamily` subclass named `FAMILY` at module level, add
`<name>: <module path>` to `FAMILIES`, and a preset; docs/interfaces.md walks through it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from instaflow_core.errors import ConfigError, DataError
from instaflow_core.models.folder_layout import copy_components, write_fp16_variant
from instaflow_core.models.geometry import Geometry

# family name -> the module holding `FAMILY`; imported on first use (each pulls in its network classes)
FAMILIES: dict[str, str] = {
    "sd": "instaflow_core.models.sd",
    "sdxl": "instaflow_core.models.sdxl",
    "sd3": "instaflow_core.models.sd3",
    "flux": "instaflow_core.models.flux",
    "digits": "instaflow_core.experiments.digits.model",
}
STAGE_META = "instaflow.json"  # next to model_index.json: what made a folder (kind, stage, key, base)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
Guidance = Literal["cfg", "embedded", "none"]


def to_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' (or a torch.dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"models.dtype={dtype!r}: choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


# ------------------------------------------------------------------------------------------ the condition
@dataclass
class Condition:
    """What a family's denoiser is conditioned on, for a batch of B prompts. Every field is a tensor with the
    batch first (or None), so guidance can concatenate [uncond; cond] field by field (`rectified_flow`
    handles dataclasses) and the conditions can be stored per prompt and read back (`tensors` / `from_tensors`).

    embeds  (B, L, D)  the sequence embeddings the denoiser attends to (SD: CLIP's hidden states; SDXL: two
                       CLIPs' penultimate states concatenated; SD3: CLIPs padded + T5 joined; FLUX: T5)
    pooled  (B, P)     pooled text embeddings (SDXL, SD3, FLUX); None for SD 1.x
    mask    (B, L)     1 = a real token (families whose denoiser takes a mask); None otherwise
    extra   name -> (B, ...): family inputs that ride with the prompt (SDXL `time_ids`, FLUX `guidance`, a
                       ControlNet `control` image)
    """

    embeds: Tensor
    pooled: Tensor | None = None
    mask: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def map(self, fn: Callable[[Tensor], Tensor]) -> Condition:
        """The same condition with `fn` applied to every tensor."""
        return Condition(
            embeds=fn(self.embeds),
            pooled=None if self.pooled is None else fn(self.pooled),
            mask=None if self.mask is None else fn(self.mask),
            extra={k: fn(v) for k, v in self.extra.items()},
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Condition:
        """Move every tensor; cast floating ones to `dtype` (masks and ids keep theirs)."""

        def move(x: Tensor) -> Tensor:
            return x.to(device=device, dtype=dtype if dtype is not None and x.is_floating_point() else None)

        return self.map(move)

    def rows(self, index: Tensor | Sequence[int] | slice) -> Condition:
        """The rows `index` of every field."""
        return self.map(lambda x: x[index])

    def expand(self, n: int) -> Condition:
        """A batch-1 condition as n rows (views, no copy)."""
        if len(self) == n:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand a condition of {len(self)} rows to {n}")
        return self.map(lambda x: x.expand(n, *x.shape[1:]))

    def repeat_interleave(self, n: int) -> Condition:
        """Each row n times in a row (n images per prompt)."""
        return self if n == 1 else self.map(lambda x: x.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(conds: Sequence[Condition]) -> Condition:
        """Rows of several conditions (the same fields) stacked."""
        first = conds[0]
        return Condition(
            embeds=torch.cat([c.embeds for c in conds]),
            pooled=None if first.pooled is None else torch.cat([c.pooled for c in conds]),  # type: ignore[misc]
            mask=None if first.mask is None else torch.cat([c.mask for c in conds]),  # type: ignore[misc]
            extra={k: torch.cat([c.extra[k] for c in conds]) for k in first.extra},
        )

    def tensors(self) -> dict[str, Tensor]:
        """Flat name -> tensor (`extra.<name>` for the extras): what a store row of conditions holds."""
        out = {"embeds": self.embeds}
        if self.pooled is not None:
            out["pooled"] = self.pooled
        if self.mask is not None:
            out["mask"] = self.mask
        out.update({f"extra.{k}": v for k, v in self.extra.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> Condition:
        """The inverse of `tensors`."""
        return cls(
            embeds=tensors["embeds"],
            pooled=tensors.get("pooled"),
            mask=tensors.get("mask"),
            extra={k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")},
        )


# -------------------------------------------------------------------------------------------- the model
@dataclass
class Model:
    """A loaded model: its family and its named parts (diffusers / transformers modules, tokenizers, the
    scheduler), as a folder of that family names them. `folder` is where it was loaded from (the base whose
    other components a trained student's folder copies)."""

    family: ModelFamily
    parts: dict[str, Any]
    folder: Path | None = None

    def __getitem__(self, name: str) -> Any:
        return self.parts[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.parts.get(name, default)

    @property
    def denoiser(self) -> nn.Module:
        """The network the pipeline trains (an SD UNet, an SD3 / FLUX transformer, the digits velocity net)."""
        return self.parts[self.family.denoiser]

    @denoiser.setter
    def denoiser(self, net: nn.Module) -> None:
        self.parts[self.family.denoiser] = net

    @property
    def vae(self) -> nn.Module:
        return self.parts["vae"]

    def text_parts(self) -> tuple[str, ...]:
        """The text encoders and tokenizers (what conditions are computed with)."""
        return tuple(k for k in self.parts if k.startswith(("text_encoder", "tokenizer")))

    @property
    def scheduler(self) -> Any:
        return self.parts["scheduler"]

    def modules(self) -> dict[str, nn.Module]:
        return {k: v for k, v in self.parts.items() if isinstance(v, nn.Module)}

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None) -> Model:
        """Move (and optionally cast) every network in place; returns self."""
        kwargs: dict[str, Any] = {}
        if device is not None:
            kwargs["device"] = device
        if dtype is not None:
            kwargs["dtype"] = to_dtype(dtype)
        if kwargs:
            for module in self.modules().values():
                module.to(**kwargs)
        return self

    def geometry(self) -> Geometry:
        """The latent geometry, from the loaded parts' configs."""
        return self.family.geometry(
            {k: config_dict(v) for k, v in self.parts.items() if isinstance(v, nn.Module) or k == "scheduler"}
        )

    def latent_shape(self, resolution: int | None = None, what: str = "resolution") -> tuple[int, int, int]:
        """(C, h, w) of the latents at `resolution` px (None: native); ConfigError when it does not fit."""
        return self.geometry().latent_shape(resolution, what)

    def velocity(self, controlnet: nn.Module | None = None, control_scale: float = 1.0) -> Velocity:
        """The denoiser as `v(x_t, t, cond)` in the project's convention."""
        return Velocity(self.family, self.denoiser, controlnet=controlnet, control_scale=control_scale)

    def encode(self, prompts: Sequence[str] | str) -> Condition:
        """Prompts -> their condition on the text encoders' device, no grad."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with torch.no_grad():
            return self.family.encode(self, prompts)

    def negative(self, prompts: Sequence[str]) -> Condition:
        """The unconditional / negative condition of guidance for these negative prompts."""
        with torch.no_grad():
            return self.family.negative(self, list(prompts))

    def save(self, path: str | Path) -> Path:
        """Write the model as a diffusers folder of its family's pipeline class."""
        return self.family.save(self, Path(path))


class Velocity(nn.Module):
    """`v(x_t, t, cond)` over a family's denoiser: what training, every Euler sampler and the exports call.

    Holds the denoiser under its component name (`unet` / `transformer`), so a state dict, an EMA copy and a
    checkpoint of a Velocity carry the denoiser alone under `<name>.` keys; the text encoders stay outside
    (conditions come precomputed). `controlnet` (SD families only) adds its residuals at the same timestep.
    """

    def __init__(
        self,
        family: ModelFamily,
        net: nn.Module,
        controlnet: nn.Module | None = None,
        control_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.family = family
        self.denoiser_name = family.denoiser
        self.add_module(family.denoiser, net)
        self.controlnet = controlnet
        self.control_scale = control_scale

    @property
    def net(self) -> nn.Module:
        return getattr(self, self.denoiser_name)

    def forward(self, x_t: Tensor, t: Tensor | float, cond: Condition) -> Tensor:
        """x_t (B, C, h, w), t (B,) or scalar in [0, 1], cond (B rows) -> velocity (B, C, h, w), x_t's dtype."""
        if not torch.is_tensor(t):
            t = torch.tensor(float(t))
        t = t.to(device=x_t.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if self.controlnet is None:
            return self.family.velocity(self.net, x_t, t, cond)
        return self.family.velocity(
            self.net, x_t, t, cond, controlnet=self.controlnet, control_scale=self.control_scale
        )


# ------------------------------------------------------------------------------------------- the family
class ModelFamily:
    """The protocol every family implements (see the module docstring). The base class holds what most families
    share: loading each component of a folder by the class model_index.json names, VAE decode / encode with
    scaling and shift, classifier-free guidance, saving a student folder, a fresh denoiser."""

    name: ClassVar[str]
    # model_index.json `_class_name`s of the folders this family reads
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    denoiser: ClassVar[str] = "unet"
    # the components a folder must hold to load; `optional` ones load when present (SD3's T5)
    required: ClassVar[tuple[str, ...]] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    optional: ClassVar[tuple[str, ...]] = ()
    # cfg: classifier-free guidance (two conditions); embedded: the guidance value is a denoiser input
    # (FLUX.1-dev); none: no guidance (FLUX.1-schnell)
    guidance: ClassVar[Guidance] = "cfg"
    # generation.scheduler values the teacher's sampler takes
    schedulers: ClassVar[tuple[str, ...]] = ()
    # the denoiser's LoRA target modules (peft names) by default
    lora_targets: ClassVar[tuple[str, ...]] = ()

    # ---- 1. load --------------------------------------------------------------------------------------
    def claims(self, index: dict[str, Any]) -> bool:
        """Whether a folder with this model_index.json belongs to the family."""
        return index.get("_class_name") in self.pipeline_classes

    def index_problems(self, index: dict[str, Any]) -> list[str]:
        """What a model_index.json of this family lacks, one line each, before anything loads (the preflight):
        by default every `required` component named (a null entry is what diffusers writes for an absent one)."""
        missing = [
            c for c in self.required if not (isinstance(index.get(c), list) and index[c][:1] != [None])
        ]
        if not missing:
            return []
        return [f"model_index.json names no {', '.join(missing)} (a {self.name} model needs them)"]

    def setting_problems(self, cfg: Any) -> list[str]:
        """Run settings (an `InstaflowConfig`) this family's teacher cannot take, one line each: a
        generation.scheduler its sampler does not know; guidance above 1 where the family has none."""
        out = []
        scheduler = cfg.generation.scheduler
        if self.schedulers and scheduler not in self.schedulers:
            out.append(
                f"generation.scheduler={scheduler!r}: the {self.name} teacher's sampler takes one of "
                f"{list(self.schedulers)}"
            )
        if self.guidance == "none":
            values = {
                "generation.guidance_scale": cfg.generation.guidance_scale,
                "evaluation.teacher_guidance": cfg.evaluation.teacher_guidance,
            }
            out += [
                f"{k}={v}: the {self.name} teacher has no guidance (set it to 1)"
                for k, v in values.items()
                if v > 1
            ]
        return out

    def load(
        self,
        folder: Path,
        *,
        dtype: torch.dtype | str = "float32",
        allow_pickle: bool = False,
        skip: tuple[str, ...] = (),
    ) -> Model:
        """Each component of the folder, by the class its model_index.json names (safetensors only unless
        `allow_pickle`); every network in `dtype` and in eval mode. `skip`: components left out (training that
        reads stored conditions never loads the text encoders)."""
        index = read_index(folder)
        missing = [c for c in self.required if not (folder / c).is_dir()]
        if missing:
            raise DataError(
                f"{folder}: not a {self.name} model folder (missing {', '.join(m + '/' for m in missing)})"
            )
        names = [
            *self.required,
            *(c for c in self.optional if (folder / c).is_dir() and index.get(c) != [None, None]),
        ]
        names = [n for n in names if n not in skip]
        torch_dtype = to_dtype(dtype)
        parts: dict[str, Any] = {}
        try:
            for name in names:
                parts[name] = self.load_component(folder, name, index, torch_dtype, allow_pickle)
        except (OSError, ValueError) as err:
            hint = "" if allow_pickle else " (only .safetensors weights load unless models.allow_pickle=true)"
            raise DataError(f"{folder}: cannot load {name}/: {str(err).splitlines()[0]}{hint}") from err
        for part in parts.values():
            if isinstance(part, nn.Module):
                part.eval().requires_grad_(False)
        return Model(self, parts, folder)

    def load_component(
        self, folder: Path, name: str, index: dict[str, Any], dtype: torch.dtype, allow_pickle: bool
    ) -> Any:
        """One component: its class from model_index.json (or the subfolder's config), loaded from the subfolder."""
        if name == "scheduler" or name.startswith("scheduler"):
            return load_scheduler(folder / name)
        cls = component_class(folder, name, index)
        safe = None if allow_pickle else True
        if "Tokenizer" in cls.__name__:
            return cls.from_pretrained(folder, subfolder=name)
        if cls.__module__.startswith("transformers"):
            return cls.from_pretrained(folder, subfolder=name, dtype=dtype, use_safetensors=safe)
        return cls.from_pretrained(folder, subfolder=name, torch_dtype=dtype, use_safetensors=safe)

    def load_single_file(
        self, path: Path, *, config: str | None, local_files_only: bool, dtype: torch.dtype | str
    ) -> Model:
        """An original-format checkpoint file. Families that read one override this."""
        raise DataError(f"{path.name}: single-file checkpoints of the {self.name} family are not supported")

    def from_configs(
        self, folder: Path, *, dtype: torch.dtype | str = "float32", skip: tuple[str, ...] = ()
    ) -> Model:
        """A model of the folder's architecture with random weights: every network from its config.json alone
        (diffusers' `from_config`, transformers' config class), tokenizers and the scheduler loaded. What the
        footprint benchmarks build at real size without the real weights; `skip` leaves networks out (a T5)."""
        index = read_index(folder)
        torch_dtype = to_dtype(dtype)
        parts: dict[str, Any] = {}
        names = [
            *self.required,
            *(c for c in self.optional if (folder / c).is_dir() and index.get(c) != [None, None]),
        ]
        for name in names:
            if name in skip:
                continue
            cls = component_class(folder, name, index)
            if name.startswith("scheduler") or "Tokenizer" in cls.__name__:
                parts[name] = self.load_component(folder, name, index, torch_dtype, False)
            elif cls.__module__.startswith("transformers"):
                config = cls.config_class.from_pretrained(folder / name)
                parts[name] = cls(config).to(torch_dtype)
            else:
                parts[name] = cls.from_config(cls.load_config(folder / name)).to(torch_dtype)
        for part in parts.values():
            if isinstance(part, nn.Module):
                part.eval().requires_grad_(False)
        return Model(self, parts, folder)

    def build(self, cfg: Any) -> Model:
        """A fresh model from a config section (random init from its seed): the tiny SD teacher, the digits
        model teacher pretraining starts from. Families built only from checkpoints do not override this."""
        raise ConfigError(f"the {self.name} family is not built from config: give a checkpoint")

    # ---- 2. conditions --------------------------------------------------------------------------------
    def encode(self, model: Model, prompts: list[str]) -> Condition:
        """Prompts -> Condition (no grad; the caller holds torch.no_grad)."""
        raise NotImplementedError

    def negative(self, model: Model, prompts: list[str]) -> Condition:
        """The unconditional condition of classifier-free guidance (the encoded negative prompts)."""
        return self.encode(model, prompts)

    def with_guidance(self, cond: Condition, guidance: float) -> tuple[Condition, float]:
        """(the condition to sample with, the classifier-free guidance weight) for a guidance setting.

        cfg families: the condition as it is and weight `guidance`. A family whose denoiser embeds the guidance
        (FLUX.1-dev) puts it into the condition and returns weight 1 (no second pass); "none" ignores it."""
        return cond, guidance

    def condition_shapes(self, configs: dict[str, dict[str, Any]]) -> dict[str, tuple[int, ...]]:
        """One prompt's condition from the components' configs alone (no text encoder loaded), named as
        `Condition.tensors()` names its fields (embeds, pooled, mask, extra.<name>), shapes without the batch:
        what a stored conditions row holds, and what the memory estimate feeds a denoiser built from its config
        (`models/footprint.py`)."""
        raise NotImplementedError(f"the {self.name} family does not describe its conditions")

    # ---- 3. velocity ----------------------------------------------------------------------------------
    def velocity(
        self,
        net: nn.Module,
        x_t: Tensor,
        t: Tensor,
        cond: Condition,
        controlnet: nn.Module | None = None,
        control_scale: float = 1.0,
    ) -> Tensor:
        """x_t (B, C, h, w) in our convention, t (B,) float32 in [0, 1] (0 = noise) -> v = X1 - X0 (B, C, h, w).

        `controlnet` (with `cond.extra["control"]`, the control image) only where the family supports one."""
        raise NotImplementedError

    # ---- 4. latents -----------------------------------------------------------------------------------
    def geometry(self, configs: dict[str, dict[str, Any]]) -> Geometry:
        """The latent geometry from the components' configs (by component name), no weights."""
        raise NotImplementedError

    def vae_factors(self, vae: nn.Module) -> tuple[float, float]:
        """(scaling, shift): latent = (vae latent - shift) * scaling."""
        cfg = vae.config
        return float(cfg.scaling_factor), float(getattr(cfg, "shift_factor", None) or 0.0)

    def decode(self, model: Model, latents: Tensor) -> Tensor:
        """Our latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1] through the VAE (gradients flow)."""
        vae = model.vae
        scale, shift = self.vae_factors(vae)
        z = latents.to(device=_device_of(vae), dtype=_dtype_of(vae)) / scale + shift
        return vae.decode(z, return_dict=False)[0].float()

    def encode_images(self, model: Model, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> our latents (B, C, h, w), float32 (a sample of the VAE posterior)."""
        vae = model.vae
        scale, shift = self.vae_factors(vae)
        dist = vae.encode(images.to(device=_device_of(vae), dtype=_dtype_of(vae))).latent_dist
        return (dist.sample().float() - shift) * scale

    # ---- 5. the teacher's own sampler -----------------------------------------------------------------
    def teacher_sample(
        self,
        model: Model,
        x0: Tensor,
        cond: Condition,
        uncond: Condition | None,
        *,
        steps: int,
        guidance: float,
        scheduler: str,
        mixed_precision: str = "no",
        cfg_batched: bool = True,
    ) -> Tensor:
        """X1 (B, C, h, w) float32 on x0's device: the teacher's own ODE solver from our noise X0 (B, C, h, w)."""
        raise NotImplementedError

    # ---- 6. folders -----------------------------------------------------------------------------------
    def save(self, model: Model, path: Path) -> Path:
        """Every part into a diffusers folder of the family's pipeline class."""
        raise NotImplementedError

    def save_student(
        self,
        base_folder: Path,
        net: nn.Module,
        out: Path,
        meta: dict[str, Any] | None = None,
        *,
        variants: bool = False,
        sample_size: int | None = None,
    ) -> Path:
        """The trained denoiser as a folder of the base's layout: the base's other components (configs and
        full-precision weights only: `folder_layout`), `net` in the denoiser's subfolder, a meta file.
        `sample_size`: the latent side trained at, recorded in the denoiser's config when it has one."""
        if out.exists():
            shutil.rmtree(out)
        index = read_index(base_folder)
        others = tuple(
            c
            for c in (*self.required, *self.optional)
            if c != self.denoiser and (base_folder / c).is_dir() and index.get(c) != [None, None]
        )
        copy_components(base_folder, out, others, variants=variants, denoiser=self.denoiser)
        if sample_size is not None and "sample_size" in net.config and net.config.sample_size != sample_size:
            net.register_to_config(sample_size=int(sample_size))
        net.save_pretrained(out / self.denoiser, safe_serialization=True)
        if variants:
            write_fp16_variant(out / self.denoiser)
        if meta:
            (out / STAGE_META).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        return out

    def pipeline(self, model: Model) -> Any:
        """The family's diffusers pipeline over the model's own modules (shared, not copied): what loads LoRA
        files into them (`load_lora_weights`) and what users of the teacher's own pipeline class get."""
        import inspect

        import diffusers

        cls = getattr(diffusers, self.pipeline_classes[0])
        params = inspect.signature(cls.__init__).parameters
        kwargs = {
            k: model.parts.get(k)
            for k, p in params.items()
            if k != "self" and (k in model.parts or p.default is inspect.Parameter.empty)
        }
        if "requires_safety_checker" in params:
            kwargs["requires_safety_checker"] = False
        return cls(**kwargs)

    def fresh_denoiser(self, net: nn.Module, seed: int) -> nn.Module:
        """A new module of `net`'s class and config with random weights from `seed`."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return type(net).from_config(net.config).to(device=_device_of(net), dtype=_dtype_of(net))

    def __repr__(self) -> str:
        return f"<model family {self.name}>"

    def __reduce__(self) -> tuple[Callable[[str], ModelFamily], tuple[str]]:
        return (get_family, (self.name,))  # pickled (Ray, deepcopy) as its name: one instance per family


# ---------------------------------------------------------------------------------------------- lookup
_LOADED: dict[str, ModelFamily] = {}


def get_family(name: str) -> ModelFamily:
    """The family registered under `name` (its module imported on first use)."""
    if name not in _LOADED:
        if name not in FAMILIES:
            raise ConfigError(f"unknown model family {name!r}: choose one of {sorted(FAMILIES)}")
        _LOADED[name] = importlib.import_module(FAMILIES[name]).FAMILY
    return _LOADED[name]


def read_index(folder: Path) -> dict[str, Any]:
    """A folder's model_index.json ({} when it has none)."""
    f = Path(folder) / "model_index.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except ValueError as err:
        raise DataError(f"{f}: not valid JSON ({err})") from err


def family_of_index(index: dict[str, Any], where: str = "the model") -> ModelFamily:
    """The family that claims a model_index.json; a one-line error naming the class when none does."""
    families = [get_family(n) for n in FAMILIES]
    # experiments first: a digits folder says StableDiffusionPipeline too, with its own network classes
    for fam in sorted(families, key=lambda f: f.name not in ("digits",)):
        if fam.claims(index):
            return fam
    name = index.get("_class_name")
    known = sorted({c for f in families for c in f.pipeline_classes})
    raise DataError(f"{where}: pipeline class {name!r} is not supported (known: {', '.join(known)})")


def family_of(folder: Path) -> ModelFamily:
    """The family of a local diffusers folder, from its model_index.json."""
    index = read_index(folder)
    if not index:
        raise DataError(f"{folder}: not a diffusers model folder (no model_index.json)")
    return family_of_index(index, str(folder))


def component_class(
    folder: Path | str, name: str, index: dict[str, Any], config: dict[str, Any] | None = None
) -> type:
    """The class of component `name`: from model_index.json's [library, class], the subfolder config's
    `_class_name` for the project's own classes (experiments register them in `CUSTOM_CLASSES`). `config`: the
    component's config when it was read already (a folder in the store: then `folder` only names it)."""
    entry = index.get(name)
    if config is None:
        cfg_file = Path(folder) / name / "config.json"
        config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    own = config.get("_class_name")
    if own in CUSTOM_CLASSES:
        return _custom(own)
    if not entry or entry[1] is None:
        raise DataError(f"{folder}: model_index.json names no class for {name}")
    library, cls_name = entry
    if library in ("diffusers", "transformers"):
        module = importlib.import_module(library)
        cls = getattr(module, cls_name, None)
        if cls is not None:
            return cls
    if cls_name in CUSTOM_CLASSES:
        return _custom(cls_name)
    raise DataError(f"{folder}/{name}: unknown class {library}.{cls_name}")


# the project's own classes by `_class_name` -> module path (experiments' pixel models, the rectified-flow
# scheduler that students of the UNet families save)
CUSTOM_CLASSES: dict[str, str] = {
    "DigitsVelocityNet": "instaflow_core.experiments.digits.model",
    "DigitsPixelVAE": "instaflow_core.experiments.digits.model",
    "RectifiedFlowEulerScheduler": "instaflow_core.models.flow_scheduler",
}


def _custom(cls_name: str) -> type:
    return getattr(importlib.import_module(CUSTOM_CLASSES[cls_name]), cls_name)


def load_scheduler(folder: Path) -> Any:
    """Instantiate the scheduler class that scheduler_config.json names (diffusers' or the project's own)."""
    import diffusers

    cfg_file = Path(folder) / "scheduler_config.json"
    if not cfg_file.is_file():
        raise DataError(f"{cfg_file} not found")
    name = json.loads(cfg_file.read_text()).get("_class_name", "PNDMScheduler")
    cls = _custom(name) if name in CUSTOM_CLASSES else getattr(diffusers, name, None)
    if cls is None or not issubclass(cls, diffusers.SchedulerMixin):
        raise DataError(f"{cfg_file}: unknown scheduler class {name!r}")
    return cls.from_pretrained(folder)


def config_dict(part: Any) -> dict[str, Any]:
    """A component's config as a plain dict (diffusers' FrozenDict or transformers' PretrainedConfig)."""
    cfg = getattr(part, "config", None)
    if cfg is None:
        return {}
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _first_tensor(module: nn.Module) -> Tensor | None:
    for t in module.parameters():
        return t
    for t in module.buffers():
        return t
    return None


def _device_of(module: nn.Module) -> torch.device:
    t = _first_tensor(module)
    return t.device if t is not None else torch.device("cpu")


def _dtype_of(module: nn.Module) -> torch.dtype:
    t = _first_tensor(module)
    return t.dtype if t is not None else torch.float32


def replace(cond: Condition, **changes: Any) -> Condition:
    """`dataclasses.replace` for a Condition (extra merged, not replaced)."""
    extra = {**cond.extra, **changes.pop("extra", {})}
    return dataclasses.replace(cond, extra=extra, **changes)
