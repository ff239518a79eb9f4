"""Hostile input against a real server process: refused with a 400, and the server lives on."""

from __future__ import annotations

import socket
import time
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


@pytest.fixture(scope="module")
def impatient_server(
    demo_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    cache = tmp_path_factory.mktemp("server-timeouts")
    args = ("--header-timeout-s", "0.5", "--body-timeout-s", "1", "--n-ctx", "1024")
    with ServerProcess(demo_model_path, *args, cache_dir=cache) as process:
        yield process


def _closed_by_the_server(sock: socket.socket) -> bool:
    """True once the server has closed the connection (EOF or a reset), False while open."""
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


@pytest.mark.slow
def test_connections_that_never_finish_their_request_are_closed(
    impatient_server: ServerProcess,
) -> None:
    """Regression: connections that never finished their headers were held forever (250 for
    30 s, 100 for 120 s: none closed). Silent ones, half-sent heads and trickled bodies are
    now closed after the header or body timeout, while the server goes on serving."""
    host, port = "127.0.0.1", impatient_server.port
    body = b'{"messages": [{"role": "user", "content": "Hi"}]}'
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    opened: list[socket.socket] = []
    try:
        for kind in ["silent"] * 40 + ["half head"] * 40 + ["trickled body"] * 10:
            sock = socket.create_connection((host, port))
            if kind == "half head":
                sock.sendall(head[:20])
            elif kind == "trickled body":
                sock.sendall(head + body[:5])
            sock.setblocking(False)
            opened.append(sock)
        with httpx.Client(base_url=impatient_server.url, timeout=30) as http:
            served = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3})
        assert served.status_code == 200
        assert served.json()["usage"]["completion_tokens"] == 3
        open_ = list(opened)
        deadline = time.monotonic() + 60
        while open_ and time.monotonic() < deadline:
            open_ = [sock for sock in open_ if not _closed_by_the_server(sock)]
            time.sleep(0.05)
        assert not open_, f"{len(open_)} of {len(opened)} connections are still open"
        assert impatient_server.alive
    finally:
        for sock in opened:
            sock.close()
