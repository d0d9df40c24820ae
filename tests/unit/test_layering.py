"""The pure core stays pure and layered (STYLE.md, "The house" and "A layout that grows").

Nothing in pipeline/ imports ray, serve or actors; each sub-package of pipeline/ imports
only itself and the floors below it, in this order (a newcomer reads the architecture off
``ls pipeline``):

    core -> security -> transparency -> media, storage, state -> models, privacy -> retention
    -> jobs
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PIPELINE_DIR = Path(__file__).resolve().parents[2] / "pipeline"
MODULES = sorted(p for p in PIPELINE_DIR.rglob("*.py"))

# The floors, lowest first; packages on one floor may not import each other.
FLOORS: list[set[str]] = [
    {"core"},
    {"security"},
    {"transparency"},
    {"media", "storage", "state"},
    {"models", "privacy"},
    {"retention"},
    {"jobs"},
]
FLOOR_OF = {pkg: n for n, floor in enumerate(FLOORS) for pkg in floor}


def imported_modules(path: Path) -> set[str]:
    """Dotted names of every module ``path`` imports (absolute imports only)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "pipeline":
                found.update(f"pipeline.{alias.name}" for alias in node.names)
    return found


def package_of(path: Path) -> str:
    return path.relative_to(PIPELINE_DIR).parts[0]


def test_pipeline_modules_are_found():
    names = {p.relative_to(PIPELINE_DIR).as_posix() for p in MODULES}
    assert {"media/ingest.py", "security/crypto.py", "storage/base.py",
            "jobs/driver.py"} <= names


def test_every_module_lives_in_a_package_on_a_floor():
    loose = [p.name for p in MODULES if p.parent == PIPELINE_DIR and p.name != "__init__.py"]
    assert not loose, f"pipeline/ holds sub-packages only: {loose}"
    assert {package_of(p) for p in MODULES if p.parent != PIPELINE_DIR} == set(FLOOR_OF)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PIPELINE_DIR).as_posix())
def test_pipeline_module_does_not_import_ray_or_serve(path):
    roots = {name.split(".")[0] for name in imported_modules(path)}
    assert not roots & {"ray", "serve", "actors"}


@pytest.mark.parametrize("path", [p for p in MODULES if p.parent != PIPELINE_DIR],
                         ids=lambda p: p.relative_to(PIPELINE_DIR).as_posix())
def test_pipeline_module_imports_only_its_floor_and_below(path):
    own = package_of(path)
    bad = []
    for name in imported_modules(path):
        parts = name.split(".")
        if parts[0] != "pipeline" or len(parts) < 2 or parts[1] == own:
            continue
        other = parts[1]
        if other not in FLOOR_OF or FLOOR_OF[other] >= FLOOR_OF[own]:
            bad.append(name)
    order = " -> ".join(", ".join(sorted(f)) for f in FLOORS)
    assert not bad, f"pipeline/{own} may import only floors below it ({order}): {bad}"
