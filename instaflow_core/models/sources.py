"""Where a model's files are: the one place a model reference becomes a local diffusers folder.

A model reference (`ModelRef.uri`, `models.teacher`, `init_from`) is one of

- `owner/name`: a Hugging Face hub id, taken from the local cache (`models.local_files_only`, the default) or
  downloaded, with only what its pipeline loads (`hub_snapshot`): model_index.json, then the component folders
  it names (the safety checker, feature extractor and image encoder left out), their configs, tokenizer files
  and full-precision weights (shards and their index included), never fp16 / EMA variants, ONNX / OpenVINO
  exports or the multi-GB root single-file checkpoints;
- `s3://bucket/...`: a folder in the store, downloaded once per machine (`Store.local_copy`);
- `file:///abs/path` or a plain path: a local folder (or, for loading only, a single checkpoint file);
- `store://models/x`: a folder the pipeline saved, relative to the store root.

`local_model_path` resolves any of them; `model_configs` reads model_index.json and every component's config
without touching the weights (`loading.model_geometry` turns them into the family's latent geometry for the
preflight and table schemas). Training, generation, evaluation and the preflight all go through these, so a hub id means the
same thing in every stage and for every family.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from instaflow_core.config import ModelsConfig, StorageConfig
from instaflow_core.errors import DataError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
# Components a pipeline can hold that training and sampling never run: left out of downloads and saved folders.
UNUSED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
# Repos also hold fp16 / non-EMA / EMA copies, ONNX / OpenVINO / Flax exports beside the full-precision weights.
VARIANT_IGNORE = ["*.fp16.*", "*non_ema*", "*.ema.*", "*.onnx", "*.onnx_data", "*openvino*", "*.msgpack"]
INDEX = "model_index.json"
TEXT_FILES = ("json", "txt", "model")  # configs, BPE vocab / merges, sentencepiece models


def is_hub_id(source: str) -> bool:
    """owner/name, and no such local path: the same rule everywhere a model source is read."""
    if "://" in source or source.startswith((".", "/", "~")) or source.count("/") != 1:
        return False
    return not Path(source).expanduser().exists()


def pipeline_components(index: dict[str, Any]) -> list[str]:
    """The component folders a model_index.json names (non-null), without the ones never run."""
    return sorted(
        k
        for k, v in index.items()
        if not k.startswith("_")
        and isinstance(v, list)
        and len(v) == 2
        and v[0] is not None
        and k not in UNUSED_COMPONENTS
    )


def hub_patterns(
    components: list[str] | tuple[str, ...], allow_pickle: bool = False, configs_only: bool = False
) -> list[str]:
    """What `snapshot_download` fetches of a repo: model_index.json and, per component, its configs and tokenizer
    files (+ its full-precision weights unless `configs_only`)."""
    out = [INDEX] + [f"{c}/*.{ext}" for c in components for ext in TEXT_FILES]
    if not configs_only:
        weights = ["*.safetensors"] + (["*.bin"] if allow_pickle else [])
        out += [f"{c}/{w}" for c in components for w in weights]
    return out


def hub_snapshot(
    repo: str,
    *,
    revision: str | None = None,
    local_files_only: bool = True,
    allow_pickle: bool = False,
    configs_only: bool = False,
) -> Path:
    """The local snapshot folder of a hub repo's pipeline components (from the cache, or downloaded when allowed).

    Two steps: model_index.json first (which components there are), then those components' files."""
    index = json.loads((_snapshot(repo, [INDEX], revision, local_files_only) / INDEX).read_text())
    patterns = hub_patterns(pipeline_components(index), allow_pickle, configs_only)
    return _snapshot(repo, patterns, revision, local_files_only)


def _snapshot(repo: str, patterns: list[str], revision: str | None, local_files_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo,
            revision=revision,
            local_files_only=local_files_only,
            allow_patterns=patterns,
            ignore_patterns=VARIANT_IGNORE,
        )
    except Exception as err:  # noqa: BLE001 - hub errors have many types; each becomes one line
        if local_files_only:
            raise DataError(
                f"model {repo!r} is not in the local Hugging Face cache: download it (huggingface-cli download "
                f"{repo}) or set models.local_files_only=false"
            ) from err
        raise DataError(f"cannot download model {repo!r}: {str(err).splitlines()[0]}") from err
    folder = Path(folder)
    if not (folder / INDEX).is_file():
        raise DataError(f"model {repo!r}: the repo has no {INDEX} (not a diffusers pipeline repo)")
    return folder


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


def model_configs(
    uri: str,
    storage_cfg: StorageConfig | None = None,
    models_cfg: ModelsConfig | None = None,
    kind: str = "teacher",
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(model_index.json, {component: its config}) of a model, read without any weights (the scheduler's
    config under "scheduler", tokenizers left out)."""
    src = _in_store(uri, storage_cfg)
    raw: dict[str, bytes] = {}
    if src.startswith("s3://"):
        from instaflow_core.store.uri import Store

        store = Store(storage_cfg)
        base = src.rstrip("/")
        folder = src

        def read(rel: str) -> bytes | None:
            return store.read_bytes(f"{base}/{rel}") if store.exists(f"{base}/{rel}") else None

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

        def read(rel: str) -> bytes | None:
            f = path / rel
            return f.read_bytes() if f.is_file() else None

    blob = read(INDEX)
    if blob is None:
        raise DataError(f"{folder}: no {INDEX} (not a diffusers model folder)")
    try:
        index = json.loads(blob)
        for comp in pipeline_components(index):
            for name in ("config.json", "scheduler_config.json"):
                got = read(f"{comp}/{name}")
                if got is not None and not comp.startswith("tokenizer"):
                    raw[comp] = got
        return index, {comp: json.loads(b) for comp, b in raw.items()}
    except ValueError as err:
        raise DataError(f"{folder}: unreadable component config ({err})") from err


def missing_files(folder: Path, allow_pickle: bool = False) -> list[str]:
    """What a diffusers folder lacks to load: the components model_index.json names, their configs, their
    full-precision weights (a sharded checkpoint's index counts)."""
    index_file = folder / INDEX
    if not index_file.is_file():
        return [INDEX]
    try:
        index = json.loads(index_file.read_text())
    except ValueError:
        return [f"{INDEX} (not valid JSON)"]
    out = []
    suffixes = (".safetensors", ".bin") if allow_pickle else (".safetensors",)
    for comp in pipeline_components(index):
        d = folder / comp
        if not d.is_dir():
            out.append(f"{comp}/")
            continue
        cls = str(index[comp][1])
        if comp.startswith("scheduler") or "Tokenizer" in cls:
            continue
        if not (d / "config.json").is_file():
            out.append(f"{comp}/config.json")
        full = [p for p in d.iterdir() if p.suffix in suffixes and not is_variant(p.name)]
        if not full:
            out.append(f"{comp}/*{suffixes[0]}")
    return out


def is_variant(name: str) -> bool:
    """`diffusion_pytorch_model.fp16.safetensors`, `model.non_ema.bin`: a variant, not the main weights.

    Shards (`model-00001-of-00002.safetensors`) and their index (`model.safetensors.index.json`) are main files.
    """
    return Path(name).suffix in (".safetensors", ".bin") and len(name.split(".")) > 2
