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
from pathlib import Path

from prefect import task

from instaflow_core.config import ModelsConfig, StorageConfig, stable_hash
from instaflow_core.errors import DataError
from instaflow_core.refs import ModelRef
from instaflow_core.store import Store
from tasks.artifacts import lineage_markdown, publish_markdown
from tasks.caching import stage_cache_key
from tasks.retries import STORE_RETRIES

logger = logging.getLogger("instaflow.tasks.teacher")

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


@task(cache_key_fn=stage_cache_key, persist_result=True, name="teacher-resolve", **STORE_RETRIES)
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
        from instaflow_core.models.tiny import build_tiny

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
