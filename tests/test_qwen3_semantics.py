"""Qwen3 semantics on the real engine: thinking, tool calls, structured output, logprobs.

Each behaviour runs on a scripted demo model whose greedy output is exactly the text under
test (``write_demo_model`` takes the script), so every expectation below is derived from the
script, not hard-coded model output.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import openai
import pytest

from app.demo import DEFAULT_SCRIPT
from app.engine import Backend
from app.main import create_app
from tests.chat import both, chat_client, delta_field, script_text, streamed_calls
from tests.scripts import (
    ANSWER,
    ANSWER_ONLY_SCRIPT,
    JSON_SCRIPT,
    MALFORMED_CALL_SCRIPT,
    NO_THINK_SCRIPT,
    PARALLEL_CALL_SCRIPT,
    RAW_NEWLINE_JSON_SCRIPT,
    SINGLE_CALL_SCRIPT,
    THINKING_ONLY_SCRIPT,
    THOUGHT,
    TIME_TOOL,
    WEATHER_TOOL,
)
from tests.support.clients import HELLO
from tests.support.models import ENGINES
from tests.support.servers import LiveServer, settings_for

pytestmark = pytest.mark.anyio


# -- reasoning ------------------------------------------------------------------------------


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_001")
async def test_thinking_goes_to_reasoning_content_token_by_token(
    demo_backend: Backend,
) -> None:
    async with chat_client(demo_backend) as client:
        buffered, stream = await both(client)
    message = buffered["choices"][0]["message"]
    assert message["reasoning_content"] == THOUGHT
    assert message["content"] == ANSWER
    reasoning, content = delta_field(stream, "reasoning_content"), delta_field(stream, "content")
    assert "".join(reasoning) == message["reasoning_content"]
    assert "".join(content) == message["content"]
    assert len(reasoning) > 10, "reasoning must stream as it is decoded, not in one piece"
    assert not any("<think>" in c or "</think>" in c for c in content + reasoning)


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_001")
async def test_reasoning_field_name_is_a_setting(demo_backend: Backend) -> None:
    async with chat_client(demo_backend, reasoning_format="reasoning") as client:
        buffered, stream = await both(client)
    message = buffered["choices"][0]["message"]
    assert message["reasoning"] == THOUGHT and "reasoning_content" not in message
    assert "".join(delta_field(stream, "reasoning")) == THOUGHT
    async with chat_client(demo_backend, reasoning_format="none") as client:
        raw, _ = await both(client)
    assert raw["choices"][0]["message"]["content"].startswith("<think>\nOkay")


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_002")
async def test_enable_thinking_false_renders_the_prefill_and_fills_no_reasoning(
    scripted: Callable[..., Backend],
) -> None:
    backend = scripted(ANSWER_ONLY_SCRIPT)
    async with chat_client(backend) as client:
        buffered, stream = await both(client, chat_template_kwargs={"enable_thinking": False})
        prompt_off = buffered["usage"]["prompt_tokens"]
        default, _ = await both(client)
    message = buffered["choices"][0]["message"]
    assert message == {"role": "assistant", "content": script_text(ANSWER_ONLY_SCRIPT)}
    assert not delta_field(stream, "reasoning_content")
    # The template pre-fills "<think>\n\n</think>\n\n": the prompt is longer by those tokens.
    assert prompt_off > default["usage"]["prompt_tokens"]


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_002")
async def test_server_wide_thinking_off_leaves_reasoning_empty(demo_backend: Backend) -> None:
    """The model may still think (the demo one does); its answer must not land in reasoning."""
    async with chat_client(demo_backend, enable_thinking=False) as client:
        buffered, stream = await both(client)
    message = buffered["choices"][0]["message"]
    assert "reasoning_content" not in message
    assert message["content"].endswith(ANSWER)
    assert not delta_field(stream, "reasoning_content")


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_002")
async def test_no_think_soft_switch_drops_the_empty_think_block(
    scripted: Callable[..., Backend],
) -> None:
    backend = scripted(NO_THINK_SCRIPT)
    messages = [{"role": "user", "content": "Tell me something /no_think"}]
    async with chat_client(backend) as client:
        buffered, stream = await both(client, messages=messages)
        thinking, _ = await both(
            client, messages=[{"role": "user", "content": "x /no_think /think"}]
        )
    assert buffered["choices"][0]["message"] == {"role": "assistant", "content": "Sure, here."}
    assert "".join(delta_field(stream, "content")) == "Sure, here."
    # The latest switch wins: /think after /no_think means an (empty) reasoning block.
    assert thinking["choices"][0]["message"]["content"] == "Sure, here."


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_001")
async def test_thinking_only_answer_has_empty_content(
    scripted: Callable[..., Backend],
) -> None:
    async with chat_client(scripted(THINKING_ONLY_SCRIPT)) as client:
        buffered, stream = await both(client)
    message = buffered["choices"][0]["message"]
    assert message["reasoning_content"] == "Hmm, nothing to add."
    assert message["content"] == ""
    assert "".join(delta_field(stream, "reasoning_content")) == "Hmm, nothing to add."


# -- tool calls -----------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_003")
async def test_single_tool_call_buffered_and_streamed(
    scripted: Callable[..., Backend], engine: str
) -> None:
    async with chat_client(scripted(SINGLE_CALL_SCRIPT, engine)) as client:
        buffered, stream = await both(client, tools=[WEATHER_TOOL])
    choice = buffered["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    assert message["reasoning_content"] == "The user asks weather."
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "C"}
    (rebuilt,) = streamed_calls(stream)
    assert (rebuilt["name"], rebuilt["arguments"]) == ("get_weather", call["function"]["arguments"])
    assert stream.finish_reasons() == ["tool_calls"]
    assert not delta_field(stream, "content"), "no tag text may leak into content"
    fragments = [
        c for c in stream.chunks if c["choices"] and c["choices"][0]["delta"].get("tool_calls")
    ]
    assert len(fragments) > 3, "arguments must stream as they are decoded"


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_003")
async def test_parallel_tool_calls(scripted: Callable[..., Backend]) -> None:
    async with chat_client(scripted(PARALLEL_CALL_SCRIPT)) as client:
        buffered, stream = await both(client, tools=[WEATHER_TOOL, TIME_TOOL])
    calls = buffered["choices"][0]["message"]["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo"}),
        ("get_time", {"tz": "CET"}),
    ]
    assert len({c["id"] for c in calls}) == 2
    rebuilt = streamed_calls(stream)
    assert [(c["name"], c["arguments"]) for c in rebuilt] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in calls
    ]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_003")
async def test_parallel_tool_calls_false_ends_after_the_first_call(
    scripted: Callable[..., Backend], engine: str
) -> None:
    async with chat_client(scripted(PARALLEL_CALL_SCRIPT, engine)) as client:
        buffered, stream = await both(
            client, tools=[WEATHER_TOOL, TIME_TOOL], parallel_tool_calls=False
        )
    (call,) = buffered["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert buffered["choices"][0]["finish_reason"] == "tool_calls"
    # Decoding stopped at the first call's closing tag, before the second call.
    assert buffered["usage"]["completion_tokens"] == PARALLEL_CALL_SCRIPT.index(b"</tool_call>") + 1
    assert [c["name"] for c in streamed_calls(stream)] == ["get_weather"]


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_004")
async def test_tool_calls_are_plain_text_without_tools(
    scripted: Callable[..., Backend],
) -> None:
    async with chat_client(scripted(PARALLEL_CALL_SCRIPT)) as client:
        buffered, _ = await both(client)
        none, _ = await both(client, tools=[WEATHER_TOOL], tool_choice="none")
    for result in (buffered, none):
        assert result["choices"][0]["finish_reason"] == "stop"
        assert result["choices"][0]["message"]["content"] == script_text(PARALLEL_CALL_SCRIPT)


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_004")
async def test_malformed_tool_call_is_returned_as_content(
    scripted: Callable[..., Backend],
) -> None:
    async with chat_client(scripted(MALFORMED_CALL_SCRIPT)) as client:
        buffered, stream = await both(client, tools=[WEATHER_TOOL])
    message = buffered["choices"][0]["message"]
    assert message["content"] == script_text(MALFORMED_CALL_SCRIPT)
    assert "tool_calls" not in message
    assert buffered["choices"][0]["finish_reason"] == "stop"
    assert "".join(delta_field(stream, "content")) == message["content"]


async def test_history_with_tool_calls_and_tool_results_is_accepted(
    scripted: Callable[..., Backend],
) -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    async with chat_client(scripted(ANSWER_ONLY_SCRIPT)) as client:
        buffered, _ = await both(client, messages=history, tools=[WEATHER_TOOL])
    assert buffered["choices"][0]["message"]["content"] == script_text(ANSWER_ONLY_SCRIPT)


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_005")
async def test_forced_tool_choice_constrains_decoding(demo_engine: Backend) -> None:
    """The demo model wants to answer in prose; a named tool_choice forces a call instead."""
    body = {
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        "max_tokens": 80,
    }
    async with chat_client(demo_engine) as client:
        buffered, stream = await both(client, **body)
    message = buffered["choices"][0]["message"]
    assert message["reasoning_content"] == THOUGHT  # thinking is allowed before the call
    assert message["content"] is None
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_time"]
    assert [c["name"] for c in streamed_calls(stream)] == ["get_time"]


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_003")
async def test_openai_sdk_accumulates_streamed_tool_calls(
    scripted: Callable[..., Backend],
) -> None:
    app = create_app(
        settings_for(reasoning_format="reasoning_content"), backend=scripted(PARALLEL_CALL_SCRIPT)
    )
    with LiveServer(app) as server:
        sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        kwargs: dict[str, Any] = {
            "model": "qwen3-moe-demo",
            "messages": HELLO,
            "tools": [WEATHER_TOOL, TIME_TOOL],
            "temperature": 0,
        }
        buffered = sdk.chat.completions.create(**kwargs)
        rebuilt: dict[int, dict[str, str]] = {}
        finish = None
        for chunk in sdk.chat.completions.create(**kwargs, stream=True):
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                for part in choice.delta.tool_calls or []:
                    call = rebuilt.setdefault(part.index, {"name": "", "arguments": ""})
                    if part.function is not None:
                        call["name"] += part.function.name or ""
                        call["arguments"] += part.function.arguments or ""
    expected = [
        {"name": c.function.name, "arguments": c.function.arguments}
        for c in buffered.choices[0].message.tool_calls or []
    ]
    assert len(expected) == 2
    assert [rebuilt[i] for i in sorted(rebuilt)] == expected
    assert finish == buffered.choices[0].finish_reason == "tool_calls"


# -- structured output ----------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_005")
async def test_json_schema_response_format(scripted: Callable[..., Backend], engine: str) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}, "unit": {"type": "string"}},
        "required": ["answer", "unit"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "measure", "schema": schema}}
    async with chat_client(scripted(JSON_SCRIPT, engine)) as client:
        buffered, stream = await both(client, response_format=fmt)
    content = buffered["choices"][0]["message"]["content"]
    assert json.loads(content) == {"answer": 42, "unit": "cm"}
    assert "".join(delta_field(stream, "content")) == content


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_005")
async def test_json_output_never_holds_a_raw_control_character(
    scripted: Callable[..., Backend], engine: str
) -> None:
    """A model that would write a raw newline inside a JSON string is held to JSON: the
    grammar refuses control characters in strings, as llama.cpp's own converter does
    (llama-cpp-python's port allowed them, and the answer did not parse)."""
    schema = {"type": "object", "properties": {"note": {"type": "string"}}, "required": ["note"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "note", "schema": schema}}
    async with chat_client(scripted(RAW_NEWLINE_JSON_SCRIPT, engine)) as client:
        buffered, stream = await both(client, response_format=fmt, max_tokens=64)
    content = buffered["choices"][0]["message"]["content"]
    note = json.loads(content)["note"]
    assert note.startswith("one") and not any(ord(c) < 0x20 for c in note)
    assert "".join(delta_field(stream, "content")) == content


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_005")
async def test_json_object_mode_forces_json_from_a_prose_model(demo_engine: Backend) -> None:
    async with chat_client(demo_engine) as client:
        buffered, _ = await both(client, response_format={"type": "json_object"}, max_tokens=60)
    content = buffered["choices"][0]["message"]["content"]
    assert content.lstrip().startswith("{"), content
    assert buffered["choices"][0]["message"]["reasoning_content"] == THOUGHT


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "not": {"required": ["x"]}},
        {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
        {"$ref": "https://example.com/schema.json"},
    ],
)
@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_005")
async def test_unsupported_schema_feature_is_a_400(
    demo_backend: Backend, schema: dict[str, Any]
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    async with chat_client(demo_backend) as client:
        for stream in (False, True):
            response = await client.post(
                "/v1/chat/completions",
                json={"messages": HELLO, "response_format": fmt, "stream": stream},
            )
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert (error["param"], error["code"]) == ("response_format", "unsupported_schema")


# -- logprobs -------------------------------------------------------------------------------


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_006")
async def test_logprobs_buffered_and_streamed(demo_engine: Backend) -> None:
    async with chat_client(demo_engine) as client:
        buffered, stream = await both(client, logprobs=True, top_logprobs=3)
    entries = buffered["choices"][0]["logprobs"]["content"]
    streamed = [
        entry
        for c in stream.chunks
        if c["choices"] and c["choices"][0].get("logprobs")
        for entry in c["choices"][0]["logprobs"]["content"]
    ]
    assert [(e["token"], e["logprob"]) for e in streamed] == [
        (e["token"], e["logprob"]) for e in entries
    ]
    # One entry per visible token: every script token but the end-of-turn one.
    assert len(entries) == len(DEFAULT_SCRIPT) - 1
    assert b"".join(bytes(e["bytes"]) for e in entries) == b"".join(DEFAULT_SCRIPT[:-1])
    for entry in entries:
        assert entry["logprob"] <= 0
        tops = entry["top_logprobs"]
        assert len(tops) == 3
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        assert tops[0]["token"] == entry["token"]  # greedy: the sampled token is the best one
    assert stream.chunks[-1]["choices"][0]["logprobs"] is None


async def test_no_logprobs_unless_asked(demo_backend: Backend) -> None:
    async with chat_client(demo_backend) as client:
        buffered, _ = await both(client, max_tokens=3)
    assert buffered["choices"][0]["logprobs"] is None
