"""References that stages hand each other: a URI, a version and a config hash, never tensors.

Prefect persists these as task results and builds cache keys from them, so they must be small and JSON-able.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict

from instaflow_core.errors import ConfigError

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # Python 3.10: the same behaviour (str() and f-strings give the value)

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)


# models.teacher: the pretrain stage trains the teacher (section `pretraining`) instead of resolving one
PRETRAINED_TEACHER = "pretrain"


class Stage(StrEnum):
    """The pipeline's stages, in order. The value is the verb every layer uses for the stage (CLI command,
    Prefect flow `instaflow-<verb>`, artifact keys); `section` is the noun of its config section and modules.
    What each one consumes, makes and needs checked is the stage graph (`GRAPH`, below)."""

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
        return GRAPH[self].sections[0]

    def runs(self, cfg: Any) -> bool:
        """Whether this stage runs under the config (teacher and pretrain exclude each other)."""
        when = GRAPH[self].when
        return when is None or when(cfg)

    @classmethod
    def names(cls) -> list[str]:
        return [s.value for s in cls]


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


# ------------------------------------------------------------------------------------------ the stage graph
class RefName(StrEnum):
    """What stages hand each other, by the name the graph uses and `refs/latest.json` records it under
    (tasks/lineage.remember_refs: a stage run on its own starts from these). A model's name is its kind."""

    PROMPTS = "prompts"  # TableRef: the curated prompts (+ the image table they came from, for pretraining)
    TEACHER = "teacher"  # ModelRef: the teacher, resolved or pretrained (a 1-RF)
    TRIPLETS = "triplets"  # TableRef: the teacher's (prompt, noise seed, latent) triplets
    RF2 = ModelKind.RF2.value  # ModelRef: the 2-Rectified Flow
    DISTILL_PAIRS = "distill_pairs"  # TableRef: the 2-RF's own pairs, made and learnt inside distillation
    INSTAFLOW = ModelKind.INSTAFLOW.value  # ModelRef: the one-step student
    CONTROL = "control"  # ModelRef: distill(teacher), the paper's control (distillation.teacher_control)
    EVALUATION = "evaluation"  # the evaluation result (refs/latest-eval.json)
    REGISTERED = "registered"  # the registered MLflow model version


class Check(StrEnum):
    """The preflight checks (tasks/preflight.py runs them), in their run order: the teacher check yields the
    geometry the resolution check reads."""

    STORAGE = "storage"
    SOURCES = "sources"
    TEACHER = "teacher"
    SAMPLER = "sampler"  # the teacher family's samplers and guidance
    RESOLUTION = "resolution"
    MEMORY = "memory"  # a training plan that cannot fit `gpu_memory_gb`
    LPIPS = "lpips"
    EVALUATION = "evaluation"
    REGISTRY = "registry"
    TRACKING = "tracking"


@dataclass(frozen=True)
class StageSpec:
    """One stage of the graph: the config sections it reads (dotted: a sub-section; a section may be absent),
    what it consumes and makes (by name), the preflight checks it needs, and when it runs (None: always)."""

    sections: tuple[str, ...]
    inputs: tuple[RefName, ...] = ()
    outputs: tuple[RefName, ...] = ()
    checks: tuple[Check, ...] = ()
    optional: tuple[RefName, ...] = ()  # consumed only when configured (the paper's control)
    when: Callable[[Any], bool] | None = None


def _given_teacher(cfg: Any) -> bool:
    """`models.teacher` names a teacher (tiny, a folder, a file, a hub id): the teacher stage resolves it."""
    return cfg.models.teacher != PRETRAINED_TEACHER


def _pretrained_teacher(cfg: Any) -> bool:
    """`models.teacher: pretrain`: the pretrain stage trains the teacher on the curated images."""
    return cfg.models.teacher == PRETRAINED_TEACHER


_R, _C = RefName, Check
# The stage graph, declared once. Derived from it: --refresh (`downstream`), the inputs of a stage command and
# its "run `instaflow X` first" line (`producer`), the rebuild's "which stages ran" (`stage_of_flow`), a
# command's preflight (`checks_for`), and which of teacher / pretrain runs (`Stage.runs`).
GRAPH: dict[Stage, StageSpec] = {
    Stage.TEACHER: StageSpec(
        ("models",), outputs=(_R.TEACHER,), checks=(_C.STORAGE, _C.TEACHER), when=_given_teacher
    ),
    Stage.CURATE: StageSpec(  # counts tokens with the teacher's tokenizer
        ("curation",), outputs=(_R.PROMPTS,), checks=(_C.STORAGE, _C.SOURCES, _C.TEACHER)
    ),
    Stage.PRETRAIN: StageSpec(
        ("pretraining", "digits.model"),
        inputs=(_R.PROMPTS,),
        outputs=(_R.TEACHER,),
        checks=(_C.STORAGE, _C.TEACHER, _C.TRACKING),
        when=_pretrained_teacher,
    ),
    Stage.GENERATE: StageSpec(
        ("generation",),
        inputs=(_R.PROMPTS, _R.TEACHER),
        outputs=(_R.TRIPLETS,),
        checks=(_C.STORAGE, _C.TEACHER, _C.SAMPLER, _C.RESOLUTION),
    ),
    Stage.REFLOW: StageSpec(
        ("reflow",),
        inputs=(_R.TRIPLETS, _R.TEACHER),
        outputs=(_R.RF2,),
        checks=(_C.STORAGE, _C.TEACHER, _C.MEMORY, _C.TRACKING),
    ),
    Stage.DISTILL: StageSpec(
        ("distillation",),
        inputs=(_R.RF2, _R.PROMPTS),
        optional=(_R.TEACHER,),  # distilled alike into the control (distillation.teacher_control)
        outputs=(_R.DISTILL_PAIRS, _R.INSTAFLOW, _R.CONTROL),
        checks=(_C.STORAGE, _C.LPIPS, _C.RESOLUTION, _C.MEMORY, _C.TRACKING),
    ),
    Stage.EVALUATE: StageSpec(
        ("evaluation",),
        inputs=(_R.RF2, _R.INSTAFLOW, _R.TEACHER, _R.PROMPTS),
        optional=(_R.CONTROL,),
        outputs=(_R.EVALUATION,),
        checks=(_C.STORAGE, _C.TEACHER, _C.SAMPLER, _C.EVALUATION, _C.RESOLUTION, _C.TRACKING),
    ),
    Stage.REGISTER: StageSpec(  # the teacher, prompts and triplets: the lineage recorded on the version
        ("registration",),
        inputs=(_R.INSTAFLOW, _R.RF2, _R.EVALUATION, _R.TEACHER, _R.PROMPTS, _R.TRIPLETS),
        outputs=(_R.REGISTERED,),
        checks=(_C.STORAGE, _C.REGISTRY, _C.TRACKING),
    ),
}
FLOW_PREFIX = "instaflow-"  # a stage's Prefect flow is `instaflow-<verb>` (the teacher stage is a task)


def producers(name: str) -> tuple[Stage, ...]:
    """Every stage that makes `name` (the teacher: the teacher stage or the pretrain stage)."""
    return tuple(s for s in Stage if name in GRAPH[s].outputs)


def producer(name: str, cfg: Any = None) -> Stage:
    """The stage that makes `name`; of several (the teacher), the one that runs under `cfg`."""
    makers = [s for s in producers(name) if cfg is None or s.runs(cfg)]
    if len(makers) != 1:
        made_by = " or ".join(makers) or "no stage"
        raise ValueError(f"{name} is made by {made_by}" + ("" if cfg is not None else ": give the config"))
    return makers[0]


def consumers(name: str) -> tuple[Stage, ...]:
    """Every stage that consumes `name` (always or when configured)."""
    return tuple(s for s in Stage if name in GRAPH[s].inputs + GRAPH[s].optional)


def downstream(stages: Iterable[Stage]) -> set[Stage]:
    """The stages and every stage that depends on their outputs, transitively (what --refresh forces)."""
    found = set(stages)
    todo = list(found)
    while todo:
        for name in GRAPH[todo.pop()].outputs:
            for stage in consumers(name):
                if stage not in found:
                    found.add(stage)
                    todo.append(stage)
    return found


def topological_order() -> list[Stage]:
    """The stages, each after every stage whose outputs it consumes (ties in enum order)."""
    after = {s: {p for n in GRAPH[s].inputs + GRAPH[s].optional for p in producers(n)} for s in Stage}
    order: list[Stage] = []
    while len(order) < len(after):
        ready = [s for s in Stage if s not in order and after[s] <= set(order)]
        if not ready:
            raise ValueError(f"the stage graph has a cycle among {sorted(set(Stage) - set(order))}")
        order.append(ready[0])
    return order


def stage_of_flow(flow_name: str) -> Stage | None:
    """The stage whose Prefect flow is `flow_name` (`instaflow-<verb>`); None for another (the rebuild)."""
    if not flow_name.startswith(FLOW_PREFIX):
        return None
    try:
        return Stage(flow_name[len(FLOW_PREFIX) :])
    except ValueError:
        return None


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
