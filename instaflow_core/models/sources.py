"""Where a model's files are: the one place a model reference becomes a local diffusers folder.

A model reference (`ModelRef.uri`, `models.teacher`, `init_from`) is one of

- `owner/name`: a Hugging Face hub id, taken from the local cache (`models.local_files_only`, the default) or
  downloaded, with only the five component folders' full-precision files (`hub_snapshot`);
- `s3://bucket/...`: a folder in the store, downloaded once per machine (`Store.local_copy`);
- `file:///abs/path` or a plain path: a local folder (or, for loading only, a single checkpoint file).

`local_model_path` resolves any of them; `component_configs` reads unet/ and vae/ config.json without touching
the weights (latent shapes, preflight). Training, generation, evaluation and the preflight all go through
these two, so a hub id means the same thing in every stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from instaflow_core.config import ModelsConfig, StorageConfig
from instaflow_core.errors import DataError
from instaflow_core.models.geometry import Geometry

COMPONENT_NAMES = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
NETWORKS = ("unet", "vae", "text_encoder")
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
# SD repos also hold fp16 / non-EMA / EMA copies beside the full-precision weights: never fetch those.
VARIANT_IGNORE = ["*.fp16.*", "*non_ema*", "*.ema.*"]
CONFIG_FILES = ["model_index.json"] + [f"{c}/*.{ext}" for c in COMPONENT_NAMES for ext in ("json", "txt")]


def is_hub_id(source: str) -> bool:
    """owner/name, and no such local path: the same rule everywhere a model source is read."""
    if "://" in source or source.startswith((".", "/", "~")) or source.count("/") != 1:
        return False
    return not Path(source).expanduser().exists()


def hub_patterns(allow_pickle: bool = False, configs_only: bool = False) -> list[str]:
    """What `snapshot_download` fetches of an SD repo: the component configs (+ their weights)."""
    if configs_only:
        return list(CONFIG_FILES)
    weights = ["*.safetensors"] + (["*.bin"] if allow_pickle else [])
    return CONFIG_FILES + [f"{c}/{w}" for c in NETWORKS for w in weights]


def hub_snapshot(
    repo: str,
    *,
    revision: str | None = None,
    local_files_only: bool = True,
    allow_pickle: bool = False,
    configs_only: bool = False,
) -> Path:
    """The local snapshot folder of a hub repo's SD components (from the cache, or downloaded when allowed)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo,
            revision=revision,
            local_files_only=local_files_only,
            allow_patterns=hub_patterns(allow_pickle, configs_only),
            ignore_patterns=VARIANT_IGNORE,
        )
    except Exception as err:  # noqa: BLE001 - hub errors have many types; each becomes one line
        if local_files_only:
            raise DataError(
                f"model {repo!r} is not in the local Hugging Face cache: download it (huggingface-cli download "
                f"{repo}) or set models.local_files_only=false"
            ) from err
        raise DataError(f"cannot download model {repo!r}: {str(err).splitlines()[0]}") from err
    return Path(folder)


def _hub_options(models_cfg: ModelsConfig | None, kind: str) -> dict[str, Any]:
    cfg = models_cfg or ModelsConfig()
    return {
        "revision": cfg.teacher_revision if kind == "teacher" else None,
        "local_files_only": cfg.local_files_only,
        "allow_pickle": cfg.allow_pickle,
    }


def _in_store(uri: str, storage_cfg: StorageConfig | None) -> str:
    """`store://models/x` (a model the pipeline saved, relative to the store root) as a real URI."""
    src = str(uri)
    if src.startswith("store://"):
        from instaflow_core.store.uri import Store

        return Store(storage_cfg).resolve(src)
    return src


def local_model_path(
    uri: str,
    storage_cfg: StorageConfig | None = None,
    models_cfg: ModelsConfig | None = None,
    kind: str = "teacher",
) -> Path:
    """A local path holding the model `uri` names (see the module docstring); DataError when there is none."""
    src = _in_store(uri, storage_cfg)
    if src.startswith("s3://"):
        from instaflow_core.store.uri import Store

        return Store(storage_cfg).local_copy(src)
    if src.startswith("file://"):
        src = src[len("file://") :]
    elif "://" in src:
        raise DataError(f"model source {src!r}: use a hub id, a local path, file:// or s3://")
    if is_hub_id(src):
        return hub_snapshot(src, **_hub_options(models_cfg, kind))
    path = Path(src).expanduser()
    if not path.exists():
        raise DataError(
            f"model {src!r} not found (give a diffusers folder, a .safetensors file or owner/name)"
        )
    return path


def component_configs(
    uri: str,
    storage_cfg: StorageConfig | None = None,
    models_cfg: ModelsConfig | None = None,
    kind: str = "teacher",
) -> dict[str, dict[str, Any]]:
    """{"unet": ..., "vae": ...}: the two configs that fix a model's geometry, read without any weights."""
    src = _in_store(uri, storage_cfg)
    raw: dict[str, bytes] = {}
    if src.startswith("s3://"):
        from instaflow_core.store.uri import Store

        store = Store(storage_cfg)
        for part in ("unet", "vae"):
            cfg_uri = f"{src.rstrip('/')}/{part}/config.json"
            if store.exists(cfg_uri):
                raw[part] = store.read_bytes(cfg_uri)
        folder = src
    else:
        local = src[len("file://") :] if src.startswith("file://") else src
        if is_hub_id(local):
            opts = _hub_options(models_cfg, kind)
            path = hub_snapshot(
                local, revision=opts["revision"], local_files_only=opts["local_files_only"], configs_only=True
            )
        else:
            path = Path(local).expanduser()
        folder = str(path)
        for part in ("unet", "vae"):
            f = path / part / "config.json"
            if f.is_file():
                raw[part] = f.read_bytes()
    if "unet" not in raw:
        raise DataError(f"{folder}: no unet/config.json (not a diffusers SD folder)")
    try:
        return {part: json.loads(blob) for part, blob in raw.items()}
    except ValueError as err:
        raise DataError(f"{folder}: unreadable component config ({err})") from err


def model_geometry(
    uri: str,
    storage_cfg: StorageConfig | None = None,
    models_cfg: ModelsConfig | None = None,
    kind: str = "teacher",
) -> Geometry:
    """The model's Geometry (latent channels, native size, down-sampling) from its configs alone."""
    cfgs = component_configs(uri, storage_cfg, models_cfg, kind)
    return Geometry.from_configs(cfgs["unet"], cfgs.get("vae"))


def missing_files(folder: Path, allow_pickle: bool = False) -> list[str]:
    """What a diffusers SD folder lacks to load: component folders, configs, full-precision weights."""
    out = [f"{c}/" for c in COMPONENT_NAMES if not (folder / c).is_dir()]
    for net in NETWORKS:
        d = folder / net
        if not d.is_dir():
            continue
        if not (d / "config.json").is_file():
            out.append(f"{net}/config.json")
        suffixes = (".safetensors", ".bin") if allow_pickle else (".safetensors",)
        full = [p for p in d.iterdir() if p.suffix in suffixes and not is_variant(p.name)]
        if not full:
            out.append(f"{net}/*{suffixes[0]}")
    return out


def is_variant(name: str) -> bool:
    """`diffusion_pytorch_model.fp16.safetensors`, `model.non_ema.bin`: a variant, not the main weights.

    Shards (`model-00001-of-00002.safetensors`) and their index (`model.safetensors.index.json`) are main files.
    """
    return Path(name).suffix in (".safetensors", ".bin") and len(name.split(".")) > 2
