"""The house rules, checked: layers point one way, files stay small, the presets ship inside the package.

flows -> tasks -> instaflow_core: core imports neither tasks, flows, Prefect nor MLflow; tasks import no flows.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support import REPO

LAYERS = ("flows", "tasks", "instaflow_core")
MAX_LINES = 400


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


def test_no_module_over_the_size_limit() -> None:
    sizes = {
        str(p.relative_to(REPO)): len(p.read_text().splitlines()) for pkg in LAYERS for p in _modules(pkg)
    }
    assert {k: n for k, n in sizes.items() if n > MAX_LINES} == {}


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
