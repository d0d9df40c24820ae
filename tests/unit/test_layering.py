"""The pure core stays pure: nothing in pipeline/ imports ray (STYLE.md, "The house")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PIPELINE_DIR = Path(__file__).resolve().parents[2] / "pipeline"
MODULES = sorted(PIPELINE_DIR.glob("*.py"))


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_pipeline_modules_are_found():
    assert {"ingest.py", "crypto.py", "storage.py"} <= {p.name for p in MODULES}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_pipeline_module_does_not_import_ray_or_serve(path):
    assert not imported_roots(path) & {"ray", "serve", "actors"}
