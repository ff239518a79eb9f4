"""``POST /v1/responses`` on the real engine: the documented event sequence, stream ==
buffered on every transport (the official ``openai`` SDK's typed parsing included), per-token
delivery, reasoning, function calls (namespaced ones too), Codex's stateless history,
incomplete answers, structured output, and errors in OpenAI's envelope.

Every streamed event is checked against the SDK's own types (``openai.types.responses``), and
the answer rebuilt from its deltas the way a client accumulates it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
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
    JSON_SCRIPT,
    PARALLEL_CALL_SCRIPT,
    SINGLE_CALL_SCRIPT,
    THOUGHT,
)
from tests.support.clients import TRANSPORTS, asgi_client, connect
from tests.support.injection import FailingBackend, HeldStart, InjectedBackend
from tests.support.servers import LiveServer, settings_for
from tests.support.waiting import wait_until
from tests.test_errors import assert_envelope

pytestmark = pytest.mark.anyio

AGENTS = "QWEN3_MOE_AGENT_APIS_V1"
RESPONSES = "/v1/responses"
COUNTING = "Count from 1 to 1000, one number per line, and nothing else."
EVENT = TypeAdapter(ResponseStreamEvent)

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
        "required": ["city"],
    },
}
TIME = {
    "type": "function",
    "name": "get_time",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
}
SPAWN_AGENT = {
    "type": "namespace",
    "name": "multi_agent_v1",
    "description": "Tools for spawning and managing sub-agents.",
    "tools": [
        {
            "type": "function",
            "name": "spawn_agent",
            "description": "Spawn a sub-agent.",
            "strict": False,
            "parameters": {"type": "object", "properties": {"message": {"type": "string"}}},
        }
    ],
}
NAMESPACED_CALL_SCRIPT = (
    b"<tool_call>", b'\n{"name": ', b'"multi_agent_v1.', b'spawn_agent", ', b'"arguments": ',
    b'{"message": ', b'"hi"}', b"}\n", b"</tool_call>", b"<|im_end|>",
)  # fmt: skip


# -- reading a Responses stream -------------------------------------------------------------


def item_text(item: dict[str, Any]) -> str:
    if item["type"] == "function_call":
        text: str = item["arguments"]
        return text
    return "".join(part["text"] for part in item.get("content") or [])


def checked(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The stream's final response, after checking the documented sequence: every event one
    of the SDK's types, sequence numbers 0, 1, 2, …; created and in_progress first; each item
    added, filled and done before the next one starts; every ``.done`` and the final response
    equal to what the deltas built."""
    for n, event in enumerate(events):
        assert event["sequence_number"] == n, event
        EVENT.validate_python(event)
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0]["response"]["status"] == "in_progress"
    final = events[-1]
    assert final["type"] in ("response.completed", "response.incomplete"), final
    built: list[dict[str, Any]] = []
    open_item: dict[str, Any] | None = None
    text = ""
    for event in events[2:-1]:
        kind = event["type"]
        if kind == "response.output_item.added":
            assert open_item is None, "an item was added before the last one was done"
            assert event["output_index"] == len(built)
            open_item, text = event["item"], ""
            assert open_item["status"] == "in_progress" and not item_text(open_item)
            continue
        assert open_item is not None, f"{kind} outside an item"
        assert event["output_index"] == len(built)
        if kind == "response.output_item.done":
            done = event["item"]
            assert done["id"] == open_item["id"] and item_text(done) == text
            built.append(done)
            open_item = None
            continue
        assert event["item_id"] == open_item["id"]
        if kind.endswith(".delta"):
            assert event["delta"], "an empty delta"
            text += event["delta"]
        elif kind in ("response.output_text.done", "response.reasoning_text.done"):
            assert event["text"] == text
        elif kind == "response.function_call_arguments.done":
            assert event["arguments"] == text
        elif kind in ("response.content_part.added", "response.content_part.done"):
            assert event["part"]["text"] == ("" if kind.endswith("added") else text)
        else:
            raise AssertionError(f"unexpected event {kind}")
    assert open_item is None, "the stream ended inside an item"
    response: dict[str, Any] = final["response"]
    assert response["output"] == built
    Response.model_validate(response)
    return response


_RUN_SPECIFIC = frozenset({"id", "call_id", "created_at", "cached_tokens"})


def comparable(response: dict[str, Any]) -> dict[str, Any]:
    """A response without what differs between two runs of one request: ids, times, and the
    prompt tokens the KV cache held (the second run finds the first one's prompt there)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in _RUN_SPECIFIC}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    stripped: dict[str, Any] = strip(response)
    return stripped


class ResponsesClient:
    """A buffered and a streamed ``/v1/responses`` call over httpx or the openai SDK."""

    def __init__(self, http: httpx.AsyncClient, sdk: openai.AsyncOpenAI | None) -> None:
        self.http = http
        self.sdk = sdk

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.sdk is not None:
            response = await self.sdk.responses.create(**_sdk_args(body))
            dumped: dict[str, Any] = response.model_dump(mode="json", exclude_unset=True)
            return dumped
        reply = await self.http.post(RESPONSES, json=body)
        assert reply.status_code == 200, reply.text
        data: dict[str, Any] = reply.json()
        Response.model_validate(data)
        return data

    async def stream(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        if self.sdk is not None:
            stream = await self.sdk.responses.create(**_sdk_args(body), stream=True)
            return [e.model_dump(mode="json", exclude_unset=True) async for e in stream]
        async with self.http.stream("POST", RESPONSES, json={**body, "stream": True}) as r:
            assert r.status_code == 200, await r.aread()
            assert r.headers["content-type"].startswith("text/event-stream")
            return sse.typed_events([line async for line in r.aiter_lines()])


def _sdk_args(body: dict[str, Any]) -> dict[str, Any]:
    known = {"model", "input", "instructions", "tools", "tool_choice", "max_output_tokens"}
    known |= {"temperature", "top_p", "reasoning", "text", "parallel_tool_calls"}
    args = {k: v for k, v in body.items() if k in known}
    extra = {k: v for k, v in body.items() if k not in known}
    args.setdefault("model", "qwen3-moe-demo")
    return {**args, "extra_body": extra} if extra else args


@contextlib.asynccontextmanager
async def responses_client(
    backend: Backend, transport: str = "asgi", **settings: Any
) -> AsyncIterator[ResponsesClient]:
    app = create_app(settings_for(**settings), backend=backend)
    async with connect(app, transport) as client:
        yield ResponsesClient(client.http, client.sdk)


async def both(
    client: ResponsesClient, body: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The buffered response and the final response of the same greedy request's stream."""
    body = {"temperature": 0, **body}
    return await client.create(body), checked(await client.stream(body))


THINKING = {"reasoning_format": "reasoning_content"}


# -- the contract: per-token delivery, stream == buffered, disconnects ------------------------


def response_texts(lines: Iterator[str]) -> Iterator[str]:
    for name, data in sse.named(lines):
        yield json.loads(data)["delta"] if name == "response.output_text.delta" else ""


@pytest.mark.falsifies(f"{AGENTS}_001")
def test_each_token_is_its_own_output_text_delta(
    model: Backend, record_finding: RecordFinding
) -> None:
    body = {"input": COUNTING, "temperature": 0, "max_output_tokens": 48, "stream": True}
    delivered = deliver(model, RESPONSES, body, response_texts)
    check_per_token_delivery(delivered)
    assert delivered.headers["content-type"].startswith("text/event-stream")
    response = checked(sse.typed_events(delivered.lines))
    assert item_text(response["output"][-1]) == "".join(delivered.texts)
    record_finding("output_text_deltas", len(delivered.texts))


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("model", ["demo-single", "demo-batched", "real-single"], indirect=True)
@pytest.mark.falsifies(f"{AGENTS}_002")
async def test_stream_equals_buffered(model: Backend, transport: str) -> None:
    """Output items, status and usage of a greedy stream equal the buffered response, on
    every engine and transport, the openai SDK's typed parsing included."""
    body = {"input": COUNTING, "max_output_tokens": 48}
    async with responses_client(model, transport, **THINKING) as client:
        buffered, streamed = await both(client, body)
    assert comparable(streamed) == comparable(buffered)
    assert buffered["usage"]["output_tokens"] <= 48
    if "demo" in model.info.path:
        reasoning, message = buffered["output"]
        assert (item_text(reasoning), item_text(message)) == (THOUGHT, ANSWER)
        assert buffered["status"] == "completed"


@pytest.mark.parametrize("model", ["slow-single", "slow-batched"], indirect=True)
@pytest.mark.falsifies(f"{AGENTS}_005")
def test_a_client_that_leaves_mid_stream_cancels_the_generation(model: Backend) -> None:
    observed = InjectedBackend(model)
    body = {"input": COUNTING, "temperature": 0, "max_output_tokens": 1500, "stream": True}
    with (
        LiveServer(create_app(settings_for(), backend=observed)) as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
    ):
        with http.stream("POST", RESPONSES, json=body) as response:
            texts = (t for t in response_texts(response.iter_lines()) if t)
            for _ in range(3):
                next(texts)  # leaving the block closes the connection mid-stream
        wait_until(lambda: bool(observed.seen) and observed.seen[0].ended)
        follow_up = http.post(RESPONSES, json={**body, "stream": False, "max_output_tokens": 4})
    (left, served) = observed.seen
    assert left.finish == "cancelled" and len(left.tokens) < 1500
    assert left.calls_after_end == [], "a token was reported after the client left"
    assert follow_up.status_code == 200 and served.finish == "length"


# -- the SDK's stream helper -----------------------------------------------------------------


def test_sdk_stream_helper_rebuilds_the_buffered_response(scripted: Callable[..., Backend]) -> None:
    app = create_app(settings_for(**THINKING), backend=scripted(SINGLE_CALL_SCRIPT))
    with LiveServer(app) as server:
        sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        kwargs: dict[str, Any] = {
            "model": "qwen3-moe-demo",
            "input": "Weather in Paris?",
            "tools": [WEATHER],
            "temperature": 0,
        }
        buffered = sdk.responses.create(**kwargs)
        arguments = []
        with sdk.responses.stream(**kwargs) as stream:
            for event in stream:
                if event.type == "response.function_call_arguments.delta":
                    arguments.append(event.delta)
            final = stream.get_final_response()
    (reasoning, call) = buffered.output
    assert reasoning.type == "reasoning" and call.type == "function_call"
    assert json.loads(call.arguments) == {"city": "Paris", "unit": "C"}
    assert "".join(arguments) == call.arguments and len(arguments) > 3
    dumped = final.model_dump(mode="json", exclude_unset=True)
    for item in dumped["output"]:
        item.pop("parsed_arguments", None)  # the helper's own addition
    assert comparable(dumped) == comparable(buffered.model_dump(mode="json", exclude_unset=True))


# -- reasoning ------------------------------------------------------------------------------


async def test_reasoning_is_its_own_item_and_effort_none_turns_it_off(
    scripted: Callable[..., Backend], demo_backend: Backend
) -> None:
    async with responses_client(demo_backend, **THINKING) as client:
        buffered, _ = await both(client, {"input": "Hello!"})
    reasoning, message = buffered["output"]
    assert reasoning["type"] == "reasoning" and reasoning["summary"] == []
    assert item_text(reasoning) == THOUGHT and item_text(message) == ANSWER
    details = buffered["usage"]["output_tokens_details"]
    # The thought's tokens: <think> through the blank line after </think>, before "Hello".
    assert details["reasoning_tokens"] == DEFAULT_SCRIPT.index(b"Hello")
    async with responses_client(scripted(ANSWER_ONLY_SCRIPT), **THINKING) as client:
        off, streamed = await both(client, {"input": "Hello!", "reasoning": {"effort": "none"}})
        on, _ = await both(client, {"input": "Hello!", "reasoning": {"effort": "high"}})
    assert [item["type"] for item in off["output"]] == ["message"]
    assert item_text(off["output"][0]) == script_text(ANSWER_ONLY_SCRIPT)
    assert off["usage"]["output_tokens_details"]["reasoning_tokens"] == 0
    assert comparable(streamed) == comparable(off)
    # Thinking off pre-fills an empty <think></think>: the prompt is longer by those tokens.
    assert off["usage"]["input_tokens"] > on["usage"]["input_tokens"]


# -- function calls -------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["single", "batched"])
async def test_a_function_call_streams_its_arguments(
    scripted: Callable[..., Backend], engine: str
) -> None:
    async with responses_client(scripted(SINGLE_CALL_SCRIPT, engine), **THINKING) as client:
        buffered, streamed = await both(client, {"input": "Weather?", "tools": [WEATHER]})
    assert comparable(streamed) == comparable(buffered)
    reasoning, call = buffered["output"]
    assert item_text(reasoning) == "The user asks weather."
    assert call["type"] == "function_call" and call["status"] == "completed"
    assert call["name"] == "get_weather" and call["call_id"].startswith("call_")
    assert json.loads(call["arguments"]) == {"city": "Paris", "unit": "C"}
    assert "namespace" not in call
    assert buffered["status"] == "completed"
    assert [t["name"] for t in buffered["tools"]] == ["get_weather"]


async def test_parallel_function_calls_are_items_of_their_own(
    scripted: Callable[..., Backend],
) -> None:
    async with responses_client(scripted(PARALLEL_CALL_SCRIPT)) as client:
        buffered, streamed = await both(client, {"input": "x", "tools": [WEATHER, TIME]})
        single, _ = await both(
            client, {"input": "x", "tools": [WEATHER, TIME], "parallel_tool_calls": False}
        )
    assert comparable(streamed) == comparable(buffered)
    assert [(c["name"], json.loads(c["arguments"])) for c in buffered["output"]] == [
        ("get_weather", {"city": "Oslo"}),
        ("get_time", {"tz": "CET"}),
    ]
    assert len({c["call_id"] for c in buffered["output"]}) == 2
    assert [c["name"] for c in single["output"]] == ["get_weather"]
    assert single["parallel_tool_calls"] is False


async def test_a_namespaced_tool_is_offered_flat_and_called_back_by_namespace(
    scripted: Callable[..., Backend],
) -> None:
    """Codex's sub-agent tools: ``multi_agent_v1.spawn_agent`` to the model, ``name`` plus
    ``namespace`` to Codex (which answers "unsupported call" without the namespace)."""
    backend = InjectedBackend(scripted(NAMESPACED_CALL_SCRIPT))
    async with responses_client(backend) as client:
        buffered, streamed = await both(client, {"input": "Spawn one.", "tools": [SPAWN_AGENT]})
    assert comparable(streamed) == comparable(buffered)
    (call,) = buffered["output"]
    assert (call["namespace"], call["name"]) == ("multi_agent_v1", "spawn_agent")
    assert json.loads(call["arguments"]) == {"message": "hi"}
    assert '"name": "multi_agent_v1.spawn_agent"' in _prompt(backend)


def _prompt(backend: InjectedBackend, n: int = 0) -> str:
    """The text of the prompt the engine was given (special tokens have no bytes)."""
    token_bytes = backend.tokenizer.token_bytes
    return b"".join(token_bytes(t) for t in backend.seen[n].prompt).decode()


async def test_codex_history_renders_as_the_models_own_conversation(
    scripted: Callable[..., Backend],
) -> None:
    """A follow-up as Codex sends it (developer messages, the call, its output, the reasoning
    item before it; no ``previous_response_id``) becomes the chat template's conversation."""
    backend = InjectedBackend(scripted(ANSWER_ONLY_SCRIPT))
    exec_command = {
        "type": "function",
        "name": "exec_command",
        "strict": False,
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}},
    }
    body = {
        "model": "qwen3-moe-demo",
        "input": [
            {
                "type": "message",
                "id": "msg_1",
                "role": "developer",
                "content": [{"type": "input_text", "text": "You are a coding agent."}],
            },
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": "I should run it."}],
                "encrypted_content": None,
            },
            {
                "type": "function_call",
                "status": "completed",
                "id": "fc_1",
                "name": "exec_command",
                "arguments": '{"cmd": "echo hello-from-tool"}',
                "call_id": "call_1",
            },
            {
                "type": "function_call_output",
                "id": "fco_1",
                "call_id": "call_1",
                "output": "hello-from-tool\n",
            },
        ],
        "tools": [exec_command],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"summary": "auto"},
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "01a233e6-0837-7fd3-b6ee-7fc254985715",
        "client_metadata": {"session_id": "01a233e6"},
        "stream": True,
    }
    async with responses_client(backend, **THINKING) as client:
        streamed = checked(await client.stream(body))
    assert item_text(streamed["output"][0]) == script_text(ANSWER_ONLY_SCRIPT)
    prompt = _prompt(backend)  # special tokens (<|im_start|>, <|im_end|>) have no bytes
    assert prompt.startswith("system\nYou are a coding agent.\n\n# Tools")
    assert "\nuser\nhi\nassistant\n<think>\nI should run it.\n</think>\n\n<tool_call>" in prompt
    assert '{"name": "exec_command", "arguments": {"cmd": "echo hello-from-tool"}}' in prompt
    assert "<tool_response>\nhello-from-tool\n\n</tool_response>" in prompt


@pytest.mark.parametrize(
    ("tools", "where", "kind"),
    [
        ([WEATHER, {"type": "web_search", "external_web_access": True}], "tools[1]", "web_search"),
        ([{"type": "custom", "name": "apply_patch"}], "tools[0]", "custom"),
        (
            [{**SPAWN_AGENT, "tools": [{"type": "tool_search", "execution": "client"}]}],
            "tools[0].tools[0]",
            "tool_search",
        ),
    ],
)
async def test_a_tool_this_server_cannot_run_is_left_out_and_counted_unless_rejected(
    scripted: Callable[..., Backend],
    tools: list[dict[str, Any]],
    where: str,
    kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Codex CLI offers web_search with every request by default: the request is served
    without it (issue 21: its default configuration exited 1 on a 400 here), the model never
    sees it, one log line and the counter say so; --reject-unsupported-tools refuses it."""
    backend = InjectedBackend(scripted(ANSWER_ONLY_SCRIPT))
    body = {"input": "x", "tools": tools}
    with caplog.at_level(logging.INFO, logger="app.api.http.hosted_tools"):
        async with responses_client(backend) as client:
            served = await client.create(body)
            metrics = (await client.http.get("/metrics")).text
    assert item_text(served["output"][0]) == script_text(ANSWER_ONLY_SCRIPT)
    assert kind not in _prompt(backend)
    (logged,) = [r.getMessage() for r in caplog.records if r.name == "app.api.http.hosted_tools"]
    assert logged.endswith(f"left out 1 tool(s) this server cannot run: {kind}")
    counted = f'unsupported_tools_dropped_total{{api="responses",type="{kind}"}} 1.0'
    assert counted in metrics
    async with responses_client(backend, reject_unsupported_tools=True) as client:
        refused = await client.http.post(RESPONSES, json=body)
    error = assert_envelope(refused, 400, param=where, code="unsupported_tool")
    assert f"'{kind}'" in error["message"] and "--reject-unsupported-tools" in error["message"]


# -- limits and structured output ----------------------------------------------------------


@pytest.mark.parametrize("engine", ["single", "batched"])
async def test_max_output_tokens_makes_an_incomplete_response(
    scripted: Callable[..., Backend], engine: str
) -> None:
    async with responses_client(scripted(SINGLE_CALL_SCRIPT, engine), **THINKING) as client:
        buffered, streamed = await both(
            client, {"input": "x", "tools": [WEATHER], "max_output_tokens": 12}
        )
    assert comparable(streamed) == comparable(buffered)
    assert buffered["status"] == "incomplete"
    assert buffered["incomplete_details"] == {"reason": "max_output_tokens"}
    assert buffered["usage"]["output_tokens"] == 12
    reasoning, call = buffered["output"]
    assert (reasoning["status"], call["status"]) == ("completed", "incomplete")
    assert call["arguments"] == '{"city'  # cut where the limit fell: after 12 tokens


@pytest.mark.parametrize("engine", ["single", "batched"])
async def test_text_format_json_schema(scripted: Callable[..., Backend], engine: str) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}, "unit": {"type": "string"}},
        "required": ["answer", "unit"],
    }
    fmt = {"type": "json_schema", "name": "measure", "schema": schema, "strict": True}
    async with responses_client(scripted(JSON_SCRIPT, engine)) as client:
        buffered, streamed = await both(client, {"input": "x", "text": {"format": fmt}})
    assert json.loads(item_text(buffered["output"][0])) == {"answer": 42, "unit": "cm"}
    assert comparable(streamed) == comparable(buffered)


# -- errors, keep-alives, operations ---------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        (
            {"input": "x", "previous_response_id": "resp_1"},
            400,
            "previous_response_id",
            "unsupported_parameter",
        ),
        ({"input": "x", "background": True}, 400, "background", "unsupported_parameter"),
        ({"input": []}, 400, "input", "invalid_value"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, 400, "input[0]", None),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            400,
            "input[0].content[0]",
            "unsupported_content",
        ),
        ({"input": "x", "max_output_tokens": 0}, 400, "max_output_tokens", "invalid_value"),
        ({"input": "x", "max_output_tokens": 10**6}, 400, "messages", "context_length_exceeded"),
        ({"input": "x", "model": "gpt-5.5"}, 404, "model", "model_not_found"),
        ({"input": "x", "tool_choice": "required"}, 400, None, "invalid_value"),
    ],
)
@pytest.mark.falsifies(f"{AGENTS}_007")
async def test_refusals_are_openai_envelopes(
    demo_backend: Backend, body: dict[str, Any], status: int, param: str | None, code: str | None
) -> None:
    async with responses_client(demo_backend) as client:
        for stream in (False, True):
            response = await client.http.post(RESPONSES, json={**body, "stream": stream})
            expected = {"param": param} if param is not None else {}
            if code is not None:
                expected["code"] = code
            assert_envelope(response, status, **expected)


async def test_any_model_name_with_accept_any_model(demo_backend: Backend) -> None:
    async with responses_client(demo_backend, accept_any_model=True) as client:
        served = await client.create({"input": "x", "model": "gpt-5.5", "max_output_tokens": 3})
    assert served["model"] == "qwen3-moe-demo"  # the model that answered, never the alias


@pytest.mark.falsifies(f"{AGENTS}_007")
async def test_engine_failure_mid_stream_is_response_failed(demo_engine: Backend) -> None:
    app = create_app(settings_for(), backend=FailingBackend(demo_engine, after=8))
    async with asgi_client(app) as http:
        async with http.stream("POST", RESPONSES, json={"input": "x", "stream": True}) as r:
            assert r.status_code == 200
            events = sse.typed_events([line async for line in r.aiter_lines()])
        buffered = await http.post(RESPONSES, json={"input": "x"})
    failed = events[-1]
    assert failed["type"] == "response.failed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    EVENT.validate_python(failed)
    response = failed["response"]
    assert response["status"] == "failed" and response["error"]["code"] == "server_error"
    assert "0xdeadbeef" not in response["error"]["message"]
    assert any(e["type"] == "response.output_text.delta" for e in events)
    assert response["output"][-1]["status"] == "incomplete"
    assert_envelope(buffered, 500, type="server_error")


def test_an_idle_stream_sends_in_progress_events(demo_backend: Backend) -> None:
    """While the prompt is decoded nothing else is sent, so the stream repeats
    ``response.in_progress`` (here every 0.1 s), numbered in order with every other event:
    Codex resets its idle timer on events, never on the comments beside them."""
    held = HeldStart(demo_backend)
    app = create_app(settings_for(sse_keepalive_s=0.1), backend=held)
    lines: list[str] = []
    with (
        LiveServer(app) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
        http.stream("POST", RESPONSES, json={"input": "Hi", "stream": True}) as response,
    ):
        for line in response.iter_lines():
            lines.append(line)
            if sum(line == "event: response.in_progress" for line in lines) == 3:
                held.release.set()
    events = sse.typed_events(lines)
    assert [e["type"] for e in events[:4]] == ["response.created"] + ["response.in_progress"] * 3
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.completed"


def test_api_keys_full_queues_and_metrics_apply(demo_backend: Backend) -> None:
    held = HeldStart(demo_backend)
    app = create_app(settings_for(api_key="k1", max_queue=0), backend=held)
    body = {"input": "x", "stream": True, "max_output_tokens": 3}
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        denied = http.post(RESPONSES, json=body)
        assert_envelope(denied, 401, type="authentication_error", code="invalid_api_key")
        auth = {"Authorization": "Bearer k1"}
        with http.stream("POST", RESPONSES, json=body, headers=auth) as running:
            assert running.status_code == 200
            lines = running.iter_lines()
            assert next(lines) == "event: response.created"  # admitted, held before decoding
            with httpx.Client(base_url=server.url, timeout=30) as other:
                full = other.post(RESPONSES, json=body, headers={"x-api-key": "k1"})
            assert_envelope(full, 429, type="rate_limit_error", code="overloaded")
            assert full.headers["retry-after"] == "1"
            held.release.set()
            events = sse.typed_events(["event: response.created", *lines])
        assert events[-1]["type"] == "response.incomplete"
        metrics = http.get("/metrics").text
    assert 'qwen3_moe_serve:request_success_total{finished_reason="length"} 1.0' in metrics
    assert "qwen3_moe_serve:time_to_first_token_seconds_count 1.0" in metrics


def test_the_openai_sdk_raises_typed_errors(live_server: LiveServer) -> None:
    sdk = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.responses.create(model="gpt-5.5", input="x")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.responses.create(model="qwen3-moe-demo", input="x", previous_response_id="resp_1")
    assert refused.value.param == "previous_response_id"
