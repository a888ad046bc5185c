"""`--model` for the commands that use a model (sample, interpolate, demo, export, serve).

A model is a registered version (`NAME@ALIAS`, `NAME/VERSION`, `models:/NAME@ALIAS`; a bare name means its
`champion`), a local diffusers folder, or a folder in the store (`file://`, `s3://`). Without `--model` it is the
config's `registration.model_name@champion`: after `make demo`, the one-step model the rebuild promoted.
"""

from __future__ import annotations

import re
from pathlib import Path

import typer

from flows.cli.lineage import find_version, parse_model_ref, resolve_tracking_uri
from flows.cli.options import load_config
from instaflow_core.config import InstaflowConfig, StorageConfig
from instaflow_core.errors import ConfigError, DataError
from instaflow_core.store import Store, StoreNotFoundError
from tasks.tracking.resolve import ResolvedModel, from_version, local_model

ModelOpt = typer.Option(
    None,
    "--model",
    "-m",
    help="NAME@ALIAS, NAME/VERSION, a diffusers folder, or a file:// / s3:// folder "
    "(default: registration.model_name@champion).",
)
TrackingOpt = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: the config's).")

_REGISTERED = re.compile(r"^(models:/)?[^/@\s]+(@[^/@\s]+|/\d+)?$")


def default_model(cfg: InstaflowConfig) -> str:
    return f"{cfg.registration.model_name}@champion"


def is_folder_spec(spec: str) -> bool:
    """True for paths and store URIs, False for registry references."""
    if spec.startswith(("s3://", "file://")) or Path(spec).expanduser().exists():
        return True
    return not _REGISTERED.match(spec)


def registered(spec: str, preset: str, sets: list[str] | None, tracking_uri: str | None) -> ResolvedModel:
    """A registry reference -> the version's local folder, defaults and lineage (one-line errors)."""
    from tasks.tracking.client import mlflow_client

    name, alias, version = parse_model_ref(spec)
    _, (registry, storage) = resolve_tracking_uri(preset, sets, tracking_uri)
    with mlflow_client(registry, storage) as client:
        mv = find_version(client, name, alias, version)
        return from_version(client, mv, spec.removeprefix("models:/"))


def resolve_model(
    spec: str | None, preset: str, sets: list[str] | None, tracking_uri: str | None = None
) -> ResolvedModel:
    """`--model` (or the default champion) as a ResolvedModel."""
    cfg = load_config(preset, sets)
    spec = (spec or default_model(cfg)).strip()
    if not spec:
        raise ConfigError("--model is empty")
    if "://" in spec and not spec.startswith(("s3://", "file://", "models:/")):
        raise ConfigError(
            f"--model {spec}: only file://, s3:// folders and models:/ references are supported"
        )
    if is_folder_spec(spec):
        return local_model(spec, cfg.storage)
    return registered(spec, preset, sets, tracking_uri)


def local_file(source: str, storage: StorageConfig, what: str) -> Path:
    """A file or folder option (LoRA, delta UNets, ControlNet, control image): local path or store URI."""
    if source.startswith(("s3://", "file://")):
        try:
            return Store(storage).local_copy(source)
        except StoreNotFoundError as err:
            raise DataError(f"{what} {source}: not found") from err
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{what} {source}: not found")
    return path
