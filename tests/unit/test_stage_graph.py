"""The stage graph (instaflow_core/refs.py: GRAPH), declared once, and what derives from it: --refresh
(`downstream`, tasks/caching.stage_settings), the stage commands' inputs and "run X first" lines (`producer`,
flows/cli/run.py), the rebuild's stage grouping (`stage_of_flow`, tasks/lineage.py), the preflight checks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from instaflow_core.config import InstaflowConfig, load
from instaflow_core.errors import InstaflowError
from instaflow_core.refs import (
    GRAPH,
    Check,
    ModelRef,
    RefName,
    Stage,
    TableRef,
    consumers,
    downstream,
    producer,
    producers,
    stage_of_flow,
    topological_order,
)
from tests.support import REPO

S = Stage


def _cfg(preset: str, root: Path) -> InstaflowConfig:
    return load(preset, [f"storage.root=file://{root}"])


def test_every_input_is_made_by_an_earlier_stage() -> None:
    order = topological_order()
    assert order == list(Stage)  # the enum lists the stages in an order the graph allows
    for stage, spec in GRAPH.items():
        for name in spec.inputs + spec.optional:
            makers = producers(name)
            assert makers, (stage, name)
            assert all(order.index(m) < order.index(stage) for m in makers), (stage, name, makers)
    assert set(GRAPH) == set(Stage)


@pytest.mark.parametrize("preset", ["tiny", "digits"])
def test_under_a_config_every_input_has_one_producer_that_runs(preset: str, tmp_path: Path) -> None:
    cfg = _cfg(preset, tmp_path)
    running = [s for s in topological_order() if s.runs(cfg)]
    assert (S.TEACHER in running) != (S.PRETRAIN in running)  # one of them makes the teacher
    for stage in running:
        for name in GRAPH[stage].inputs:
            assert producer(name, cfg) in running[: running.index(stage)], (stage, name)


def test_producer() -> None:
    made = {
        RefName.PROMPTS: S.CURATE,
        RefName.TRIPLETS: S.GENERATE,
        RefName.RF2: S.REFLOW,
        RefName.DISTILL_PAIRS: S.DISTILL,
        RefName.INSTAFLOW: S.DISTILL,
        RefName.CONTROL: S.DISTILL,
        RefName.EVALUATION: S.EVALUATE,
        RefName.REGISTERED: S.REGISTER,
    }
    for name, stage in made.items():
        assert producer(name) is stage, name
    assert producers(RefName.TEACHER) == (S.TEACHER, S.PRETRAIN)
    with pytest.raises(ValueError, match="teacher is made by teacher or pretrain"):
        producer(RefName.TEACHER)  # which one depends on models.teacher
    assert set(made) | {RefName.TEACHER} == set(RefName)  # every name has a producer


def test_producer_of_the_teacher_follows_models_teacher(tmp_path: Path) -> None:
    assert producer(RefName.TEACHER, _cfg("tiny", tmp_path)) is S.TEACHER
    assert producer(RefName.TEACHER, _cfg("digits", tmp_path)) is S.PRETRAIN


def test_downstream_of_each_stage() -> None:
    after_teacher = {S.GENERATE, S.REFLOW, S.DISTILL, S.EVALUATE, S.REGISTER}
    expected = {
        S.TEACHER: {S.TEACHER} | after_teacher,  # not curate: it consumes no teacher output
        S.CURATE: {S.CURATE, S.PRETRAIN} | after_teacher,
        S.PRETRAIN: {S.PRETRAIN} | after_teacher,
        S.GENERATE: after_teacher,
        S.REFLOW: {S.REFLOW, S.DISTILL, S.EVALUATE, S.REGISTER},
        S.DISTILL: {S.DISTILL, S.EVALUATE, S.REGISTER},
        S.EVALUATE: {S.EVALUATE, S.REGISTER},
        S.REGISTER: {S.REGISTER},
    }
    for stage, want in expected.items():
        assert downstream([stage]) == want, stage
    assert downstream([]) == set()
    assert downstream([S.EVALUATE, S.CURATE]) == expected[S.CURATE]
    assert consumers(RefName.EVALUATION) == (S.REGISTER,)


def _flow_names() -> list[str]:
    names = []
    for path in sorted((REPO / "flows").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for dec in node.decorator_list:
                    if isinstance(dec, ast.Call) and getattr(dec.func, "id", None) == "flow":
                        names += [k.value.value for k in dec.keywords if k.arg == "name"]
    return names


def test_stage_of_flow_on_every_flow_the_flows_define() -> None:
    names = _flow_names()
    assert len(names) >= 9, names
    found = {name: stage_of_flow(name) for name in names}
    assert found["instaflow-rebuild"] is None and found["instaflow-scheduled-rebuild"] is None
    stages = {stage for stage in found.values() if stage is not None}
    assert stages == set(Stage) - {S.TEACHER}  # every stage but the teacher (a task) has its flow
    for name, stage in found.items():
        if stage is not None:
            assert name == f"instaflow-{stage.value}"
    # exact names, no fragments: an unrelated flow whose name holds a verb is no stage
    assert stage_of_flow("instaflow-evaluate-grid") is None and stage_of_flow("evaluate") is None


def test_sections_name_config_sections(tmp_path: Path) -> None:
    cfg = _cfg("digits", tmp_path)  # every section present (pretraining is absent elsewhere)
    for stage, spec in GRAPH.items():
        assert spec.sections and stage.section == spec.sections[0]
        for path in spec.sections:
            value = cfg
            for part in path.split("."):
                value = getattr(value, part)
            assert value is not None, path
    assert _cfg("tiny", tmp_path).pretraining is None  # the section that may be absent


def test_preflight_per_stage_is_the_graphs() -> None:
    from tasks.preflight import ORDER, STAGE_CHECKS, checks_for

    assert STAGE_CHECKS == {stage: spec.checks for stage, spec in GRAPH.items()}
    assert set(ORDER) == set(Check) == {c for spec in GRAPH.values() for c in spec.checks}
    for stage in Stage:
        assert checks_for([stage]) == [c for c in ORDER if c in GRAPH[stage].checks]


def test_names_shared_with_other_modules() -> None:
    from tasks.evaluation import CONTROL

    assert CONTROL == RefName.CONTROL


# ------------------------------------------------------------------------------------ what derives from it
@pytest.mark.parametrize(
    ("forced", "refreshed"),
    [
        ([S.EVALUATE], {S.EVALUATE, S.REGISTER}),
        ([S.TEACHER], {S.TEACHER, S.GENERATE, S.REFLOW, S.DISTILL, S.EVALUATE, S.REGISTER}),
        ([], set()),
    ],
)
def test_refresh_forces_the_stage_and_what_depends_on_it(forced: list[Stage], refreshed: set[Stage]) -> None:
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE

    from tasks.caching import stage_settings

    got = set()
    for stage in Stage:
        with stage_settings(stage, forced):
            if PREFECT_TASKS_REFRESH_CACHE.value():
                got.add(stage)
    assert got == refreshed


def _remember(cfg: InstaflowConfig, *names: RefName) -> None:
    from tasks.lineage import remember_refs

    fake = {
        name: TableRef(db_uri="store://lance", table=name, version=1)
        if name in (RefName.PROMPTS, RefName.TRIPLETS)
        else ModelRef(uri=f"store://models/{name}", kind="1rf" if name == RefName.TEACHER else name)
        for name in names
    }
    remember_refs(cfg.storage, fake)


@pytest.mark.parametrize(
    ("stage", "stored", "missing", "command"),
    [
        (S.PRETRAIN, (), RefName.PROMPTS, S.CURATE),
        (S.GENERATE, (), RefName.PROMPTS, S.CURATE),
        (S.GENERATE, (RefName.PROMPTS,), RefName.TEACHER, S.PRETRAIN),
        (S.REFLOW, (RefName.TEACHER,), RefName.TRIPLETS, S.GENERATE),
        (S.DISTILL, (RefName.PROMPTS,), RefName.RF2, S.REFLOW),
        (S.EVALUATE, (RefName.PROMPTS, RefName.TEACHER, RefName.RF2), RefName.INSTAFLOW, S.DISTILL),
        (S.REGISTER, (RefName.PROMPTS, RefName.TEACHER, RefName.TRIPLETS), RefName.RF2, S.REFLOW),
    ],
)
def test_stage_commands_name_the_command_that_makes_a_missing_input(
    stage: Stage, stored: tuple[RefName, ...], missing: RefName, command: Stage, tmp_path: Path
) -> None:
    """(the digits preset: its teacher is pretrained, so every input is a stored one)"""
    from flows.cli.run import _inputs

    cfg = _cfg("digits", tmp_path / "store")
    _remember(cfg, *stored)
    with pytest.raises(InstaflowError) as info:
        _inputs(cfg, stage)
    assert str(info.value) == f"no {missing} in {cfg.storage.root} yet: run `instaflow {command}` first"


def test_register_names_evaluate_when_only_the_evaluation_is_missing(tmp_path: Path) -> None:
    from flows.cli.run import _inputs

    cfg = _cfg("digits", tmp_path / "store")
    _remember(cfg, RefName.PROMPTS, RefName.TEACHER, RefName.TRIPLETS, RefName.RF2, RefName.INSTAFLOW)
    with pytest.raises(InstaflowError, match=r"^no evaluation in .* yet: run `instaflow evaluate` first$"):
        _inputs(cfg, S.REGISTER)


def test_a_stage_command_stops_at_its_first_missing_input(tmp_path: Path) -> None:
    """`instaflow distill` on an empty store: after the preflight, one line naming the first command."""
    from typer.testing import CliRunner

    from flows.cli.main import app

    root = f"file://{tmp_path / 'store'}"
    sets = ["--set", f"storage.root={root}", "--set", f"registration.tracking_uri={tmp_path / 'm.db'}"]
    res = CliRunner().invoke(app, ["distill", "--preset", "tiny", *sets])
    assert isinstance(res.exception, InstaflowError), (res.output, repr(res.exception))
    assert str(res.exception) == f"no prompts in {root} yet: run `instaflow curate` first"
