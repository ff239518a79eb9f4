"""The editor plugins' own requests (``tests/editor_clients.py``, written from their sources)
against a real uvicorn over a socket, on the batching engine, read back the way each plugin
reads its answer.

The model answers every prompt with a short code completion (``tests/test_infill.py``'s
``CODE``); the plugins sample (temperature 1, top-k 40), which the demo model's logit margins
leave on the script. llama.vim's first request at a place may end at a newline once it has
taken 250 ms (``t_max_predict_ms``), so its completion is checked as the script's text up to
a newline, or all of it.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from app.demo import ensure_demo_model
from app.engine.batched import BatchedLlamaBackend
from app.main import create_app
from tests import editor_clients as clients
from tests.support.models import engine_config
from tests.support.servers import LiveServer, settings_for
from tests.test_infill import ANSWER, CODE

SOURCE = [
    "import os",
    "",
    "",
    "def add(a, b):",
    "",
    "",
    "def main():",
    "    print(add(1, 2))",
    "",
]
N_CTX = 8192
"""Room for Continue's default ``max_tokens`` of 4096 (a real Qwen3-Coder has 262,144)."""
MODEL = "qwen3-coder"
"""The name the server is started with (``--model-alias``), as docs/editors.md says: Continue
picks Qwen's template by a model name holding "qwen" and "coder"."""
CURSOR_LINE = 5  # the blank line inside add(), as Vim numbers lines
RING = [
    clients.Chunk(tuple(f"helper_{n}_{i} = {i}" for i in range(20)), f"helpers{n}.py", n)
    for n in range(3)
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    path = ensure_demo_model(tmp_path_factory.mktemp("plugins"), CODE)
    backend = BatchedLlamaBackend(
        engine_config(path, n_ctx=N_CTX, n_batch=256, cache_reuse=32), parallel=3
    )
    try:
        app = create_app(settings_for(model_alias=MODEL), backend=backend)
        with LiveServer(app) as live:
            yield live
    finally:
        backend.close()


@dataclass(frozen=True)
class Answer:
    status_code: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def send(server: LiveServer, request: clients.ClientRequest) -> Answer:
    """The request as the plugin's HTTP client sends it, headers byte for byte (llama.vim's
    curl sends ``Authorization: Bearer `` with nothing after it, which httpx refuses)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        headers = {"Content-Type": "application/json", **request.headers}
        connection.request("POST", request.path, json.dumps(request.body), headers)
        response = connection.getresponse()
        return Answer(response.status, response.read().decode())
    finally:
        connection.close()


def stream_payloads(server: LiveServer, request: clients.ClientRequest) -> list[str]:
    with httpx.stream(
        "POST", server.url + request.path, json=request.body, headers=request.headers, timeout=60
    ) as response:
        assert response.status_code == 200, response.read()
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    return [line.removeprefix("data: ") for line in lines]


def a_completion(content: str) -> bool:
    """The script's text, or (a time limit) its text up to a newline."""
    return content == ANSWER or (ANSWER.startswith(content) and content.endswith("\n"))


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_002", "QWEN3_MOE_EDITOR_FIM_V1_004")
def test_llama_vim(server: LiveServer) -> None:
    warm = send(server, clients.llama_vim_ring_update(RING))
    assert warm.status_code == 200 and warm.json() == {}
    request = clients.llama_vim_fim(SOURCE, CURSOR_LINE, 0, ring=RING)
    response = send(server, request)
    assert response.status_code == 200, response.text
    assert clients.llama_vim_accepts_response(response.text)
    answer = response.json()
    assert set(answer) == set(clients.LLAMA_VIM_RESPONSE_FIELDS)
    assert a_completion(answer["content"])
    # the ring was decoded by the warm-up: this request decodes the text around the cursor
    assert answer["tokens_cached"] > answer["timings/prompt_n"]


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_002", "QWEN3_MOE_EDITOR_FIM_V1_004")
def test_llama_vscode(server: LiveServer) -> None:
    """Its defaults: three completions per request and the chat model's name
    (``google/gemini-2.5-flash``) as ``model``."""
    assert send(server, clients.llama_vscode_warmup(RING)).status_code == 200
    request = clients.llama_vscode_fim(SOURCE, CURSOR_LINE - 1, 0, chunks=RING)
    assert request.body["n_cmpl"] == 3
    response = send(server, request)
    assert response.status_code == 200, response.text
    answers: list[dict[str, Any]] = response.json()
    assert [answer["index"] for answer in answers] == [0, 1, 2]
    assert clients.llama_vscode_suggestions(answers) == [ANSWER]  # three alike, deduplicated
    one = send(server, clients.llama_vscode_fim(SOURCE, 3, 0, max_parallel_completions=1)).json()
    assert one["generation_settings"]["n_ctx"] == N_CTX  # its status line reads it
    for key in ("prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms"):
        assert key in one["timings"]


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_002")
def test_continue_with_the_openai_provider(server: LiveServer) -> None:
    """Continue renders Qwen's repository-level template itself and streams the raw prompt
    from /v1/completions."""
    model = MODEL
    assert clients.continue_uses_qwen_template(model)
    prefix, suffix = "def add(a, b):\n", "\n\nprint(add(1, 2))\n"
    snippets = [clients.Snippet("src/util.py", "def helper():\n    return 1\n")]
    request = clients.continue_openai_autocomplete(
        prefix, suffix, model=model, filepath="src/app.py", snippets=snippets
    )
    payloads = stream_payloads(server, request)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks if chunk["choices"]) == ANSWER


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_002")
def test_tabby_openai_completion(server: LiveServer) -> None:
    """Tabby sends the text after the cursor as OpenAI's ``suffix`` and reads the stream
    strictly: every event a completion chunk until one carries a finish_reason."""
    request = clients.tabby_openai_completion(
        "def add(a, b):\n", "\n\nprint(add(1, 2))\n", model_name=MODEL
    )
    assert request.body["suffix"]
    assert clients.tabby_read_stream(stream_payloads(server, request)) == ANSWER
