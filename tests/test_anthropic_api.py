"""``POST /v1/messages`` and ``/v1/messages/count_tokens`` (Anthropic Messages) on the real
engine: the event sequence, stream == buffered on every transport (the official ``anthropic``
SDK's stream accumulator included), per-token delivery, thinking, tool use, Claude Code's
requests as it sends them, stop sequences, limits, keep-alives, and errors in Anthropic's own
shape.

Every streamed event is checked against the SDK's own types (``anthropic.types``), and the
message rebuilt from its deltas the way a client accumulates it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from app.demo import DEFAULT_SCRIPT
from app.engine import Backend
from app.main import create_app
from tests import sse
from tests.chat import script_text
from tests.contracts_plugin import RecordFinding
from tests.delivery import check_per_token_delivery, deliver
from tests.scripts import (
    ANSWER,
    ANSWER_ONLY_SCRIPT,
    PARALLEL_CALL_SCRIPT,
    SINGLE_CALL_SCRIPT,
    THOUGHT,
)
from tests.support.clients import asgi_client
from tests.support.injection import FailingBackend, HeldStart, InjectedBackend
from tests.support.servers import LiveServer, settings_for
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio

AGENTS = "QWEN3_MOE_AGENT_APIS_V1"
MESSAGES = "/v1/messages"
COUNT = "/v1/messages/count_tokens"
COUNTING = "Count from 1 to 1000, one number per line, and nothing else."
EVENT = TypeAdapter(RawMessageStreamEvent)
HELLO = [{"role": "user", "content": "Hello!"}]
THINKING = {"reasoning_format": "reasoning_content"}

WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
        "required": ["city"],
    },
}
TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {"tz": {}}}}


# -- reading a Messages stream ---------------------------------------------------------------


def checked(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The message a client builds from the stream, after checking Anthropic's sequence:
    every event one of the SDK's types; message_start first; each block started, filled and
    stopped before the next; one message_delta, then message_stop last."""
    for event in events:
        if event["type"] != "ping":  # Anthropic's keep-alive, which the SDK skips
            EVENT.validate_python(event)
    kinds = [e["type"] for e in events if e["type"] != "ping"]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("message_delta") == 1
    message: dict[str, Any] = json.loads(json.dumps(events[0]["message"]))
    assert message["content"] == [] and message["stop_reason"] is None
    open_block: dict[str, Any] | None = None
    partial = ""
    for event in events[1:]:
        kind = event["type"]
        if kind == "content_block_start":
            assert open_block is None and event["index"] == len(message["content"])
            open_block = event["content_block"]
            assert not (open_block.get("text") or open_block.get("thinking"))
            assert open_block.get("input", {}) == {}  # tool input arrives as deltas only
            partial = ""
        elif kind == "content_block_delta":
            assert open_block is not None and event["index"] == len(message["content"])
            delta = event["delta"]
            field = {"text_delta": "text", "thinking_delta": "thinking"}.get(delta["type"])
            if field is None:
                assert delta["type"] == "input_json_delta" and open_block["type"] == "tool_use"
                partial += delta["partial_json"]
            else:
                assert delta[field], "an empty delta"
                open_block[field] += delta[field]
        elif kind == "content_block_stop":
            assert open_block is not None and event["index"] == len(message["content"])
            if open_block["type"] == "tool_use":
                open_block["input"] = json.loads(partial) if partial else {}
            message["content"].append(open_block)
            open_block = None
        elif kind == "message_delta":
            assert open_block is None
            message |= event["delta"]
            message["usage"] |= {k: v for k, v in event["usage"].items() if v is not None}
    Message.model_validate(message)
    return message


def comparable(message: dict[str, Any]) -> dict[str, Any]:
    """A message without what differs between two runs of one request: ids, and how the
    prompt splits between decoded and cached tokens (their sum is compared instead). A field
    that is null reads as one left out (the SDK's accumulator writes ``stop_details: null``
    from the ``message_delta``)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "id" and v is not None}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    stripped: dict[str, Any] = strip(message)
    usage = stripped["usage"]
    usage["prompt"] = usage.pop("input_tokens") + usage.pop("cache_read_input_tokens")
    return stripped


class MessagesClient:
    """A buffered and a streamed ``/v1/messages`` call over httpx or the anthropic SDK."""

    def __init__(self, http: httpx.AsyncClient, sdk: anthropic.AsyncAnthropic | None) -> None:
        self.http = http
        self.sdk = sdk

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.sdk is not None:
            message = await self.sdk.messages.create(**_sdk_args(body))
            dumped: dict[str, Any] = message.model_dump(mode="json", exclude_unset=True)
            return dumped
        reply = await self.http.post(MESSAGES, json=body)
        assert reply.status_code == 200, reply.text
        data: dict[str, Any] = reply.json()
        Message.model_validate(data)
        return data

    async def stream(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.sdk is not None:
            async with self.sdk.messages.stream(**_sdk_args(body)) as stream:
                final = await stream.get_final_message()
            dumped: dict[str, Any] = final.model_dump(mode="json", exclude_unset=True)
            return dumped
        async with self.http.stream("POST", MESSAGES, json={**body, "stream": True}) as r:
            assert r.status_code == 200, await r.aread()
            assert r.headers["content-type"].startswith("text/event-stream")
            return checked(sse.typed_events([line async for line in r.aiter_lines()]))


SAMPLING = ("temperature", "top_p", "top_k")
"""Sent as extra fields: this anthropic SDK's ``messages.create`` no longer takes them."""


def _sdk_args(body: dict[str, Any]) -> dict[str, Any]:
    args = {"model": "qwen3-moe-demo", **{k: v for k, v in body.items() if k not in SAMPLING}}
    extra = {k: v for k, v in body.items() if k in SAMPLING}
    return {**args, "extra_body": extra} if extra else args


@contextlib.asynccontextmanager
async def messages_client(
    backend: Backend, transport: str = "asgi", **settings: Any
) -> AsyncIterator[MessagesClient]:
    app = create_app(settings_for(**settings), backend=backend)
    if transport == "asgi":
        async with asgi_client(app) as http:
            yield MessagesClient(http, None)
        return
    with LiveServer(app) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            sdk = None
            if transport == "sdk":
                sdk = anthropic.AsyncAnthropic(base_url=server.url, api_key="k", max_retries=0)
            try:
                yield MessagesClient(http, sdk)
            finally:
                if sdk is not None:
                    await sdk.close()


async def both(
    client: MessagesClient, body: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The buffered message and the message rebuilt from the same greedy request's stream."""
    body = {"messages": HELLO, "max_tokens": 200, "temperature": 0, **body}
    return await client.create(body), await client.stream(body)


def assert_anthropic_error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"type", "error"} and body["type"] == "error"
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind
    message: str = body["error"]["message"]
    assert message and "Traceback" not in message and " at 0x" not in message
    return message


def _prompt(backend: InjectedBackend, n: int = 0) -> str:
    """The text of the prompt the engine was given (special tokens have no bytes)."""
    token_bytes = backend.tokenizer.token_bytes
    return b"".join(token_bytes(t) for t in backend.seen[n].prompt).decode()


# -- the contract: per-token delivery, stream == buffered, disconnects, count_tokens ----------


def text_deltas(lines: Iterator[str]) -> Iterator[str]:
    for name, data in sse.named(lines):
        delta = json.loads(data).get("delta", {}) if name == "content_block_delta" else {}
        yield delta.get("text", "")


@pytest.mark.falsifies(f"{AGENTS}_003")
def test_each_token_is_its_own_text_delta(model: Backend, record_finding: RecordFinding) -> None:
    body = {"messages": [{"role": "user", "content": COUNTING}], "temperature": 0}
    body |= {"max_tokens": 48, "stream": True}
    delivered = deliver(model, MESSAGES, body, text_deltas)
    check_per_token_delivery(delivered)
    message = checked(sse.typed_events(delivered.lines))
    assert message["content"][-1]["text"] == "".join(delivered.texts)
    record_finding("text_deltas", len(delivered.texts))


@pytest.mark.parametrize("transport", ["asgi", "socket", "sdk"])
@pytest.mark.parametrize("model", ["demo-single", "demo-batched", "real-single"], indirect=True)
@pytest.mark.falsifies(f"{AGENTS}_004")
async def test_stream_equals_buffered(model: Backend, transport: str) -> None:
    """Content blocks, stop reason and usage of a greedy stream, as the client (or the SDK's
    ``get_final_message``) builds them, equal the buffered message, on every engine and
    transport."""
    body = {"messages": [{"role": "user", "content": COUNTING}], "max_tokens": 48}
    async with messages_client(model, transport, **THINKING) as client:
        buffered, streamed = await both(client, body)
    assert comparable(streamed) == comparable(buffered)
    assert buffered["usage"]["output_tokens"] <= 48
    if "demo" in model.info.path:
        thinking, text = buffered["content"]
        assert thinking == {"type": "thinking", "thinking": THOUGHT, "signature": ""}
        assert text == {"type": "text", "text": ANSWER}
        assert buffered["stop_reason"] == "end_turn" and buffered["stop_sequence"] is None


@pytest.mark.parametrize("model", ["slow-single", "slow-batched"], indirect=True)
@pytest.mark.falsifies(f"{AGENTS}_005")
def test_a_client_that_leaves_mid_stream_cancels_the_generation(model: Backend) -> None:
    observed = InjectedBackend(model)
    body = {"messages": [{"role": "user", "content": COUNTING}], "temperature": 0}
    body |= {"max_tokens": 1500, "stream": True}
    with (
        LiveServer(create_app(settings_for(), backend=observed)) as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
    ):
        with http.stream("POST", MESSAGES, json=body) as response:
            texts = (t for t in text_deltas(response.iter_lines()) if t)
            for _ in range(3):
                next(texts)  # leaving the block closes the connection mid-stream
        wait_until(lambda: bool(observed.seen) and observed.seen[0].ended)
        follow_up = http.post(MESSAGES, json={**body, "stream": False, "max_tokens": 4})
    (left, served) = observed.seen
    assert left.finish == "cancelled" and len(left.tokens) < 1500
    assert left.calls_after_end == [], "a token was reported after the client left"
    assert follow_up.status_code == 200 and served.finish == "length"


CLAUDE_CODE_BODY: dict[str, Any] = {
    "model": "qwen3-moe-demo",
    "system": [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.ac8;"},
        {
            "type": "text",
            "text": "You are a Claude agent, built on Anthropic's Claude Agent SDK.",
            "cache_control": {"type": "ephemeral"},
        },
    ],
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "<system-reminder>\nToday is a day.\n</system-reminder>"},
                {"type": "text", "text": "create a file", "cache_control": {"type": "ephemeral"}},
            ],
        },
        {"role": "system", "content": "Available agent types for the Agent tool: none."},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "I should touch it.", "signature": ""},
                {
                    "type": "tool_use",
                    "id": "toolu_5ee1628c",
                    "name": "Bash",
                    "input": {"command": "touch created.txt && echo created"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "tool_use_id": "toolu_5ee1628c",
                    "type": "tool_result",
                    "content": "created",
                    "is_error": False,
                    "cache_control": {"type": "ephemeral"},
                }
            ],
        },
    ],
    "tools": [
        {
            "name": "Bash",
            "description": "Executes a bash command and returns its output.",
            "input_schema": {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "object",
                "properties": {"command": {"type": "string"}},
                "required": ["command"],
                "additionalProperties": False,
            },
        }
    ],
    "metadata": {"user_id": '{"device_id":"3611a478","session_id":"cb49e319"}'},
    "max_tokens": 64000,
    "thinking": {"type": "adaptive"},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "output_config": {"effort": "high"},
}
CLAUDE_CODE_HEADERS = {
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
    "x-api-key": "sk-local",
    "x-app": "cli",
}


@pytest.mark.falsifies(f"{AGENTS}_006")
async def test_count_tokens_is_the_prompt_the_generation_decodes(
    scripted: Callable[..., Backend],
) -> None:
    """As Claude Code asks it (``?beta=true``, its headers, a key in ``x-api-key``): the count
    is what the generation of the same request then reports as its prompt."""
    backend = InjectedBackend(scripted(ANSWER_ONLY_SCRIPT))
    url = f"{MESSAGES}?beta=true"
    async with messages_client(backend, api_key="sk-local", **THINKING) as client:
        http = client.http
        counted = await http.post(
            f"{COUNT}?beta=true", json=CLAUDE_CODE_BODY, headers=CLAUDE_CODE_HEADERS
        )
        assert counted.status_code == 200, counted.text
        generated = await http.post(url, json=CLAUDE_CODE_BODY, headers=CLAUDE_CODE_HEADERS)
        bare = {"model": "qwen3-moe-demo", "messages": HELLO, "tools": []}
        bare_count = await http.post(COUNT, json=bare, headers=CLAUDE_CODE_HEADERS)
        bare_generated = await http.post(
            MESSAGES, json={**bare, "max_tokens": 4}, headers=CLAUDE_CODE_HEADERS
        )
    assert counted.json() == {"input_tokens": len(backend.seen[0].prompt)}
    usage = generated.json()["usage"]
    assert (
        counted.json()["input_tokens"] == usage["input_tokens"] + usage["cache_read_input_tokens"]
    )
    bare_usage = bare_generated.json()["usage"]
    assert bare_count.json()["input_tokens"] == (
        bare_usage["input_tokens"] + bare_usage["cache_read_input_tokens"]
    )
    assert len(backend.seen) == 2, "count_tokens never reaches the engine"


def test_the_sdk_counts_tokens_and_raises_typed_errors(live_server: LiveServer) -> None:
    sdk = anthropic.Anthropic(base_url=live_server.url, api_key="unused", max_retries=0)
    counted = sdk.messages.count_tokens(model="qwen3-moe-demo", messages=HELLO)  # type: ignore[arg-type]
    assert counted.input_tokens > 0
    with pytest.raises(anthropic.NotFoundError) as missing:
        sdk.messages.create(model="claude-opus-4-8", max_tokens=8, messages=HELLO)  # type: ignore[arg-type]
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert "--accept-any-model" in missing.value.message
    searched = sdk.messages.create(
        model="qwen3-moe-demo",
        max_tokens=8,
        messages=HELLO,  # type: ignore[arg-type]
        tools=[{"type": "web_search_20250305", "name": "web_search"}],
    )
    assert searched.stop_reason == "max_tokens" and searched.usage.output_tokens == 8


async def test_server_tools_and_mcp_connectors_are_left_out_and_counted_unless_rejected(
    scripted: Callable[..., Backend], caplog: pytest.LogCaptureFixture
) -> None:
    """Anthropic server tools and MCP connectors cannot run here: left out of the prompt by
    default (logged once per request, counted), a 400 naming them with
    --reject-unsupported-tools (issue 21)."""
    backend = InjectedBackend(scripted(ANSWER_ONLY_SCRIPT))
    weather = {"name": "get_weather", "input_schema": {"type": "object"}}
    tools = [{"type": "web_search_20250305", "name": "web_search"}, weather]
    mcp = [{"type": "url", "url": "https://example.invalid/sse", "name": "docs"}]
    body = {"messages": HELLO, "max_tokens": 50, "tools": tools, "mcp_servers": mcp}
    with caplog.at_level(logging.INFO, logger="app.api.http.hosted_tools"):
        async with messages_client(backend) as client:
            served = await client.create(body)
            counted = await client.http.post(COUNT, json=body)
            metrics = (await client.http.get("/metrics")).text
    assert served["content"][-1]["text"] == script_text(ANSWER_ONLY_SCRIPT)
    assert counted.json()["input_tokens"] == len(backend.seen[0].prompt)
    prompt = _prompt(backend)
    assert '"name": "get_weather"' in prompt and "web_search" not in prompt
    logged = [r.getMessage() for r in caplog.records if r.name == "app.api.http.hosted_tools"]
    assert len(logged) == 2  # the generation and the count, one line each
    dropped = "mcp_connector, web_search_20250305"
    assert logged[0].endswith(f"left out 2 tool(s) this server cannot run: {dropped}")
    for api in ("messages", "messages_count_tokens"):
        for kind in ("web_search", "mcp_connector"):
            assert f'dropped_total{{api="{api}",type="{kind}"}} 1.0' in metrics
    async with messages_client(backend, reject_unsupported_tools=True) as client:
        refused = await client.http.post(MESSAGES, json=body)
        refused_mcp = await client.http.post(MESSAGES, json={**body, "tools": [weather]})
    assert "'web_search_20250305' server tool" in assert_anthropic_error(
        refused, 400, "invalid_request_error"
    )
    assert "mcp_servers[0] is an MCP connector" in assert_anthropic_error(
        refused_mcp, 400, "invalid_request_error"
    )


# -- what Claude Code sends ------------------------------------------------------------------


async def test_claude_code_history_renders_as_the_models_own_conversation(
    scripted: Callable[..., Backend],
) -> None:
    """System blocks, a system message inside ``messages``, an unsigned thinking block and a
    tool_use from the assistant, the tool_result from the user: the chat template's own
    conversation, and a 64000-token ``max_tokens`` fitted to the context."""
    backend = InjectedBackend(scripted(ANSWER_ONLY_SCRIPT))
    async with messages_client(backend, **THINKING) as client:
        buffered, streamed = await both(client, CLAUDE_CODE_BODY)
    assert comparable(streamed) == comparable(buffered)
    assert buffered["content"] == [{"type": "text", "text": script_text(ANSWER_ONLY_SCRIPT)}]
    prompt = _prompt(backend)  # special tokens (<|im_start|>, <|im_end|>) have no bytes
    # The billing line whose digits differ per conversation is left out: every Claude Code
    # conversation opens with the same cached prefix.
    assert prompt.startswith("system\nYou are a Claude agent")
    assert "billing" not in prompt
    assert (
        "user\n<system-reminder>\nToday is a day.\n</system-reminder>\n\ncreate a file\n" in prompt
    )
    assert "system\nAvailable agent types for the Agent tool: none.\n" in prompt
    assert "<think>\nI should touch it.\n</think>" in prompt
    assert (
        '{"name": "Bash", "arguments": {"command": "touch created.txt && echo created"}}' in prompt
    )
    assert "<tool_response>\ncreated\n</tool_response>" in prompt


@pytest.mark.parametrize("engine", ["single", "batched"])
async def test_tool_use_streams_its_input_as_json_deltas(
    scripted: Callable[..., Backend], engine: str
) -> None:
    async with messages_client(scripted(SINGLE_CALL_SCRIPT, engine), **THINKING) as client:
        buffered, streamed = await both(client, {"tools": [WEATHER]})
    assert comparable(streamed) == comparable(buffered)
    thinking, call = buffered["content"]
    assert thinking["thinking"] == "The user asks weather."
    assert call["type"] == "tool_use" and call["id"].startswith("toolu_")
    assert (call["name"], call["input"]) == ("get_weather", {"city": "Paris", "unit": "C"})
    assert buffered["stop_reason"] == "tool_use"


def test_the_sdk_stream_helper_rebuilds_tool_use(scripted: Callable[..., Backend]) -> None:
    app = create_app(settings_for(), backend=scripted(PARALLEL_CALL_SCRIPT))
    with LiveServer(app) as server:
        sdk = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
        kwargs: dict[str, Any] = {
            "model": "qwen3-moe-demo",
            "max_tokens": 100,
            "messages": HELLO,
            "tools": [WEATHER, TIME],
            "extra_body": {"temperature": 0},
        }
        buffered = sdk.messages.create(**kwargs)
        partial = []
        with sdk.messages.stream(**kwargs) as stream:
            for event in stream:
                if event.type == "input_json":
                    partial.append(event.partial_json)
            final = stream.get_final_message()
        single = sdk.messages.create(
            **kwargs, tool_choice={"type": "auto", "disable_parallel_tool_use": True}
        )
    assert [(b.name, b.input) for b in buffered.content if b.type == "tool_use"] == [
        ("get_weather", {"city": "Oslo"}),
        ("get_time", {"tz": "CET"}),
    ]
    # One input_json_delta per token of the arguments: the script's pieces.
    assert partial == ['{"city": ', '"Oslo"}', '{"tz"', ': "CET"}']
    assert comparable(final.model_dump(mode="json", exclude_unset=True)) == comparable(
        buffered.model_dump(mode="json", exclude_unset=True)
    )
    assert [b.name for b in single.content if b.type == "tool_use"] == ["get_weather"]


async def test_thinking_disabled_and_enabled(scripted: Callable[..., Backend]) -> None:
    async with messages_client(scripted(ANSWER_ONLY_SCRIPT), **THINKING) as client:
        off, streamed = await both(client, {"thinking": {"type": "disabled"}})
        on, _ = await both(client, {"thinking": {"type": "enabled", "budget_tokens": 1024}})
    assert off["content"] == [{"type": "text", "text": script_text(ANSWER_ONLY_SCRIPT)}]
    assert comparable(streamed) == comparable(off)

    def prompt(message: dict[str, Any]) -> int:
        usage = message["usage"]
        return int(usage["input_tokens"] + usage["cache_read_input_tokens"])

    assert prompt(off) > prompt(on)  # thinking off pre-fills an empty <think></think>


# -- stop reasons ----------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["single", "batched"])
async def test_stop_sequences_and_max_tokens_are_their_own_stop_reasons(
    demo_backend: Backend, demo_batched: Backend, engine: str
) -> None:
    backend = demo_backend if engine == "single" else demo_batched
    async with messages_client(backend, **THINKING) as client:
        stopped, streamed = await both(client, {"stop_sequences": ["never", "offline"]})
        cut, cut_streamed = await both(client, {"max_tokens": 5})
    assert comparable(streamed) == comparable(stopped)
    assert (stopped["stop_reason"], stopped["stop_sequence"]) == ("stop_sequence", "offline")
    assert stopped["content"][-1]["text"] == ANSWER[: ANSWER.index("offline")]
    assert comparable(cut_streamed) == comparable(cut)
    assert (cut["stop_reason"], cut["usage"]["output_tokens"]) == ("max_tokens", 5)
    assert cut["content"] == [{"type": "thinking", "thinking": "Okay, the user", "signature": ""}]


# -- errors and operations -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "kind", "says"),
    [
        (b"{not json", 400, "invalid_request_error", "not valid JSON"),
        ({"messages": HELLO}, 400, "invalid_request_error", "max_tokens"),
        ({"messages": [], "max_tokens": 5}, 400, "invalid_request_error", "messages"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "source": {"data": "x"}}]}
                ],
                "max_tokens": 5,
            },
            400,
            "invalid_request_error",
            "'image' block",
        ),
        (
            {"messages": [*HELLO, {"role": "assistant", "content": "Sure"}], "max_tokens": 5},
            400,
            "invalid_request_error",
            "prefill",
        ),
        (
            {"messages": HELLO, "max_tokens": 5, "model": "claude-opus-4-8"},
            404,
            "not_found_error",
            "qwen3-moe-demo",
        ),
    ],
)
@pytest.mark.falsifies(f"{AGENTS}_007")
async def test_refusals_are_anthropic_errors(
    demo_backend: Backend, body: dict[str, Any] | bytes, status: int, kind: str, says: str
) -> None:
    async with messages_client(demo_backend) as client:
        for stream in (False, True):
            if isinstance(body, bytes):
                response = await client.http.post(MESSAGES, content=body)
            else:
                response = await client.http.post(MESSAGES, json={**body, "stream": stream})
            assert says in assert_anthropic_error(response, status, kind)


@pytest.mark.falsifies(f"{AGENTS}_007")
async def test_keys_limits_and_unknown_paths_answer_in_anthropic_shape(
    demo_backend: Backend,
) -> None:
    body = {"messages": HELLO, "max_tokens": 3}
    async with messages_client(demo_backend, api_key="k1", max_body_bytes=4096) as client:
        http = client.http
        denied = await http.post(MESSAGES, json=body)
        assert "x-api-key" in assert_anthropic_error(denied, 401, "authentication_error")
        wrong = await http.post(MESSAGES, json=body, headers={"x-api-key": "k2"})
        assert_anthropic_error(wrong, 401, "authentication_error")
        for headers in ({"x-api-key": "k1"}, {"Authorization": "Bearer k1"}):
            assert (await http.post(MESSAGES, json=body, headers=headers)).status_code == 200
        key = {"x-api-key": "k1"}
        big = {**body, "system": "x" * 5000}
        assert_anthropic_error(
            await http.post(MESSAGES, json=big, headers=key), 413, "request_too_large"
        )
        unknown = await http.post(f"{MESSAGES}/batches", json=body, headers=key)
        assert_anthropic_error(unknown, 404, "not_found_error")
        # The OpenAI routes keep OpenAI's envelope, the key header notwithstanding.
        chat = await http.post("/v1/chat/completions", json={"messages": HELLO}, headers=key)
        assert chat.status_code == 200
        assert set((await http.post("/v1/chat/completions", json={})).json()) == {"error"}


@pytest.mark.falsifies(f"{AGENTS}_007")
async def test_engine_failure_mid_stream_is_an_error_event(demo_engine: Backend) -> None:
    app = create_app(settings_for(), backend=FailingBackend(demo_engine, after=8))
    body = {"messages": HELLO, "max_tokens": 100, "stream": True}
    async with asgi_client(app) as http:
        async with http.stream("POST", MESSAGES, json=body) as r:
            assert r.status_code == 200
            events = sse.typed_events([line async for line in r.aiter_lines()])
        buffered = await http.post(MESSAGES, json={**body, "stream": False})
    error = events[-1]
    assert error == {
        "type": "error",
        "error": {"type": "api_error", "message": error["error"]["message"]},
    }
    assert "0xdeadbeef" not in error["error"]["message"]
    assert any(e["type"] == "content_block_delta" for e in events)
    assert_anthropic_error(buffered, 500, "api_error")


def test_the_sdk_raises_on_an_error_event(demo_backend: Backend) -> None:
    app = create_app(settings_for(), backend=FailingBackend(demo_backend, after=8))
    with LiveServer(app) as server:
        sdk = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
        with (
            pytest.raises(anthropic.APIStatusError),
            sdk.messages.stream(model="qwen3-moe-demo", max_tokens=100, messages=HELLO) as stream,  # type: ignore[arg-type]
        ):
            stream.get_final_message()


def test_an_idle_stream_sends_pings_after_message_start(demo_backend: Backend) -> None:
    """``message_start`` goes out at once, then ``ping`` events while the prompt is decoded
    (here every 0.1 s), as Anthropic's API sends them; the SDK skips them."""
    held = HeldStart(demo_backend)
    app = create_app(settings_for(sse_keepalive_s=0.1), backend=held)
    lines: list[str] = []
    body = {"messages": HELLO, "max_tokens": 100, "stream": True}
    with (
        LiveServer(app) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
        http.stream("POST", MESSAGES, json=body) as response,
    ):
        for line in response.iter_lines():
            lines.append(line)
            if sum(line == "event: ping" for line in lines) == 2:
                held.release.set()
    events = sse.typed_events(lines)
    assert [e["type"] for e in events[:3]] == ["message_start", "ping", "ping"]
    # The raw text (no reasoning split in these settings): the whole script.
    assert checked(events)["content"][-1]["text"] == script_text(DEFAULT_SCRIPT)


def test_full_queues_answer_rate_limit_errors_and_any_model_is_an_option(
    demo_backend: Backend,
) -> None:
    held = HeldStart(demo_backend)
    app = create_app(settings_for(max_queue=0, accept_any_model=True), backend=held)
    body = {"model": "claude-opus-4-8", "messages": HELLO, "max_tokens": 3, "stream": True}
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", MESSAGES, json=body) as running:
            lines = running.iter_lines()
            assert next(lines) == "event: message_start"  # admitted, held before decoding
            with httpx.Client(base_url=server.url, timeout=30) as other:
                full = other.post(MESSAGES, json=body)
            assert_anthropic_error(full, 429, "rate_limit_error")
            assert full.headers["retry-after"] == "1"
            held.release.set()
            message = checked(sse.typed_events(["event: message_start", *lines]))
        metrics = http.get("/metrics").text
    assert message["model"] == "qwen3-moe-demo"  # the model that answered, never the alias
    assert message["stop_reason"] == "max_tokens"
    assert 'qwen3_moe_serve:request_success_total{finished_reason="length"} 1.0' in metrics
    assert 'request_errors_total{status="429",type="rate_limit_error"} 1.0' in metrics


async def test_max_tokens_above_the_servers_limit_is_lowered_to_it(demo_backend: Backend) -> None:
    """Anthropic's ``max_tokens`` is a ceiling: Claude Code's 64000 meets a server limit of 8
    (``--max-tokens-limit``) and gets 8 tokens; the chat route still refuses such a request."""
    async with messages_client(demo_backend, max_tokens_limit=8, **THINKING) as client:
        buffered, streamed = await both(client, {"max_tokens": 64000})
        chat = await client.http.post(
            "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 64000}
        )
    assert comparable(streamed) == comparable(buffered)
    assert (buffered["stop_reason"], buffered["usage"]["output_tokens"]) == ("max_tokens", 8)
    assert chat.status_code == 400
    assert chat.json()["error"]["code"] == "max_tokens_above_limit"
