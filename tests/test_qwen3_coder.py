"""Qwen3-Coder's XML tool calls on the real engine, buffered and streamed.

Every behaviour runs on a scripted demo model that carries Qwen3-Coder's chat template (so the
server detects the XML format the way it does for the real model) and whose greedy output is
exactly the text under test; expectations are derived from the scripts and the tools'
schemas, not from recorded output.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import openai
import pytest

from app.api.openai.requests import ChatMessage
from app.api.openai.to_core import turn_of
from app.core.chat_prompt import detect_tool_call_format, template_message
from app.core.chat_template import ChatTemplate
from app.engine import Backend
from app.main import create_app
from tests.chat import (
    both,
    chat_client,
    delta_field,
    script_text,
    streamed_calls,
    tool_call_parts,
)
from tests.support.clients import HELLO
from tests.support.models import ENGINES
from tests.support.servers import LiveServer, settings_for

pytestmark = pytest.mark.anyio

APP = Path(__file__).resolve().parents[1] / "app"
CODER = "qwen3_coder"
EOS = b"<|im_end|>"


def tool(
    name: str,
    properties: dict[str, Any],
    required: Sequence[str] = (),
    defs: dict[str, Any] | None = None,
) -> Any:
    parameters = {"type": "object", "properties": properties, "required": list(required)}
    if defs is not None:
        parameters["$defs"] = defs
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


WRITE_FILE = tool(
    "write_file",
    {
        "path": {"type": "string"},
        "content": {"type": "string", "description": "The whole file"},
        "mode": {"type": "integer"},
        "options": {"type": "object"},
    },
    required=["path", "content"],
)
WEATHER = tool("get_weather", {"city": {"type": "string"}}, required=["city"])
TIME = tool("get_time", {"tz": {"type": "string"}})
COUNTER = tool(
    "set_counter",
    {"n": {"type": "integer"}, "flag": {"type": "boolean"}, "unit": {"enum": ["C", "F"]}},
    required=["n", "flag", "unit"],
)
CONFIGURE = tool(
    "configure",
    {
        "count": {"type": "integer"},
        "ratio": {"type": "number"},
        "enabled": {"type": "boolean"},
        "limits": {"type": "object"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "parent": {"type": "null"},
        "retries": {"type": "integer"},
        "label": {"type": "string"},
        "note": {"type": ["string", "null"]},
        "timeout": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "level": {"$ref": "#/$defs/level"},
    },
    defs={"level": {"type": "integer", "minimum": 0}},
)


def script(*parts: str | bytes, size: int = 4) -> tuple[bytes, ...]:
    """A demo-model script: ``bytes`` parts are one token each, ``str`` parts are cut into
    tokens of about ``size`` bytes (so tags are split across tokens, as a real tokenizer may
    split them), every piece unique (one token, one successor), ending in ``<|im_end|>``."""
    used: set[bytes] = set()
    pieces: list[bytes] = []
    for part in parts:
        data = part if isinstance(part, bytes) else part.encode()
        at = 0
        while at < len(data):
            lengths = (*range(size, 33), *range(size - 1, 0, -1))
            candidates = (data[at : at + n] for n in lengths)
            piece = (
                data
                if isinstance(part, bytes)
                else next((c for c in candidates if c not in used and c != b"\n"), b"")
            )
            if not piece:  # a tail that is taken (or a lone newline): join the piece before
                piece = pieces.pop() + data[at:]
                at = len(data) - len(piece)
            assert piece not in used, piece
            used.add(piece)
            pieces.append(piece)
            at += len(piece)
    return (*pieces, EOS)


def xml_call(name: str, parameters: Sequence[tuple[str, str]]) -> str:
    """One call as Qwen3-Coder writes it (after the ``<tool_call>`` tag)."""
    body = "".join(f"<parameter={p}>\n{value}\n</parameter>\n" for p, value in parameters)
    return f"\n<function={name}>\n{body}</function>\n"


# A file the model writes: the long string value of many tokens, with quotes, a backslash,
# newlines and a character split over two byte tokens; then an integer and an object.
CONTENT_PIECES = (
    b"\ndef", b" greet", b"(name", b"):\n", b"    print", b'(f"Hello,', b" {name}", b'!")\n',
    b"    return", b' "caf', b"\xc3", b"\xa9", b" \\o/", b'"', b"\n\n", b"#", b" the", b" end",
)  # fmt: skip
CONTENT = b"".join(CONTENT_PIECES).decode()[1:]  # the first newline is markup
WRITE_SCRIPT = (
    b"<tool_call>", b"\n<function=write_file>", b"\n<parameter=path>", b"\nsrc/hello.py",
    b"\n</parameter>", b"\n<parameter=content>", *CONTENT_PIECES, b"\n</param", b"eter>",
    b"\n<parameter=mode>", b"\n420", b"\n</para", b"meter>", b"\n<parameter=options>",
    b'\n{"overwrite":', b" true,", b' "tags":', b' ["a",', b' "b"]}', b"\n</", b"parameter>",
    b"\n</function>\n", b"</tool_call>", EOS,
)  # fmt: skip
WRITE_ARGUMENTS = {
    "path": "src/hello.py",
    "content": CONTENT,
    "mode": 420,
    "options": {"overwrite": True, "tags": ["a", "b"]},
}

TYPED_VALUES = (
    ("count", "12"),
    ("ratio", "0.25"),
    ("enabled", "true"),
    ("limits", '{"cpu": 2, "mem": "1G"}'),
    ("tags", '["x", "y"]'),
    ("parent", "null"),
    ("retries", "three"),  # an integer parameter the model filled with words
    ("label", "42"),  # a string parameter: digits stay a string
    ("note", "n/a"),
    ("timeout", "30"),
    ("level", "3"),
    ("verbose", "yes"),  # parameters the schema does not declare are kept
    ("depth", "7"),
)
TYPED_ARGUMENTS = {
    "count": 12,
    "ratio": 0.25,
    "enabled": True,
    "limits": {"cpu": 2, "mem": "1G"},
    "tags": ["x", "y"],
    "parent": None,
    "retries": "three",
    "label": "42",
    "note": "n/a",
    "timeout": 30,
    "level": 3,
    "verbose": "yes",
    "depth": 7,
}
TYPED_SCRIPT = script("<tool_call>" + xml_call("configure", TYPED_VALUES) + "</tool_call>", size=3)
PARALLEL_SCRIPT = script(
    b"<tool_call>",
    xml_call("get_weather", [("city", "Oslo")]) + "</tool_call>\n<tool_call>",
    xml_call("get_time", [("tz", "CET")]) + "</tool_call>",
)
PARALLEL_CALLS = [("get_weather", {"city": "Oslo"}), ("get_time", {"tz": "CET"})]
TEXT_BEFORE = "Let me look that up.\n\n"
TEXT_BEFORE_SCRIPT = script(
    TEXT_BEFORE, b"<tool_call>", xml_call("get_weather", [("city", "Rome")])
)
PROSE_SCRIPT = (b"Just", b" the", b" answer", b".", EOS)
MALFORMED_SCRIPT = script(b"<tool_call>", "\nnot xml at all\n", b"</tool_call>")
THINKING_CALL_SCRIPT = script(
    b"<think>",
    "\nThe user wants the weather.\n",
    b"</think>",
    b"\n\n",
    b"<tool_call>",
    xml_call("get_weather", [("city", "Paris")]),
    b"</tool_call>",
)


def calls_of(message: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in message["tool_calls"]
    ]


def assert_stream_matches(buffered: dict[str, Any], stream: Any) -> None:
    """The streamed calls are the buffered ones, fragment for fragment, and nothing of the
    markup reached content."""
    message = buffered["choices"][0]["message"]
    rebuilt = streamed_calls(stream)
    assert [(c["id"] is not None, c["name"], c["arguments"]) for c in rebuilt] == [
        (True, c["function"]["name"], c["function"]["arguments"])
        for c in message.get("tool_calls", [])
    ]
    content = "".join(delta_field(stream, "content"))
    assert content == (message["content"] or "")
    for tag in ("<tool_call>", "<function=", "<parameter=", "</parameter>", "</function>"):
        assert tag not in content
    assert stream.finish_reasons() == [buffered["choices"][0]["finish_reason"]]


# -- the packaged template and format detection ----------------------------------------------


def test_the_coder_template_makes_the_format_xml_and_the_setting_overrides_it() -> None:
    coder = (APP / "qwen3_coder_chat_template.jinja").read_text(encoding="utf-8")
    qwen3 = (APP / "qwen3_chat_template.jinja").read_text(encoding="utf-8")
    assert detect_tool_call_format("auto", coder) == "qwen3_coder"
    assert detect_tool_call_format("auto", qwen3) == "qwen3"
    assert detect_tool_call_format("qwen3", coder) == "qwen3"
    assert detect_tool_call_format("qwen3_coder", qwen3) == "qwen3_coder"


# -- calls, buffered and streamed --------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_007")
async def test_xml_tool_call_buffered_and_streamed(
    scripted: Callable[..., Backend], engine: str
) -> None:
    async with chat_client(scripted(WRITE_SCRIPT, engine, CODER)) as client:
        buffered, stream = await both(client, tools=[WRITE_FILE])
    choice = buffered["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None and "reasoning_content" not in message
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert calls_of(message) == [("write_file", WRITE_ARGUMENTS)]
    assert_stream_matches(buffered, stream)
    first, *rest = tool_call_parts(stream)
    assert (first["index"], first["type"], first["function"]["name"]) == (
        0,
        "function",
        "write_file",
    )
    assert all(set(part) == {"index", "function"} for part in rest)


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_007", "QWEN3_MOE_SEMANTICS_V1_009")
async def test_a_long_string_argument_streams_as_it_is_decoded(
    scripted: Callable[..., Backend],
) -> None:
    """Regression guard for servers that hold a string value until ``</parameter>``: the file
    content arrives in (about) one fragment per token, JSON-escaped, not in one piece."""
    async with chat_client(scripted(WRITE_SCRIPT, "single", CODER)) as client:
        buffered, stream = await both(client, tools=[WRITE_FILE])
    arguments = buffered["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    escaped = json.dumps(CONTENT, ensure_ascii=False)[1:-1]
    start = arguments.index('"content": "') + len('"content": "')
    assert arguments[start : start + len(escaped)] == escaped
    ends, offset = [], 0
    for part in tool_call_parts(stream):
        offset += len(part["function"].get("arguments", ""))
        ends.append(offset)
    inside = [end for end in ends if start < end < start + len(escaped)]
    # Pieces that end a line or a character's first byte release nothing yet.
    assert len(inside) >= len(CONTENT_PIECES) - 5, (len(inside), len(CONTENT_PIECES))


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_008")
async def test_values_are_typed_by_the_tool_schema(scripted: Callable[..., Backend]) -> None:
    """Integer, number, boolean, object, array, null, unions and $ref typed; a value that does
    not fit its type and parameters the schema does not declare are kept, never dropped."""
    async with chat_client(scripted(TYPED_SCRIPT, "single", CODER)) as client:
        buffered, stream = await both(client, tools=[CONFIGURE])
    message = buffered["choices"][0]["message"]
    assert calls_of(message) == [("configure", TYPED_ARGUMENTS)]
    # Typed as JSON, in the order the model wrote them.
    assert list(json.loads(message["tool_calls"][0]["function"]["arguments"])) == [
        name for name, _ in TYPED_VALUES
    ]
    assert_stream_matches(buffered, stream)


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_007")
async def test_parallel_xml_calls(scripted: Callable[..., Backend]) -> None:
    async with chat_client(scripted(PARALLEL_SCRIPT, "single", CODER)) as client:
        buffered, stream = await both(client, tools=[WEATHER, TIME])
    message = buffered["choices"][0]["message"]
    assert calls_of(message) == PARALLEL_CALLS
    assert len({c["id"] for c in message["tool_calls"]}) == 2
    assert buffered["choices"][0]["finish_reason"] == "tool_calls"
    assert_stream_matches(buffered, stream)


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_007")
async def test_text_before_an_xml_call_is_content(scripted: Callable[..., Backend]) -> None:
    async with chat_client(scripted(TEXT_BEFORE_SCRIPT, "single", CODER)) as client:
        buffered, stream = await both(client, tools=[WEATHER])
    message = buffered["choices"][0]["message"]
    assert message["content"] == TEXT_BEFORE
    assert calls_of(message) == [("get_weather", {"city": "Rome"})]
    assert buffered["choices"][0]["finish_reason"] == "tool_calls"
    assert_stream_matches(buffered, stream)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_007")
async def test_parallel_tool_calls_false_ends_after_the_first_xml_call(
    scripted: Callable[..., Backend], engine: str
) -> None:
    async with chat_client(scripted(PARALLEL_SCRIPT, engine, CODER)) as client:
        buffered, stream = await both(client, tools=[WEATHER, TIME], parallel_tool_calls=False)
    assert calls_of(buffered["choices"][0]["message"]) == PARALLEL_CALLS[:1]
    assert buffered["choices"][0]["finish_reason"] == "tool_calls"
    # Decoding stopped at the token that completed the first </function>.
    first_call = next(
        n for n in range(len(PARALLEL_SCRIPT)) if b"</function>" in b"".join(PARALLEL_SCRIPT[:n])
    )
    assert buffered["usage"]["completion_tokens"] == first_call
    assert_stream_matches(buffered, stream)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_007", "QWEN3_MOE_SEMANTICS_V1_008")
async def test_a_call_cut_by_max_tokens_still_has_valid_json_arguments(
    scripted: Callable[..., Backend], engine: str
) -> None:
    """Cut inside the long string value: the value and the object are closed, so a client's
    json.loads of the (truncated) arguments succeeds, buffered and streamed alike."""
    cut = WRITE_SCRIPT.index(b" {name}") + 1
    async with chat_client(scripted(WRITE_SCRIPT, engine, CODER)) as client:
        buffered, stream = await both(client, tools=[WRITE_FILE], max_tokens=cut)
    assert buffered["choices"][0]["finish_reason"] == "length"
    ((name, arguments),) = calls_of(buffered["choices"][0]["message"])
    assert name == "write_file"
    assert arguments["path"] == "src/hello.py"
    assert CONTENT.startswith(arguments["content"]) and arguments["content"].endswith("{name}")
    assert_stream_matches(buffered, stream)


# -- what is not a call ------------------------------------------------------------------------


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_007")
async def test_xml_calls_are_plain_text_without_tools_or_with_tool_choice_none(
    scripted: Callable[..., Backend],
) -> None:
    async with chat_client(scripted(PARALLEL_SCRIPT, "single", CODER)) as client:
        without, _ = await both(client)
        none, stream = await both(client, tools=[WEATHER], tool_choice="none")
        auto, _ = await both(client, tools=[WEATHER, TIME], tool_choice="auto")
    for result in (without, none):
        assert result["choices"][0]["finish_reason"] == "stop"
        assert result["choices"][0]["message"]["content"] == script_text(PARALLEL_SCRIPT)
    assert "".join(delta_field(stream, "content")) == script_text(PARALLEL_SCRIPT)
    assert calls_of(auto["choices"][0]["message"]) == PARALLEL_CALLS


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_004")
async def test_a_block_that_is_not_an_xml_call_is_content(scripted: Callable[..., Backend]) -> None:
    async with chat_client(scripted(MALFORMED_SCRIPT, "single", CODER)) as client:
        buffered, stream = await both(client, tools=[WEATHER])
    message = buffered["choices"][0]["message"]
    assert message == {"role": "assistant", "content": script_text(MALFORMED_SCRIPT)}
    assert buffered["choices"][0]["finish_reason"] == "stop"
    assert "".join(delta_field(stream, "content")) == message["content"]


# -- the format setting and thinking -----------------------------------------------------------


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_001", "QWEN3_MOE_SEMANTICS_V1_007")
async def test_a_thinking_qwen3_model_set_to_the_coder_format_keeps_reasoning_apart(
    scripted: Callable[..., Backend],
) -> None:
    """The format is a setting independent of thinking: a Qwen3 (thinking) model served with
    --tool-call-format qwen3_coder has its <think> block in reasoning_content, never in
    content, and its XML call parsed."""
    backend = scripted(THINKING_CALL_SCRIPT)  # Qwen3's template: auto would say qwen3
    async with chat_client(backend, tool_call_format=CODER) as client:
        buffered, stream = await both(client, tools=[WEATHER])
    message = buffered["choices"][0]["message"]
    assert message["reasoning_content"] == "The user wants the weather."
    assert message["content"] is None
    assert calls_of(message) == [("get_weather", {"city": "Paris"})]
    assert "".join(delta_field(stream, "reasoning_content")) == message["reasoning_content"]
    assert_stream_matches(buffered, stream)
    async with chat_client(backend) as client:  # auto: Qwen3's JSON format, so no call
        default, _ = await both(client, tools=[WEATHER])
    assert "tool_calls" not in default["choices"][0]["message"]


async def test_the_qwen3_format_setting_on_a_coder_model_leaves_xml_as_content(
    scripted: Callable[..., Backend],
) -> None:
    async with chat_client(
        scripted(PARALLEL_SCRIPT, "single", CODER), tool_call_format="qwen3"
    ) as client:
        buffered, _ = await both(client, tools=[WEATHER, TIME])
    assert buffered["choices"][0]["message"]["content"] == script_text(PARALLEL_SCRIPT)


# -- forced calls: the grammar -----------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_010")
async def test_named_tool_choice_constrains_a_prose_model_into_a_typed_xml_call(
    scripted: Callable[..., Backend], engine: str
) -> None:
    """The model wants to answer in prose; a named tool_choice makes it write a complete XML
    call to that function, each value of its parameter's type."""
    body = {
        "tools": [WEATHER, COUNTER],
        "tool_choice": {"type": "function", "function": {"name": "set_counter"}},
        "max_tokens": 400,
    }
    async with chat_client(scripted(PROSE_SCRIPT, engine, CODER)) as client:
        prose, _ = await both(client, tools=[WEATHER, COUNTER])
        buffered, stream = await both(client, **body)
    assert prose["choices"][0]["message"]["content"] == script_text(PROSE_SCRIPT)
    choice = buffered["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    ((name, arguments),) = calls_of(choice["message"])
    assert name == "set_counter"
    assert set(arguments) == {"n", "flag", "unit"}
    assert type(arguments["n"]) is int and type(arguments["flag"]) is bool
    assert arguments["unit"] in ("C", "F")
    assert_stream_matches(buffered, stream)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_010")
async def test_required_tool_choice_constrains_a_prose_model_into_xml_calls(
    scripted: Callable[..., Backend], engine: str
) -> None:
    async with chat_client(scripted(PROSE_SCRIPT, engine, CODER)) as client:
        buffered, stream = await both(
            client, tools=[WEATHER, COUNTER], tool_choice="required", max_tokens=120
        )
    message = buffered["choices"][0]["message"]
    assert message["content"] is None
    calls = calls_of(message)  # valid JSON even when max_tokens ends a free-text value
    assert calls and all(name in ("get_weather", "set_counter") for name, _ in calls)
    assert all(isinstance(arguments, dict) for _, arguments in calls)
    assert_stream_matches(buffered, stream)


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_010")
async def test_unsupported_schema_in_a_forced_xml_call_is_a_400(
    scripted: Callable[..., Backend],
) -> None:
    bad = tool("bad", {"x": {"type": "integer", "not": {"const": 3}}})
    async with chat_client(scripted(PROSE_SCRIPT, "single", CODER)) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"messages": HELLO, "tools": [bad], "tool_choice": "required", "stream": True},
        )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("tools", "unsupported_schema")


# -- the official SDK --------------------------------------------------------------------------


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_007")
async def test_openai_sdk_accumulates_streamed_xml_calls(scripted: Callable[..., Backend]) -> None:
    for script_, tools in ((PARALLEL_SCRIPT, [WEATHER, TIME]), (WRITE_SCRIPT, [WRITE_FILE])):
        app = create_app(
            settings_for(reasoning_format="reasoning_content"),
            backend=scripted(script_, "single", CODER),
        )
        with LiveServer(app) as server:
            sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
            kwargs: dict[str, Any] = {
                "model": "qwen3-moe-demo",
                "messages": HELLO,
                "tools": tools,
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
        assert expected and [rebuilt[i] for i in sorted(rebuilt)] == expected
        assert all(isinstance(json.loads(c["arguments"]), dict) for c in expected)
        assert finish == buffered.choices[0].finish_reason == "tool_calls"


# -- history -----------------------------------------------------------------------------------

HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "arguments": '{"city": "Paris", "days": 3, "detail": {"hourly": true}}',
                },
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
]
RENDERED_HISTORY = (
    "<|im_start|>assistant\n"
    "<tool_call>\n<function=get_weather>\n"
    "<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n"
    '<parameter=detail>\n{"hourly": true}\n</parameter>\n'
    "</function>\n</tool_call>\n"
    "<tool_call>\n<function=get_time>\n<parameter=tz>\nCET\n</parameter>\n</function>\n</tool_call>"
    "<|im_end|>\n"
    "<|im_start|>user\n"
    '<tool_response>\n{"temp": 21}\n</tool_response>\n'
    "<tool_response>\n14:05\n</tool_response>\n"
    "<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def _coder_prompt(messages: list[dict[str, Any]], tools: list[Any]) -> str:
    template = ChatTemplate(
        (APP / "qwen3_coder_chat_template.jinja").read_text(encoding="utf-8"),
        bos_token="<|endoftext|>",
        eos_token=EOS.decode(),
    )
    wire = [turn_of(ChatMessage.model_validate(m)) for m in messages]
    return template.render(
        [template_message(m, arguments_as_object=True) for m in wire],
        tools=[t for t in tools],
    )


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_011")
async def test_history_tool_calls_and_results_render_as_the_coder_template_expects(
    scripted: Callable[..., Backend],
) -> None:
    """OpenAI clients send a history call's arguments as a JSON string; Qwen3-Coder's template
    iterates them as a mapping, values raw, objects as JSON, tool results in one user turn."""
    prompt = _coder_prompt(HISTORY, [WEATHER, TIME])
    assert prompt.endswith(RENDERED_HISTORY)
    assert prompt.startswith("<|im_start|>system\nYou are terse.\n\n# Tools")
    backend = scripted(PROSE_SCRIPT, "single", CODER)
    async with chat_client(backend) as client:
        buffered, _ = await both(client, messages=HISTORY, tools=[WEATHER, TIME])
    assert buffered["choices"][0]["message"]["content"] == script_text(PROSE_SCRIPT)
    # The server rendered exactly that prompt.
    assert buffered["usage"]["prompt_tokens"] == len(backend.tokenizer.tokenize(prompt))


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_011")
@pytest.mark.parametrize("arguments", ["not json", "[1, 2]", '"text"'])
async def test_history_arguments_that_are_not_a_json_object_are_a_400(
    scripted: Callable[..., Backend], arguments: str
) -> None:
    call = {
        "id": "c",
        "type": "function",
        "function": {"name": "get_weather", "arguments": arguments},
    }
    messages = [*HISTORY[:2], {"role": "assistant", "content": None, "tool_calls": [call]}]
    async with chat_client(scripted(PROSE_SCRIPT, "single", CODER)) as client:
        response = await client.post(
            "/v1/chat/completions", json={"messages": messages, "tools": [WEATHER]}
        )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages"
