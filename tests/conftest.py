"""The suite's plugins: shared fixtures live in ``tests/support`` modules, by purpose.

Tests run on the real engine on the project's own GGUFs (``tests.support.models``),
in-process and over a real socket (``tests.support.clients``, ``tests.support.servers``);
fault injection wraps the real engine (``tests.support.injection``). Helpers are imported
from those modules, never from this file.
"""

from __future__ import annotations

import pytest

# The contract plugin binds tests to falsifiers and writes findings.json; pytester tests it.
pytest_plugins = [
    "pytester",
    "tests.contracts_plugin",
    "tests.support.models",
    "tests.support.servers",
    "tests.support.clients",
]


@pytest.fixture
def anyio_backend() -> str:
    """Tests marked ``pytest.mark.anyio`` run on asyncio (not trio)."""
    return "asyncio"
