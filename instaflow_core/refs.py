"""References that stages hand each other: a URI, a version and a config hash, never tensors.

Prefect persists these as task results and builds cache keys from them, so they must be small and JSON-able.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class TableRef(BaseModel):
    """A LanceDB table at one version."""

    model_config = ConfigDict(frozen=True)

    db_uri: str  # the LanceDB database URI (file path or s3://...)
    table: str
    version: int
    rows: int = 0
    config_hash: str = ""  # hash of the config section that produced it

    def key(self) -> str:
        return f"{self.db_uri}/{self.table}@v{self.version}"


class ModelRef(BaseModel):
    """A diffusers folder in the store (UNet + VAE + text encoder + tokenizer + scheduler)."""

    model_config = ConfigDict(frozen=True)

    uri: str
    kind: str  # teacher | 2rf | instaflow
    config_hash: str = ""
    source: str = ""  # what it was built from (teacher id, table ref key)

    def key(self) -> str:
        return f"{self.kind}:{self.uri}#{self.config_hash}"


class RunRef(BaseModel):
    """An MLflow run / registered model version."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    model_name: str | None = None
    model_version: str | None = None
