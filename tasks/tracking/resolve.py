"""Using a model: a registered version (`NAME@ALIAS`, `NAME/VERSION`) or a folder (path, file://, s3://) as a local
diffusers folder, with what the registry knows about it (lineage, metrics, default steps and guidance).

The registered pyfunc model holds the diffusers folder as its `diffusers` artifact (tasks/registration.py); its
MLmodel file names the folder's path inside the model and the inference defaults (`model_config`). With a local
artifact store (the sqlite registry of `make demo`) the folder is used where it lies, read only; otherwise it is
downloaded once into the cache (`$INSTAFLOW_CACHE_DIR`, as `Store.local_copy`), into a temp folder renamed
into place, so an interrupted download never looks complete.

`record_onnx_export` logs an ONNX export into the version's own run under `onnx/` and tags the version with
where it is (`instaflow.onnx_uri`), so the registry shows the export beside the model it came from.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instaflow_core.config import StorageConfig
from instaflow_core.errors import DataError
from instaflow_core.store import Store, StoreNotFoundError

# = tasks/tracking/pyfunc_model.DIFFUSERS_ARTIFACT (not imported: importing that module registers a model with
# MLflow's models-from-code loader, and warns, in every CLI command)
DIFFUSERS_ARTIFACT = "diffusers"
ONNX_ARTIFACT_PATH = "onnx"
ONNX_URI_TAG = "instaflow.onnx_uri"
ONNX_OPSET_TAG = "instaflow.onnx_opset"


@dataclass
class ResolvedModel:
    """A model ready to load: its local diffusers folder and what is known about it."""

    label: str  # what the user named: instaflow-tiny@champion, ./models/x, s3://bucket/models/x
    folder: Path
    kind: str = ""  # instaflow | 2rf | teacher ("" when unknown: a bare folder)
    defaults: dict[str, Any] = field(default_factory=dict)  # num_inference_steps, guidance_scale
    lineage: dict[str, Any] = field(default_factory=dict)
    name: str | None = None  # registered model name and version (None for a folder)
    version: str | None = None
    run_id: str | None = None


# ------------------------------------------------------------------------------------------- folders
def local_model(source: str, storage: StorageConfig) -> ResolvedModel:
    """A model folder given as a path, file:// or s3:// URI (s3 folders are downloaded once, cached)."""
    if source.startswith(("s3://", "file://")):
        try:
            folder = Store(storage).local_copy(source)
        except StoreNotFoundError as err:
            raise DataError(f"no model folder at {source}") from err
    else:
        folder = Path(source).expanduser()
    if not folder.is_dir():
        raise DataError(f"no model folder at {source}")
    if not (folder / "model_index.json").is_file():
        raise DataError(f"{source}: not a diffusers model folder (no model_index.json)")
    return ResolvedModel(label=source, folder=folder, lineage={"folder": str(folder)})


# ------------------------------------------------------------------------------------------ registry
def lineage_summary(client: Any, mv: Any) -> dict[str, Any]:
    """What the demo shows next to a model: registry version, prompt set, triplet table, teacher, metrics.

    Read from the version's tags alone (written by flows/register.py `lineage_tags`), like `instaflow lineage`.
    """
    tags = dict(mv.tags or {})
    aliases = sorted(
        a for a, v in client.get_registered_model(mv.name).aliases.items() if str(v) == str(mv.version)
    )

    def table(name: str) -> dict[str, str] | None:
        ref, version = tags.get(f"lineage.{name}"), tags.get(f"instaflow.{name}_version")
        return {"ref": ref or "", "table_version": version or ""} if (ref or version) else None

    metrics = {}
    for key, value in tags.items():
        if key.startswith("metric."):
            try:
                metrics[key[len("metric.") :]] = float(value)
            except ValueError:
                metrics[key[len("metric.") :]] = value
    out: dict[str, Any] = {
        "registry": {"model": f"models:/{mv.name}/{mv.version}", "aliases": aliases, "run_id": mv.run_id},
        "kind": tags.get("instaflow.kind", ""),
        "prompts": table("prompts"),
        "triplets": table("triplets"),
        "teacher": tags.get("instaflow.teacher", ""),
        "metrics": metrics,
        "evaluation_run": tags.get("instaflow.eval_run_id", ""),
        "preset": tags.get("instaflow.preset", ""),
        "git_sha": tags.get("instaflow.git_sha", ""),
    }
    if tags.get(ONNX_URI_TAG):
        out["onnx"] = tags[ONNX_URI_TAG]
    return {k: v for k, v in out.items() if v not in (None, "", {}, [])}


def _cache_root() -> Path:
    base = os.environ.get("INSTAFLOW_CACHE_DIR") or str(Path.home() / ".cache" / "instaflow" / "store")
    return Path(base) / "registry"


def _mlmodel(model_uri: str) -> dict[str, Any]:
    """The MLmodel file of a registered model (a few KB), parsed."""
    import mlflow
    import yaml

    with tempfile.TemporaryDirectory(prefix="instaflow-mlmodel-") as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{model_uri}/MLmodel", dst_path=tmp)
        return yaml.safe_load(Path(path).read_text()) or {}


def _diffusers_folder(model_uri: str, mlmodel: dict[str, Any], tracking_uri: str) -> Path:
    """The `diffusers` artifact as a local folder: in place for a local artifact store, else a cached download."""
    import mlflow

    pyfunc = (mlmodel.get("flavors") or {}).get("python_function") or {}
    artifact = (pyfunc.get("artifacts") or {}).get(DIFFUSERS_ARTIFACT) or {}
    rel = artifact.get("path")
    if not rel:
        raise DataError(f"{model_uri} has no {DIFFUSERS_ARTIFACT!r} artifact: not an instaflow model")
    root = str(mlmodel.get("artifact_path") or "")
    if root.startswith("file://") or root.startswith("/"):
        local = Path(root.removeprefix("file://")) / rel
        if (local / "model_index.json").is_file():
            return local
    slot = (
        _cache_root() / hashlib.sha256(f"{tracking_uri}|{mlmodel.get('model_id')}".encode()).hexdigest()[:16]
    )
    final = slot / Path(rel).name
    if (final / "model_index.json").is_file():
        return final
    slot.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=slot))
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{model_uri}/{rel}", dst_path=str(tmp)))
        os.replace(got, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def from_version(client: Any, mv: Any, label: str) -> ResolvedModel:
    """A registered version (found with flows/cli/lineage.find_version) as a local diffusers folder, its
    inference defaults and its lineage; `client` is open on the registry (tracking.client.mlflow_client)."""
    model_uri = f"models:/{mv.name}/{mv.version}"
    mlmodel = _mlmodel(model_uri)
    folder = _diffusers_folder(model_uri, mlmodel, client.tracking_uri)
    config = ((mlmodel.get("flavors") or {}).get("python_function") or {}).get("config") or {}
    defaults = {k: config[k] for k in ("num_inference_steps", "guidance_scale") if k in config}
    return ResolvedModel(
        label=label,
        folder=folder,
        kind=str(config.get("kind") or (mv.tags or {}).get("instaflow.kind", "")),
        defaults=defaults,
        lineage=lineage_summary(client, mv),
        name=mv.name,
        version=str(mv.version),
        run_id=mv.run_id,
    )


# ------------------------------------------------------------------------------------------- exports
def record_onnx_export(client: Any, mv: Any, folder: Path, opset: int) -> str:
    """Log an ONNX export folder into the version's run under `onnx/`; tag the version with its URI."""
    if not mv.run_id:
        raise DataError(f"models:/{mv.name}/{mv.version} has no run to hold the export")
    client.log_artifacts(mv.run_id, str(folder), artifact_path=ONNX_ARTIFACT_PATH)
    uri = f"runs:/{mv.run_id}/{ONNX_ARTIFACT_PATH}"
    client.set_model_version_tag(mv.name, mv.version, ONNX_URI_TAG, uri)
    client.set_model_version_tag(mv.name, mv.version, ONNX_OPSET_TAG, str(opset))
    return uri
