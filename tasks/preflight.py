"""Preflight for a command: the checks its stages need (instaflow_core.preflight.checks + MLflow reachability).

`instaflow check` runs them alone; `instaflow rebuild` and every stage command run them before any work
(flows/cli/run.py), so a run that would fail hours in fails in seconds, every problem named, nothing written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from instaflow_core.config import InstaflowConfig
from instaflow_core.preflight import checks
from instaflow_core.preflight.checks import PreflightError
from instaflow_core.refs import GRAPH, Check, Stage

# Which checks each stage needs: the stage graph's (a rebuild: all of them), kept here by name for importers.
STAGE_CHECKS: dict[Stage, tuple[Check, ...]] = {stage: spec.checks for stage, spec in GRAPH.items()}
ORDER: tuple[Check, ...] = tuple(
    Check
)  # the run order: the teacher check yields the resolution check's geometry


def tracking_problems(cfg: InstaflowConfig) -> list[str]:
    """The MLflow tracking server answers, or the sqlite registry's folder can be created (nothing created)."""
    from tasks.tracking.client import server_answers, tracking_uri, unreachable

    uri = tracking_uri(cfg.registration, cfg.storage)
    if uri.startswith(("http://", "https://")):
        return [] if server_answers(uri, timeout=3.0) else [str(unreachable(uri))]
    if uri.startswith("sqlite:///"):
        problem = checks.creatable_problem(Path(uri[len("sqlite:///") :]).parent, "MLflow registry (sqlite)")
        return [problem] if problem else []
    return []  # databricks, postgresql, ...: MLflow's own client reports those


@dataclass
class CheckResult:
    name: str
    problems: list[str]
    seconds: float


@dataclass
class PreflightReport:
    results: list[CheckResult] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [p for r in self.results for p in r.problems]

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise PreflightError(self.problems)


def checks_for(stages: Iterable[Stage] | None) -> list[Check]:
    """The checks the stages need (the graph's), in run order (None: every stage, as a rebuild)."""
    wanted = set().union(*(GRAPH[s].checks for s in (stages if stages is not None else list(Stage))))
    return [name for name in ORDER if name in wanted]


def run_preflight(cfg: InstaflowConfig, stages: Iterable[Stage] | None = None) -> PreflightReport:
    """Run every check the stages need and collect all problems (one failing check never hides the others)."""
    geometry: list = [None]

    def teacher() -> list[str]:
        problems, geometry[0] = checks.teacher_problems(cfg.models, cfg.storage)
        return problems

    runners: dict[Check, Callable[[], list[str]]] = {
        Check.STORAGE: lambda: checks.storage_problems(cfg.storage),
        Check.SOURCES: lambda: checks.source_problems(cfg.curation, cfg.storage),
        Check.TEACHER: teacher,
        Check.SAMPLER: lambda: checks.setting_problems(cfg),  # the settings the teacher's family takes
        Check.RESOLUTION: lambda: checks.resolution_problems(cfg, geometry[0]),
        Check.MEMORY: lambda: checks.memory_problems(cfg),  # training sections with gpu_memory_gb set
        Check.LPIPS: lambda: checks.lpips_problems(cfg.distillation),
        Check.EVALUATION: lambda: checks.evaluation_problems(cfg.evaluation, cfg.models, cfg.storage),
        Check.REGISTRY: lambda: checks.registry_problems(cfg.registration),
        Check.TRACKING: lambda: tracking_problems(cfg),
    }
    names = checks_for(stages)
    if (
        Check.RESOLUTION in names and Check.TEACHER not in names
    ):  # the geometry comes from the teacher's configs
        names.insert(names.index(Check.RESOLUTION), Check.TEACHER)
    report = PreflightReport()
    for name in names:
        t0 = time.perf_counter()
        try:
            problems = runners[name]()
        except Exception as err:  # noqa: BLE001 - a check that breaks is itself a problem to report
            problems = [f"{name} check failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}"]
        report.results.append(CheckResult(str(name), problems, time.perf_counter() - t0))
    return report


def require_preflight(cfg: InstaflowConfig, stages: Iterable[Stage] | None = None) -> PreflightReport:
    """run_preflight, raising PreflightError (every problem, one line each) when anything is wrong."""
    report = run_preflight(cfg, stages)
    report.raise_if_failed()
    return report
