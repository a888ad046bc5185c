"""The teacher stage: the model `models.teacher` names, as a reference (never the networks).

`tiny` is built from `models.tiny` and saved as a diffusers folder in the store; a single checkpoint file is
converted into a diffusers folder in the store once; any other teacher (a folder, an s3:// folder, a hub id)
is pointed at in place (no copy of a multi-GB model). `models.loading.load_model` turns the ModelRef back into
a Model wherever it runs (a worker downloads an s3:// folder once into its local cache). `ModelRef.source` is
the teacher's identity in triplet ids: it changes exactly when the teacher's outputs can change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

from instaflow_core.config import PRETRAINED_TEACHER, ModelsConfig, StorageConfig, stable_hash
from instaflow_core.errors import ConfigError, DataError
from instaflow_core.models.sources import PICKLE_SUFFIXES, is_hub_id
from instaflow_core.refs import ModelKind, ModelRef
from instaflow_core.store import Store

logger = logging.getLogger("instaflow.models.teacher")

_WEIGHT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)


def _weights_hash(folder: Path) -> str:
    """sha256 over the three networks' safetensors files: the tiny teacher's identity is its weights."""
    h = hashlib.sha256()
    for rel in _WEIGHT_FILES:
        path = folder / rel
        if path.is_file():
            h.update(rel.encode())
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:12]


def _dtype_suffix(models_cfg: ModelsConfig) -> str:
    return "" if models_cfg.dtype == "float32" else f":{models_cfg.dtype}"


def _external_uri(source: str) -> str:
    """A teacher source as a URI: store/local paths normalised, hub ids (owner/name) left as they are."""
    if source.startswith(("s3://", "file://")):
        return source
    path = Path(source).expanduser()
    # The same rule as loading.load_source: owner/name is a hub id unless such a path exists here.
    if not is_hub_id(source):
        if not path.exists():
            raise DataError(
                f"models.teacher: {path} does not exist (give a diffusers folder, a file or owner/name)"
            )
        return "file://" + str(path.resolve())
    return source  # a hub id, resolved (from the local cache unless allowed) by sources.local_model_path


def _is_single_file(source: str) -> bool:
    return Path(source).suffix in (".safetensors", *PICKLE_SUFFIXES) and not is_hub_id(source)


def _convert_single_file(models_cfg: ModelsConfig, store: Store, uri: str, config_hash: str) -> None:
    """A single checkpoint file -> a diffusers folder at `uri`, once (a folder made from this file is reused).

    Every later stage then reads a plain folder (the 2-RF copies its VAE and text encoder from it). float32 on
    disk: the conversion is lossless; models.dtype applies when loading.
    """
    from instaflow_core.models.loading import load_source

    meta_uri = f"{uri}/instaflow.json"
    if store.exists(meta_uri) and json.loads(store.read_bytes(meta_uri)).get("config_hash") == config_hash:
        return
    model = load_source(
        models_cfg.teacher, allow_pickle=models_cfg.allow_pickle, local_files_only=models_cfg.local_files_only
    )
    with tempfile.TemporaryDirectory(prefix="instaflow-teacher-") as tmp:
        folder = model.save(Path(tmp) / "teacher")
        source = str(Path(models_cfg.teacher).expanduser().resolve())
        meta = {
            "kind": "teacher",
            "source": source,
            "weights": _weights_hash(folder),
            "config_hash": config_hash,
        }
        (folder / "instaflow.json").write_text(json.dumps(meta))
        store.put_dir(folder, uri, clean=True)
    logger.info("converted %s into the diffusers folder %s", models_cfg.teacher, uri)


def resolve_teacher(models_cfg: ModelsConfig, storage_cfg: StorageConfig) -> ModelRef:
    """The teacher as a ModelRef: `tiny` is built and saved as a diffusers folder under <root>/models/, and so is
    a single checkpoint file (converted once); a local folder, an s3:// folder or a hub id is referenced where
    it is (no copy of a 4 GB model)."""
    config_hash = stable_hash(models_cfg.model_dump(mode="json"))
    if models_cfg.teacher == PRETRAINED_TEACHER:
        raise ConfigError(
            "models.teacher=pretrain: the teacher is trained by the pretrain stage, not resolved "
            "(run `instaflow pretrain` or `instaflow rebuild`)"
        )
    if models_cfg.teacher != "tiny" and _is_single_file(models_cfg.teacher):
        store = Store(storage_cfg)
        uri = store.uri("models", f"teacher-{config_hash}")
        _convert_single_file(models_cfg, store, uri, config_hash)
        ref = ModelRef(
            uri=uri,
            kind=ModelKind.TEACHER,
            config_hash=config_hash,
            source=f"{models_cfg.teacher}{_dtype_suffix(models_cfg)}",
        )
    elif models_cfg.teacher != "tiny":
        uri = _external_uri(models_cfg.teacher)
        rev = f"@{models_cfg.teacher_revision}" if models_cfg.teacher_revision else ""
        ref = ModelRef(
            uri=uri,
            kind=ModelKind.TEACHER,
            config_hash=config_hash,
            source=f"{models_cfg.teacher}{rev}{_dtype_suffix(models_cfg)}",
        )
    else:
        from instaflow_core.models.sd import build_tiny

        store = Store(storage_cfg)
        uri = store.ref("models", f"teacher-{config_hash}")  # store-relative (a moved store resolves it)
        with tempfile.TemporaryDirectory(prefix="instaflow-teacher-") as tmp:
            folder = Path(tmp) / "teacher"
            # float32 on disk always (the tiny weights are built in float32); models.dtype applies when loading.
            build_tiny(models_cfg.tiny).save(folder)
            weights = _weights_hash(folder)
            (folder / "instaflow.json").write_text(
                json.dumps(
                    {"kind": "teacher", "source": "tiny", "weights": weights, "config_hash": config_hash}
                )
            )
            store.put_dir(folder, uri, clean=True)
        ref = ModelRef(
            uri=uri,
            kind=ModelKind.TEACHER,
            config_hash=config_hash,
            source=f"tiny-{weights}{_dtype_suffix(models_cfg)}",
        )
    logger.info("teacher %s -> %s", ref.source, ref.uri)
    return ref
