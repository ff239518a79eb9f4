"""Chat and text completions on the real engine and the demo model, in-process (ASGI)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from app.demo_model import script_text
from tests import sse

pytestmark = pytest.mark.anyio

HELLO = [{"role": "user", "content": "Hello!"}]
SCRIPT = script_text()


async def stream_chat(client: httpx.AsyncClient, **body: Any) -> sse.Stream:
    body.setdefault("messages", HELLO)
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        return await sse.aread(r.aiter_lines())


async def chat(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    body.setdefault("messages", HELLO)
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


@pytest.mark.falsifies("QWEN3_MOE_OPENAI_WIRE_V1_002")
async def test_health_and_models(client: httpx.AsyncClient) -> None:
    health = await client.get("/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["qwen3-moe-demo"]


@pytest.mark.falsifies("QWEN3_MOE_OPENAI_WIRE_V1_002")
async def test_greedy_chat_follows_the_demo_script(client: httpx.AsyncClient) -> None:
    result = await chat(client, temperature=0)
    choice = result["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": SCRIPT}
    assert choice["finish_reason"] == "stop"
    assert result["object"] == "chat.completion"


@pytest.mark.falsifies("QWEN3_MOE_STREAMING_SSE_V1_002")
async def test_stream_equals_buffered(client: httpx.AsyncClient) -> None:
    """Content, finish_reason and usage of a greedy stream equal the buffered response."""
    buffered = await chat(client, temperature=0)
    stream = await stream_chat(client, temperature=0, stream_options={"include_usage": True})
    assert "".join(stream.deltas()) == buffered["choices"][0]["message"]["content"]
    assert stream.finish_reasons() == [buffered["choices"][0]["finish_reason"]]
    usage = stream.usage()
    assert usage is not None
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert usage[key] == buffered["usage"][key]


@pytest.mark.falsifies("QWEN3_MOE_OPENAI_WIRE_V1_001")
async def test_stream_framing(client: httpx.AsyncClient) -> None:
    stream = await stream_chat(client, temperature=0, stream_options={"include_usage": True})
    chunks = stream.chunks
    assert stream.payloads[-1] == "[DONE]"
    assert stream.payloads.count("[DONE]") == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {(c["id"], c["created"], c["model"]) for c in chunks} == {
        (chunks[0]["id"], chunks[0]["created"], "qwen3-moe-demo")
    }
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    final, usage_chunk = chunks[-2], chunks[-1]
    assert final["choices"][0]["delta"] == {}
    assert final["choices"][0]["finish_reason"] == "stop"
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["total_tokens"] > 0
    middle = chunks[1:-2]
    assert middle and all(c["choices"][0]["finish_reason"] is None for c in middle)
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in middle)


@pytest.mark.falsifies("QWEN3_MOE_OPENAI_WIRE_V1_001")
async def test_no_usage_chunk_unless_asked(client: httpx.AsyncClient) -> None:
    stream = await stream_chat(client, temperature=0)
    assert stream.usage() is None
    assert stream.chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.falsifies("QWEN3_MOE_TEXT_INTEGRITY_V1_001")
async def test_utf8_characters_arrive_whole(client: httpx.AsyncClient) -> None:
    """The demo script's emoji and accented letter are split over byte tokens."""
    deltas = (await stream_chat(client, temperature=0)).deltas()
    assert all("\ufffd" not in d for d in deltas)
    emoji = next(ch for ch in SCRIPT if ord(ch) > 0xFFFF)
    assert any(emoji in d for d in deltas)
    accented = next(ch for ch in SCRIPT if 0x80 <= ord(ch) <= 0x24F)
    assert any(accented in d for d in deltas)


def _stop_across_tokens() -> str:
    """A stop string from the middle of the script (spans several tokens)."""
    start = len(SCRIPT) // 2
    return SCRIPT[start : start + 7]


@pytest.mark.falsifies("QWEN3_MOE_TEXT_INTEGRITY_V1_002")
async def test_stop_string_is_never_sent(client: httpx.AsyncClient) -> None:
    stop = _stop_across_tokens()
    expected = SCRIPT[: SCRIPT.find(stop)]
    stream = await stream_chat(client, temperature=0, stop=[stop, "never-matches"])
    assert "".join(stream.deltas()) == expected
    assert stream.finish_reasons() == ["stop"]
    buffered = await chat(client, temperature=0, stop=stop)
    assert buffered["choices"][0]["message"]["content"] == expected
    assert buffered["choices"][0]["finish_reason"] == "stop"


@pytest.mark.falsifies("QWEN3_MOE_TEXT_INTEGRITY_V1_003")
async def test_text_held_for_a_stop_that_never_completes_is_released(
    client: httpx.AsyncClient,
) -> None:
    stop = _stop_across_tokens() + "\u2603"  # a prefix of the script followed by a snowman
    stream = await stream_chat(client, temperature=0, stop=stop)
    assert "".join(stream.deltas()) == SCRIPT


@pytest.mark.falsifies("QWEN3_MOE_OPENAI_WIRE_V1_003")
async def test_max_tokens_gives_length_with_exactly_that_many_tokens(
    client: httpx.AsyncClient,
) -> None:
    result = await chat(client, temperature=0, max_tokens=5)
    assert result["choices"][0]["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 5
    assert SCRIPT.startswith(result["choices"][0]["message"]["content"])
    stream = await stream_chat(
        client, temperature=0, max_completion_tokens=5, stream_options={"include_usage": True}
    )
    assert stream.finish_reasons() == ["length"]
    usage = stream.usage()
    assert usage is not None and usage["completion_tokens"] == 5


async def test_multi_turn_chat_reuses_the_cached_prefix(client: httpx.AsyncClient) -> None:
    first = await chat(client, temperature=0)
    history = [
        *HELLO,
        {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
        {"role": "user", "content": "And again?"},
    ]
    second = await chat(client, temperature=0, messages=history)
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    # Qwen3's template drops the reasoning of earlier turns, so the shared prefix is the
    # system/user part of the first prompt at least.
    assert cached >= first["usage"]["prompt_tokens"] - 3
    assert cached < second["usage"]["prompt_tokens"]


async def test_sampled_generation_is_reproducible_with_a_seed(client: httpx.AsyncClient) -> None:
    body = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 1234}
    a = await chat(client, **body)
    b = await chat(client, **body)
    assert a["choices"][0]["message"] == b["choices"][0]["message"]


@pytest.mark.falsifies("QWEN3_MOE_STREAMING_SSE_V1_002", "QWEN3_MOE_OPENAI_WIRE_V1_002")
async def test_text_completion_stream_equals_buffered(client: httpx.AsyncClient) -> None:
    body = {"prompt": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "temperature": 0}
    buffered = (await client.post("/v1/completions", json=body)).json()
    assert buffered["object"] == "text_completion"
    assert buffered["choices"][0]["text"] == SCRIPT
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        stream = await sse.aread(r.aiter_lines())
    assert "".join(stream.deltas()) == SCRIPT
    assert stream.finish_reasons() == ["stop"]
    assert stream.payloads[-1] == "[DONE]"


async def test_text_completion_accepts_token_ids(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/completions", json={"prompt": [10, 20, 30], "max_tokens": 3, "temperature": 0}
    )
    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens"] == 3


async def test_form_encoded_json_body_is_accepted(client: httpx.AsyncClient) -> None:
    """``curl -d '{...}'`` sends JSON as application/x-www-form-urlencoded."""
    response = await client.post(
        "/v1/chat/completions",
        content=b'{"messages":[{"role":"user","content":"hi"}],"temperature":0}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == SCRIPT


async def test_model_alias_and_omitted_model_are_accepted(client: httpx.AsyncClient) -> None:
    for model in ("qwen3-moe-demo", None):
        body: dict[str, Any] = {"messages": HELLO, "max_tokens": 1}
        if model:
            body["model"] = model
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
