"""Models: load the teacher/student SD components, build the tiny ones, and the velocity adapter around a UNet.

Everything on disk is a diffusers folder with safetensors (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/), the layout the released InstaFlow / 2-RF folders use too. `UNetVelocity` is the one
place that turns the project's time `t` in [0, 1] (t=0 noise) into the SD UNet's timestep and prompts into text
embeddings; everything else (training, sampling) sees a plain `v(x_t, t, cond)`.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    SchedulerMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from instaflow_core.config import ModelsConfig, StorageConfig
from instaflow_core.errors import DataError
from instaflow_core.models.components import COMPONENT_NAMES, SDComponents, to_dtype
from instaflow_core.models.tiny import build_tiny
from instaflow_core.refs import ModelRef
from instaflow_core.store.uri import Store

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


# ------------------------------------------------------------------------------------------- the tiny model


# ---------------------------------------------------------------------------------------------- loading
def load_components(
    source: str | Path,
    *,
    allow_pickle: bool = False,
    local_files_only: bool = True,
    revision: str | None = None,
    dtype: str | torch.dtype = "float32",
    config: str | None = None,
) -> SDComponents:
    """Load SD components from a local diffusers folder, a single .safetensors checkpoint, or a hub id.

    Pickle checkpoints (.ckpt/.bin/.pt) execute code when loaded: refused unless `allow_pickle`. A hub id is
    looked up in the local cache only, unless `local_files_only=False`. `config` (single files only) is a local
    diffusers folder or hub id whose component configs describe the checkpoint (default: inferred by diffusers).
    """
    torch_dtype = to_dtype(dtype)
    src = str(source)
    if src.startswith("file://"):
        src = src[len("file://") :]
    elif "://" in src:
        raise DataError(
            f"model source {src!r}: copy remote folders locally first (Store.local_copy), then load"
        )
    path = Path(src).expanduser()
    if path.is_dir():
        return _load_folder(path, allow_pickle=allow_pickle, torch_dtype=torch_dtype)
    if path.suffix in (".safetensors", *PICKLE_SUFFIXES):
        if not path.is_file():
            raise DataError(f"model checkpoint not found: {path}")
        if path.suffix != ".safetensors" and not allow_pickle:
            raise DataError(
                f"{path.name}: pickle checkpoints can run arbitrary code when loaded; convert it to "
                ".safetensors or set models.allow_pickle=true if you trust it"
            )
        return _load_single_file(
            path, local_files_only=local_files_only, torch_dtype=torch_dtype, config=config
        )
    if path.exists() or src.startswith((".", "/", "~")) or src.count("/") != 1:
        raise DataError(
            f"model source {src!r} is neither a diffusers folder, a .safetensors file nor a hub id (owner/name)"
        )
    return _load_hub(
        src,
        allow_pickle=allow_pickle,
        local_files_only=local_files_only,
        revision=revision,
        torch_dtype=torch_dtype,
    )


def _load_folder(path: Path, *, allow_pickle: bool, torch_dtype: torch.dtype) -> SDComponents:
    """Load each component from its subfolder (works whatever pipeline class model_index.json names)."""
    missing = [name for name in COMPONENT_NAMES if not (path / name).is_dir()]
    if missing:
        raise DataError(f"{path}: not a diffusers SD folder (missing {', '.join(missing)}/)")
    # use_safetensors=True makes loading fail instead of silently unpickling a .bin
    safe = None if allow_pickle else True
    try:
        unet = UNet2DConditionModel.from_pretrained(
            path, subfolder="unet", torch_dtype=torch_dtype, use_safetensors=safe
        )
        vae = AutoencoderKL.from_pretrained(
            path, subfolder="vae", torch_dtype=torch_dtype, use_safetensors=safe
        )
        text_encoder = CLIPTextModel.from_pretrained(
            path, subfolder="text_encoder", dtype=torch_dtype, use_safetensors=safe
        )
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        scheduler = load_scheduler(path / "scheduler")
    except (OSError, ValueError) as err:
        hint = (
            "" if allow_pickle else " (only .safetensors weights are loaded unless models.allow_pickle=true)"
        )
        raise DataError(f"{path}: cannot load the model: {str(err).splitlines()[0]}{hint}") from err
    for module in (unet, vae, text_encoder):
        module.eval()
    return SDComponents(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
    )


def load_scheduler(folder: str | Path) -> SchedulerMixin:
    """Instantiate the scheduler class that scheduler_config.json names."""
    import diffusers

    cfg_file = Path(folder) / "scheduler_config.json"
    if not cfg_file.is_file():
        raise DataError(f"{cfg_file} not found")
    name = json.loads(cfg_file.read_text()).get("_class_name", "PNDMScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None or not issubclass(cls, SchedulerMixin):
        raise DataError(f"{cfg_file}: unknown scheduler class {name!r}")
    return cls.from_pretrained(folder)


def _load_single_file(
    path: Path, *, local_files_only: bool, torch_dtype: torch.dtype, config: str | None
) -> SDComponents:
    """An original-format (LDM/A1111) SD checkpoint via diffusers' single-file loader."""
    if config is None and local_files_only:
        # diffusers would silently download the inferred config repo when it is not cached: look it up ourselves.
        config = _cached_single_file_config(path)
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path),
            config=config,
            local_files_only=local_files_only,
            torch_dtype=torch_dtype,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise DataError(f"{path.name}: not a loadable SD checkpoint: {str(err).splitlines()[0]}") from err
    return SDComponents(
        unet=pipe.unet.eval(),
        vae=pipe.vae.eval(),
        text_encoder=pipe.text_encoder.eval(),
        tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler,
    )


def _cached_single_file_config(path: Path) -> str:
    """The local snapshot of the diffusers config repo a single-file checkpoint needs, or a clear error."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config, load_single_file_checkpoint
    from huggingface_hub import snapshot_download

    try:
        checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise DataError(f"{path.name}: unreadable checkpoint ({str(err).splitlines()[0]})") from err
    repo = fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
    try:
        return snapshot_download(
            repo, local_files_only=True, allow_patterns=["*.json", "*/*.json", "*/*.txt"]
        )
    except Exception as err:
        raise DataError(
            f"{path.name} needs the component configs of {repo!r}, which are not cached: download them "
            f"(huggingface-cli download {repo} --include '*.json' '*.txt') or set models.local_files_only=false"
        ) from err


def _load_hub(
    repo: str, *, allow_pickle: bool, local_files_only: bool, revision: str | None, torch_dtype: torch.dtype
) -> SDComponents:
    """A hub repo, taken from the local cache (or downloaded when local_files_only=False), then loaded as a folder."""
    from huggingface_hub import snapshot_download

    # Only the five component folders: SD repos also hold multi-GB root checkpoints and fp16/flax/onnx copies.
    weights = ["*.safetensors"] + (["*.bin"] if allow_pickle else [])
    patterns = ["model_index.json"] + [f"{c}/*.{ext}" for c in COMPONENT_NAMES for ext in ("json", "txt")]
    patterns += [f"{c}/{w}" for c in ("unet", "vae", "text_encoder") for w in weights]
    try:
        folder = snapshot_download(
            repo,
            revision=revision,
            local_files_only=local_files_only,
            allow_patterns=patterns,
            ignore_patterns=["*.fp16.*", "*non_ema*", "*.ema.*"],
        )
    except Exception as err:
        if local_files_only:
            raise DataError(
                f"model {repo!r} is not in the local Hugging Face cache: download it (huggingface-cli download "
                f"{repo}) or set models.local_files_only=false"
            ) from err
        raise DataError(f"cannot download model {repo!r}: {str(err).splitlines()[0]}") from err
    return _load_folder(Path(folder), allow_pickle=allow_pickle, torch_dtype=torch_dtype)


def teacher_components(models_cfg: ModelsConfig) -> SDComponents:
    """The teacher named by the config: `tiny` builds it, anything else is a source for `load_components`."""
    if models_cfg.teacher == "tiny":
        comps = build_tiny(models_cfg.tiny)
        if models_cfg.dtype != "float32":
            comps.to(dtype=models_cfg.dtype)
        return comps
    return load_components(
        models_cfg.teacher,
        allow_pickle=models_cfg.allow_pickle,
        local_files_only=models_cfg.local_files_only,
        revision=models_cfg.teacher_revision,
        dtype=models_cfg.dtype,
    )


def latent_shape(components: SDComponents) -> tuple[int, int, int]:
    """(C, h, w) of the UNet's latent: (4, 64, 64) for SD 1.5, (4, 8, 8) for the tiny preset."""
    size = components.unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(components.unet.config.in_channels), int(h), int(w))


# ------------------------------------------------------------------------------------------ the adapter


_cache: dict[tuple[str, str, str], Any] = {}


_cache_lock = threading.Lock()


def load_model(ref: ModelRef, storage_cfg: StorageConfig, models_cfg: ModelsConfig | None = None) -> Any:
    """SDComponents for a ModelRef (s3:// folders are downloaded once via Store.local_copy).

    `models_cfg` supplies dtype / revision / allow_pickle / local_files_only for external teachers; models
    saved by the pipeline are safetensors diffusers folders and load with the defaults.
    """
    from instaflow_core.models.loading import load_components

    cfg = models_cfg or ModelsConfig()
    source = Store(storage_cfg).resolve(ref.uri)  # store://models/... -> under the current root
    if source.startswith("s3://"):
        source = str(Store(storage_cfg).local_copy(source))
    return load_components(
        source,
        allow_pickle=cfg.allow_pickle,
        local_files_only=cfg.local_files_only,
        revision=cfg.teacher_revision if ref.kind == "teacher" else None,
        dtype=cfg.dtype,
    )


def load_model_cached(
    ref: ModelRef, storage_cfg: StorageConfig, models_cfg: ModelsConfig | None = None
) -> Any:
    """`load_model`, once per process and reference: shard task runs on one worker share the networks."""
    key = (ref.key(), (models_cfg or ModelsConfig()).dtype, storage_cfg.root)
    with _cache_lock:
        if key not in _cache:
            _cache.clear()  # one model per process at a time: SD-size models are GBs
            _cache[key] = load_model(ref, storage_cfg, models_cfg)
        return _cache[key]


def model_latent_shape(
    ref: ModelRef, storage_cfg: StorageConfig, models_cfg: ModelsConfig | None = None
) -> tuple:
    """(C, h, w) of a model's latents from its unet/config.json, without loading the weights where possible."""
    raw = None
    uri = Store(storage_cfg).resolve(ref.uri)
    try:
        if uri.startswith(("s3://", "file://")):
            store = Store(storage_cfg)
            cfg_uri = uri.rstrip("/") + "/unet/config.json"
            if store.exists(cfg_uri):
                raw = json.loads(store.read_bytes(cfg_uri))
        elif "://" not in uri and uri.count("/") == 1:
            from huggingface_hub import hf_hub_download

            cfg = models_cfg or ModelsConfig()
            path = hf_hub_download(
                uri,
                "unet/config.json",
                revision=cfg.teacher_revision,
                local_files_only=cfg.local_files_only,
            )
            raw = json.loads(Path(path).read_text())
    except Exception:  # noqa: BLE001 - fall back to loading the model, which gives a clear error
        raw = None
    if raw is not None:
        size = raw.get("sample_size", 64)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(raw.get("in_channels", 4)), int(h), int(w))
    from instaflow_core.models.loading import latent_shape

    return latent_shape(load_model_cached(ref, storage_cfg, models_cfg))
