"""Tiny random-weight model builders live apart from the production model code: only the
loader that decides "weights absent and allowed -> build tiny ones" imports them."""

from __future__ import annotations

import ast
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parents[2] / "pipeline" / "models"
ALLOWED = {"loading.py", "tiny.py"}


def _imports_tiny(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            if any(a.name == "pipeline.models.tiny" or a.name.startswith("pipeline.models.tiny.")
                   for a in node.names):
                return True
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0:
                if module == "pipeline.models.tiny" or (
                        module == "pipeline.models" and any(a.name == "tiny" for a in node.names)):
                    return True
            elif module == "tiny" or (not module and any(a.name == "tiny" for a in node.names)):
                return True  # relative: from .tiny import ... / from . import tiny
    return False


def test_tiny_module_exists():
    assert (MODELS_DIR / "tiny.py").is_file()


def test_only_loading_imports_the_tiny_builders():
    offenders = [p.name for p in sorted(MODELS_DIR.glob("*.py"))
                 if p.name not in ALLOWED and _imports_tiny(p)]
    assert not offenders, f"production model code imports pipeline.models.tiny: {offenders}"


def test_loading_does_import_the_tiny_builders():
    assert _imports_tiny(MODELS_DIR / "loading.py")
