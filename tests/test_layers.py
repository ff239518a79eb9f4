"""The layers import only downward: api -> core -> engine, text; nothing runs back up.

Read from the source (every ``import`` and ``from ... import`` of every module, at any depth,
deferred imports included), so a cycle cannot hide behind an import inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[1] / "app"

FORBIDDEN = {
    "core": ("app.api", "app.main", "app.lifespan", "app.draining"),
    "engine": ("app.api", "app.core", "app.main", "app.lifespan", "app.draining"),
    "text": ("app.api", "app.core", "app.engine", "app.main", "app.lifespan", "app.draining"),
}
"""What each layer must not import (a package and everything under it)."""


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def violations(layer: str) -> list[str]:
    out = []
    for path in sorted((APP / layer).rglob("*.py")):
        for module in sorted(imported_modules(path)):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[layer]):
                out.append(f"{path.relative_to(APP.parent)} imports {module}")
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer: str) -> None:
    assert violations(layer) == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The walk finds imports nested in functions, in both import forms."""
    module = tmp_path / "m.py"
    module.write_text(
        "def f():\n    from app.api.openai import requests\n    import app.main\n",
        encoding="utf-8",
    )
    assert {"app.api.openai", "app.api.openai.requests", "app.main"} <= imported_modules(module)


def test_every_api_speaks_to_the_engine_only_through_the_service() -> None:
    """Routes and wires never import the engine's backends or llama.cpp."""
    offending = [
        f"{path.relative_to(APP.parent)} imports {module}"
        for path in sorted((APP / "api").rglob("*.py"))
        for module in sorted(imported_modules(path))
        if module.startswith(("app.engine.batched", "app.engine.llama", "llama_cpp"))
    ]
    assert offending == []
