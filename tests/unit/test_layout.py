"""The house rules, checked: layers point one way, no import cycles, one seam per model family, the presets ship
inside the package.

flows -> tasks -> instaflow_core: core imports neither tasks, flows, Prefect nor MLflow; tasks import no flows.
No rule by line count: a module holds one concept, however long it gets.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support import REPO

LAYERS = ("flows", "tasks", "instaflow_core")
# The SD family's network classes: named only in its module (which holds the tiny factory too) and in tests;
# every stage reaches a network through the model-family seam (instaflow_core/models/family.py).
SD_CLASSES = ("UNet2DConditionModel", "CLIPTextModel", "AutoencoderKL")
SD_FAMILY_MODULES = {"instaflow_core/models/sd.py"}


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (REPO / package).rglob("*.py") if "assets" not in p.parts)


def _imports(path: Path) -> set[str]:
    """Top-level package names a module imports (anywhere in it, lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("instaflow_core", {"flows", "tasks", "prefect", "mlflow", "infra"}), ("tasks", {"flows"})],
)
def test_layers_point_one_way(package: str, forbidden: set[str]) -> None:
    bad = {str(p.relative_to(REPO)): sorted(_imports(p) & forbidden) for p in _modules(package)}
    assert {k: v for k, v in bad.items() if v} == {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in it (imports inside functions count: a cycle hidden
    behind a lazy import is still a cycle)."""
    modules = {_module_name(p): p for pkg in (*LAYERS, "infra") for p in _modules(pkg)}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        edges = set()
        for target in found:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles() -> None:
    assert _cycles(_import_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_sd_network_classes_appear_only_in_the_sd_family_module() -> None:
    """Generation, training, evaluation, inference, export and the demo talk to the family seam only."""
    found = {
        str(p.relative_to(REPO)): sorted(c for c in SD_CLASSES if re.search(rf"\b{c}\b", p.read_text()))
        for pkg in (*LAYERS, "benchmarks")
        for p in sorted((REPO / pkg).rglob("*.py"))
    }
    assert {k: v for k, v in found.items() if v and k not in SD_FAMILY_MODULES} == {}


def test_core_vocabulary_imports_no_experiment() -> None:
    for name in ("config.py", "refs.py", "errors.py", "rectified_flow.py", "overrides.py"):
        assert "experiments" not in _imports(REPO / "instaflow_core" / name), name


def test_core_top_level_holds_the_vocabulary_only() -> None:
    top = sorted(p.name for p in (REPO / "instaflow_core").glob("*.py"))
    assert top == ["__init__.py", "config.py", "errors.py", "overrides.py", "rectified_flow.py", "refs.py"]


def test_flows_hold_flows_and_the_cli_wires_every_group_explicitly() -> None:
    main = (REPO / "flows" / "cli" / "main.py").read_text()
    for group in ("config", "triplets", "models", "schedule", "stack"):
        assert f"app.add_typer({group}.app" in main
    assert "importlib" not in main  # no registration by import side effects, no silently skipped modules


def test_wheel_ships_the_presets_and_a_non_editable_install_finds_them(tmp_path: Path) -> None:
    """`pip install .` (a wheel) must find `--preset tiny` and its bundled captions from any folder."""
    # Build from a copy of the sources: setuptools writes build/ and *.egg-info next to the project it builds.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", *LAYERS, "infra"):
        item = REPO / name
        if item.is_dir():
            shutil.copytree(item, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(item, src / name)
    wheels = tmp_path / "wheels"
    pip_wheel = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(wheels),
        ".",
    ]
    subprocess.run(pip_wheel, check=True, capture_output=True, timeout=300, cwd=src)
    (wheel,) = wheels.glob("instaflow-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for member in (
        "instaflow_core/presets/tiny.yaml",
        "instaflow_core/presets/sd15.yaml",
        "instaflow_core/presets/data/tiny_captions.txt",
        "instaflow_core/models/assets/tiny_clip/vocab.json",
    ):
        assert member in names, member
    # Install the wheel's files on their own (dependencies come from this environment) and run from elsewhere.
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = (
        "import instaflow_core, sys; from flows.cli.main import main; "
        "print(instaflow_core.__file__, file=sys.stderr); main()"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "config", "show", "--preset", "tiny"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert str(site) in out.stderr  # the installed copy ran, not the checkout
    assert "preset: tiny" in out.stdout
    assert "presets/data/tiny_captions.txt" in out.stdout  # the bundled captions resolved inside the package
