"""The per-token fast path found by profiling (``python -m bench.profile``).

A token's chunk JSON is rendered from a per-request template instead of a pydantic object,
and events reach sse-starlette already framed as bytes (``app.sse.frame``). Both must be
invisible on the wire: the template renders byte for byte what pydantic would, and the
response keeps sse-starlette's headers and keep-alive comments. (A disconnect cancelling
the generation is held by ``tests/test_streaming_http.py``.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from app.backends import OnToken, TokenLogprobs
from app.backends.llama import LlamaBackend
from app.demo_model import script_text
from app.formats import ChatFormat, CompletionFormat, Format
from app.main import create_app
from app.output import Delta
from app.service import Event
from app.sse import frame
from app.tool_calls import ToolCallDelta
from tests import sse
from tests.conftest import InjectedBackend, LiveServer, settings_for


def _every_character() -> Iterator[str]:
    """All of Unicode but the surrogates, in pieces, plus the characters JSON escapes."""
    points = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    for start in range(0, len(points), 4096):
        yield "".join(map(chr, points[start : start + 4096]))
    yield from ['"', "\\", "\n", "\r\n", "\t", "\x00", "\x1f", "\x7f", "\u2028", "😀", " ", "a"]


def _formats(model: str = "qwen3-moe-demo") -> list[Format]:
    return [
        CompletionFormat(model),
        ChatFormat(
            model, reasoning_field="reasoning_content", token_bytes=lambda t: b"", logprobs=False
        ),
        ChatFormat(model, reasoning_field="reasoning", token_bytes=lambda t: b"", logprobs=False),
    ]


def _same_as_pydantic(fmt: Format, event: Event) -> None:
    assert fmt.event_json(event) == fmt.event_chunk(event).model_dump_json()


def test_text_chunks_render_as_pydantic_does_for_every_character() -> None:
    """Regression guard for the chunk template: json.dumps must escape as pydantic does."""
    for fmt in _formats():
        for text in _every_character():
            _same_as_pydantic(fmt, Event(Delta(content=text)))
            if isinstance(fmt, ChatFormat):
                _same_as_pydantic(fmt, Event(Delta(reasoning=text)))


def test_other_chunks_keep_the_pydantic_path() -> None:
    """Logprobs, tool calls, and a model id that contains the template's marker."""
    with_logprobs = ChatFormat(
        "m", reasoning_field="reasoning_content", token_bytes=lambda t: b"x", logprobs=True
    )
    logprobs = (TokenLogprobs(token_id=5, logprob=-0.25, top=((5, -0.25), (6, -2.0))),)
    _same_as_pydantic(with_logprobs, Event(Delta(content="x"), logprobs))
    call = ToolCallDelta(index=0, id="call_1", name="get_weather", arguments='{"city"')
    for fmt in _formats():
        if isinstance(fmt, ChatFormat):
            _same_as_pydantic(fmt, Event(Delta(tool_call=call)))
    for fmt in _formats(model='odd "<<qwen3-moe-serve text>>" model'):
        _same_as_pydantic(fmt, Event(Delta(content="a\n")))
        assert fmt.event_json(Event(Delta(content="a"))).count('"a"') == 1


def test_frame_writes_one_data_line_per_payload_line() -> None:
    assert frame('{"a":1}') == b'data: {"a":1}\n\n'
    assert frame("[DONE]") == b"data: [DONE]\n\n"
    assert frame("one\ntwo") == b"data: one\ndata: two\n\n"


def _carries_text(kind: str, value: str) -> bool:
    if kind != "data" or value == "[DONE]":
        return False
    choice = json.loads(value)["choices"][0]
    return bool(choice.get("text") or choice.get("delta", {}).get("content"))


class _SlowStart(InjectedBackend):
    """The demo model, after a pause before decoding: a long prefill or a queue, simulated."""

    def __init__(self, inner: LlamaBackend, pause_s: float) -> None:
        super().__init__(inner)
        self._pause_s = pause_s

    def watch(self, on_token: OnToken) -> OnToken:
        time.sleep(self._pause_s)
        return on_token


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_idle_stream_gets_keepalive_comments_and_sse_headers(
    demo_backend: LlamaBackend, route: str
) -> None:
    backend = _SlowStart(demo_backend, pause_s=0.5)
    settings = settings_for(sse_keepalive_s=0.1)
    body = (
        {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "stream": True}
        if route == "/v1/chat/completions"
        else {"prompt": "Hi", "max_tokens": 8, "temperature": 0, "stream": True}
    )
    with (
        LiveServer(create_app(settings, backend=backend)) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
        http.stream("POST", route, json=body) as response,
    ):
        assert response.status_code == 200
        headers = response.headers
        assert headers["content-type"] == "text/event-stream; charset=utf-8"
        assert headers["cache-control"] == "no-cache"
        assert headers["x-accel-buffering"] == "no"
        assert headers["connection"] == "keep-alive"
        lines = list(response.iter_lines())
    events = list(sse.events(lines))
    # The chat stream's first chunk (the role) leaves before the engine starts; the pause
    # comes before the first text.
    first_text = next(i for i, event in enumerate(events) if _carries_text(*event))
    comments = [value for kind, value in events[:first_text] if kind == "comment"]
    assert len(comments) >= 2, events[:first_text]
    assert set(comments) == {"keep-alive"}
    stream = sse.read(lines)
    assert stream.payloads[-1] == "[DONE]"
    if route == "/v1/chat/completions":
        assert "".join(stream.deltas()) == script_text()
