"""References that stages hand each other: a URI, a version and a config hash, never tensors.

Prefect persists these as task results and builds cache keys from them, so they must be small and JSON-able.
"""

from __future__ import annotations

import sys
from enum import Enum

from pydantic import BaseModel, ConfigDict

from instaflow_core.errors import ConfigError

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # Python 3.10: the same behaviour (str() and f-strings give the value)

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)


class Stage(StrEnum):
    """The pipeline's stages, in order. The value is the verb every layer uses for the stage (CLI command,
    Prefect flow `instaflow-<verb>`, artifact keys); `section` is the noun of its config section and modules."""

    TEACHER = "teacher"
    CURATE = "curate"
    PRETRAIN = "pretrain"  # trains the teacher on the curated images when models.teacher is `pretrain`
    GENERATE = "generate"
    REFLOW = "reflow"
    DISTILL = "distill"
    EVALUATE = "evaluate"
    REGISTER = "register"

    @property
    def section(self) -> str:
        return _SECTIONS[self]

    @classmethod
    def names(cls) -> list[str]:
        return [s.value for s in cls]


_SECTIONS = {
    Stage.TEACHER: "models",
    Stage.CURATE: "curation",
    Stage.PRETRAIN: "pretraining",
    Stage.GENERATE: "generation",
    Stage.REFLOW: "reflow",
    Stage.DISTILL: "distillation",
    Stage.EVALUATE: "evaluation",
    Stage.REGISTER: "registration",
}


class ModelKind(StrEnum):
    """What a model folder is: the teacher, the 2-Rectified Flow (reflow's output) or the one-step InstaFlow; a
    teacher the pipeline pretrains is a 1-Rectified Flow (`1rf`), sampled by Euler steps like the 2-RF."""

    TEACHER = "teacher"
    RF1 = "1rf"
    RF2 = "2rf"
    INSTAFLOW = "instaflow"

    @classmethod
    def trained(cls) -> tuple[ModelKind, ...]:
        """The kinds the pipeline trains (in order): the 2-RF, then InstaFlow."""
        return (cls.RF2, cls.INSTAFLOW)


def parse_stages(names: list[str] | None, what: str = "--refresh") -> list[Stage]:
    """Stage names (`--refresh reflow`) -> Stages, or a ConfigError naming the unknown one."""
    out = []
    for name in names or []:
        try:
            out.append(Stage(name))
        except ValueError as err:
            raise ConfigError(f"{what} {name!r}: choose from {', '.join(Stage.names())}") from err
    return out


# The model each training stage makes (the one mapping from stage to model kind).
TRAINED_KIND = {
    Stage.PRETRAIN: ModelKind.RF1,
    Stage.REFLOW: ModelKind.RF2,
    Stage.DISTILL: ModelKind.INSTAFLOW,
}


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
    kind: ModelKind
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
