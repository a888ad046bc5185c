"""Loading: a model reference -> a `Model` of its family, once per process.

Everything on disk is a diffusers folder with safetensors (model_index.json + one subfolder per component), the
layout the released InstaFlow / 2-RF folders and every teacher repo use. The family that reads a folder is the
one that claims its model_index.json (`models.family.family_of`); a single original-format checkpoint file is
read by the family diffusers' single-file loader infers from its keys; `tiny` is built from config by the SD
family. Every stage loads through `load_model` (a ModelRef) or `load_source` (a path / hub id / file).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from instaflow_core.config import ModelsConfig, StorageConfig
from instaflow_core.errors import DataError
from instaflow_core.models.family import Model, ModelFamily, family_of, family_of_index, get_family, to_dtype
from instaflow_core.models.geometry import Geometry
from instaflow_core.models.sources import (
    PICKLE_SUFFIXES,
    hub_snapshot,
    is_hub_id,
    local_model_path,
    model_configs,
)
from instaflow_core.refs import ModelRef

# diffusers' single-file model types (`infer_diffusers_model_type`, before its first "_": sd35_medium -> sd35)
# -> the family that reads them
SINGLE_FILE_FAMILIES = {"v1": "sd", "v2": "sd", "xl": "sdxl", "sd3": "sd3", "sd35": "sd3", "flux": "flux"}


def load_source(
    source: str | Path,
    *,
    allow_pickle: bool = False,
    local_files_only: bool = True,
    revision: str | None = None,
    dtype: str | torch.dtype = "float32",
    config: str | None = None,
) -> Model:
    """Load a model from a local diffusers folder, a single checkpoint file, or a hub id (cached unless
    `local_files_only=False`). Pickle checkpoints (.ckpt/.bin/.pt) execute code when loaded: refused unless
    `allow_pickle`. `config` (single files only): a local folder or hub id whose component configs describe the
    checkpoint (default: the repo diffusers infers, from the local cache)."""
    src = str(source)
    if src.startswith("file://"):
        src = src[len("file://") :]
    elif "://" in src:
        raise DataError(
            f"model source {src!r}: copy remote folders locally first (local_model_path), then load"
        )
    path = Path(src).expanduser()
    if path.is_dir():
        return family_of(path).load(path, dtype=dtype, allow_pickle=allow_pickle)
    if path.suffix in (".safetensors", *PICKLE_SUFFIXES):
        if not path.is_file():
            raise DataError(f"model checkpoint not found: {path}")
        if path.suffix != ".safetensors" and not allow_pickle:
            raise DataError(
                f"{path.name}: pickle checkpoints can run arbitrary code when loaded; convert it to "
                ".safetensors or set models.allow_pickle=true if you trust it"
            )
        return load_single_file(path, local_files_only=local_files_only, dtype=dtype, config=config)
    if not is_hub_id(src):
        raise DataError(
            f"model source {src!r} is neither a diffusers folder, a .safetensors file nor a hub id (owner/name)"
        )
    folder = hub_snapshot(
        src, revision=revision, local_files_only=local_files_only, allow_pickle=allow_pickle
    )
    return family_of(folder).load(folder, dtype=dtype, allow_pickle=allow_pickle)


def load_single_file(
    path: Path, *, local_files_only: bool, dtype: str | torch.dtype, config: str | None = None
) -> Model:
    """An original-format checkpoint: its family from its keys (diffusers' inference), the component configs
    from `config` or the inferred repo's cached configs (never a silent download)."""
    from diffusers.loaders.single_file_utils import (
        fetch_diffusers_config,
        infer_diffusers_model_type,
        load_single_file_checkpoint,
    )

    try:
        checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise DataError(f"{path.name}: unreadable checkpoint ({str(err).splitlines()[0]})") from err
    model_type = infer_diffusers_model_type(checkpoint)
    family = get_family(SINGLE_FILE_FAMILIES.get(model_type.split("_")[0].split("-")[0], "sd"))
    if config is not None:  # the configs the user names say which pipeline (and family) the file is
        family = _config_family(config) or family
    elif local_files_only:
        repo = fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
        try:
            config = str(hub_snapshot(repo, local_files_only=True, configs_only=True))
        except DataError as err:
            raise DataError(
                f"{path.name} needs the component configs of {repo!r}, which are not cached: download them "
                f"(huggingface-cli download {repo} --include '*.json' '*.txt') or set models.local_files_only=false"
            ) from err
    return family.load_single_file(path, config=config, local_files_only=local_files_only, dtype=dtype)


def _config_family(config: str) -> ModelFamily | None:
    """The family of a single file's config folder or cached hub repo (None when its model_index.json cannot be
    read: the family inferred from the checkpoint's keys stays)."""
    try:
        index, _ = model_configs(config)
    except DataError:
        return None
    return family_of_index(index, str(config)) if index else None


def model_geometry(
    uri: str,
    storage_cfg: StorageConfig | None = None,
    models_cfg: ModelsConfig | None = None,
    kind: str = "teacher",
) -> Geometry:
    """The model's Geometry (latent channels, native size, down-sampling) from its configs alone."""
    index, configs = model_configs(uri, storage_cfg, models_cfg, kind)
    return family_of_index(index, str(uri)).geometry(configs)


def teacher_parts(models_cfg: ModelsConfig) -> Model:
    """The teacher the config names: `tiny` is built, anything else is a source for `load_source`."""
    if models_cfg.teacher == "tiny":
        from instaflow_core.models.sd import build_tiny

        model = build_tiny(models_cfg.tiny)
        if models_cfg.dtype != "float32":
            model.to(dtype=models_cfg.dtype)
        return model
    return load_source(
        models_cfg.teacher,
        allow_pickle=models_cfg.allow_pickle,
        local_files_only=models_cfg.local_files_only,
        revision=models_cfg.teacher_revision,
        dtype=models_cfg.dtype,
    )


def load_model(ref: ModelRef, storage_cfg: StorageConfig, models_cfg: ModelsConfig | None = None) -> Model:
    """The Model a ModelRef names, wherever it is (sources.local_model_path: hub id, s3:// folder, local path).

    `models_cfg` supplies dtype / revision / allow_pickle / local_files_only for external teachers; models
    saved by the pipeline are safetensors diffusers folders and load with the defaults.
    """
    cfg = models_cfg or ModelsConfig()
    source = local_model_path(ref.uri, storage_cfg, cfg, kind=str(ref.kind))
    return load_source(
        source,
        allow_pickle=cfg.allow_pickle,
        local_files_only=cfg.local_files_only,
        revision=cfg.teacher_revision if ref.kind == "teacher" else None,
        dtype=to_dtype(cfg.dtype),
    )


_cache: dict[tuple[str, str, str], Any] = {}
_cache_lock = threading.Lock()
_loads: dict[
    tuple[str, str, str], int
] = {}  # loads per model in this process (what Ray's worker reuse saves)


def load_model_cached(
    ref: ModelRef, storage_cfg: StorageConfig, models_cfg: ModelsConfig | None = None
) -> Model:
    """`load_model`, once per process and reference: shard task runs on one worker share the networks."""
    key = _cache_key(ref, storage_cfg, models_cfg)
    with _cache_lock:
        if key not in _cache:
            _cache.clear()  # one model per process at a time: teacher-size models are GBs
            _cache[key] = load_model(ref, storage_cfg, models_cfg)
            _loads[key] = _loads.get(key, 0) + 1
        return _cache[key]


def _cache_key(ref: ModelRef, storage_cfg: StorageConfig, models_cfg: ModelsConfig | None) -> tuple:
    return (ref.key(), (models_cfg or ModelsConfig()).dtype, storage_cfg.root)


def times_loaded(ref: ModelRef, storage_cfg: StorageConfig, models_cfg: ModelsConfig | None = None) -> int:
    """How often this process has loaded the model through `load_model_cached` (1 on a reused Ray worker)."""
    return _loads.get(_cache_key(ref, storage_cfg, models_cfg), 0)
