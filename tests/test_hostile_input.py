"""Hostile input against a real server process: refused with a 400, and the server lives on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server_process import ServerProcess

HELLO = [{"role": "user", "content": "Hello!"}]

# Schemas that llama-cpp-python's converter turns into grammars llama.cpp's parser refuses.
REFUSED_SCHEMAS = {
    "empty_enum": {"enum": []},
    "empty_anyOf": {"anyOf": []},
    "long_maxLength": {"type": "string", "maxLength": 2000},
    "quote_in_property_name": {"type": "object", "properties": {'a"b': {"type": "string"}}},
}


@pytest.fixture(scope="module", params=[1, 4], ids=["parallel1", "parallel4"])
def server(
    request: pytest.FixtureRequest, demo_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    parallel = str(request.param)
    cache = tmp_path_factory.mktemp(f"server-parallel{parallel}")
    args = ("--parallel", parallel, "--n-ctx", "1024", "--n-threads", "1")
    with ServerProcess(demo_model_path, *args, cache_dir=cache) as process:
        yield process


def _bodies(schema: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    for stream in (False, True):
        base = {"messages": HELLO, "max_tokens": 8, "stream": stream}
        yield "response_format", {**base, "response_format": fmt}
        yield "tools", {**base, "tools": [tool], "tool_choice": "required"}


@pytest.mark.slow
@pytest.mark.parametrize("schema", REFUSED_SCHEMAS.values(), ids=REFUSED_SCHEMAS.keys())
def test_a_schema_llama_cpp_cannot_parse_is_a_400_not_a_crash(
    server: ServerProcess, schema: dict[str, Any]
) -> None:
    """Regression: each of these schemas made llama.cpp return a NULL grammar sampler, which
    was then used, killing the process (SIGSEGV) with one unauthenticated request, with
    ``--parallel 1`` and ``--parallel 4``. Now the grammar is parsed while the request is
    prepared and refused in the envelope, naming the field; the server serves on."""
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for param, body in _bodies(schema):
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert (error["param"], error["code"]) == (param, "unsupported_schema")
            assert "llama_" not in error["message"] and "::=" not in error["message"]
            assert server.alive, f"the server died (exit {server.returncode}):\n{server.log()}"
        served = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4})
    assert served.status_code == 200, served.text
    assert served.json()["usage"]["completion_tokens"] == 4
