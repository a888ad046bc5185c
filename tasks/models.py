"""The teacher as a reference: the tiny one built and saved into the store, any other one pointed at in place.

`teacher_model` returns a ModelRef (never the networks); `load_model` turns a ModelRef back into SDComponents
wherever it runs (a worker downloads an s3:// folder once into its local cache). `ModelRef.source` is the
teacher's identity in triplet ids: it changes exactly when the teacher's outputs can change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

from prefect import task

from instaflow_core.config import ModelsConfig, StorageConfig, stable_hash
from instaflow_core.errors import DataError
from instaflow_core.refs import ModelRef
from instaflow_core.store import Store
from tasks.common import lineage_markdown, publish_markdown, stage_cache_key

logger = logging.getLogger("instaflow.tasks.models")

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
    # The same rule as models.load_components: owner/name is a hub id unless such a path exists here.
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        if not path.exists():
            raise DataError(
                f"models.teacher: {path} does not exist (give a diffusers folder, a file or owner/name)"
            )
        return "file://" + str(path.resolve())
    return source  # a hub id, resolved (from the local cache unless allowed) when loaded


@task(cache_key_fn=stage_cache_key, persist_result=True, name="teacher-model")
def teacher_model(models_cfg: ModelsConfig, storage_cfg: StorageConfig) -> ModelRef:
    """The teacher as a ModelRef: `tiny` is built and saved as a diffusers folder under <root>/models/; a local
    folder or file, an s3:// folder or a hub id is referenced where it is (no copy of a 4 GB model)."""
    config_hash = stable_hash(models_cfg.model_dump(mode="json"))
    if models_cfg.teacher != "tiny":
        uri = _external_uri(models_cfg.teacher)
        rev = f"@{models_cfg.teacher_revision}" if models_cfg.teacher_revision else ""
        ref = ModelRef(
            uri=uri,
            kind="teacher",
            config_hash=config_hash,
            source=f"{models_cfg.teacher}{rev}{_dtype_suffix(models_cfg)}",
        )
    else:
        from instaflow_core.models import build_tiny

        store = Store(storage_cfg)
        uri = store.uri("models", f"teacher-{config_hash}")
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
            kind="teacher",
            config_hash=config_hash,
            source=f"tiny-{weights}{_dtype_suffix(models_cfg)}",
        )
    publish_markdown(
        "instaflow-teacher",
        lineage_markdown("teacher", {"models.teacher": models_cfg.teacher}, {"teacher": ref}),
        description="The teacher model reference",
    )
    logger.info("teacher %s -> %s", ref.source, ref.uri)
    return ref


# --------------------------------------------------------------------------------------------- loading
_cache: dict[tuple[str, str, str], Any] = {}
_cache_lock = threading.Lock()


def load_model(ref: ModelRef, storage_cfg: StorageConfig, models_cfg: ModelsConfig | None = None) -> Any:
    """SDComponents for a ModelRef (s3:// folders are downloaded once via Store.local_copy).

    `models_cfg` supplies dtype / revision / allow_pickle / local_files_only for external teachers; models
    saved by the pipeline are safetensors diffusers folders and load with the defaults.
    """
    from instaflow_core.models import load_components

    cfg = models_cfg or ModelsConfig()
    source = ref.uri
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
    uri = ref.uri
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
    from instaflow_core.models import latent_shape

    return latent_shape(load_model_cached(ref, storage_cfg, models_cfg))
