"""A fuzz suite against a real server process: no input to any endpoint is a 5xx or a crash.

Hypothesis draws requests for every route the server has — chat and text completions, the
agent APIs (Responses, Anthropic Messages and its count_tokens), the model list, health and
metrics, unknown routes and wrong methods — over every family of
field: messages and their content parts, tools and their JSON schemas, response formats,
``chat_template_kwargs``, stop lists, ``logit_bias``, sampling numbers (huge, negative,
fractional where integers belong), strings with lone surrogates, NULs and control token texts,
nesting, sizes past every limit, bodies that are not JSON at all. Most are nearly valid (one
field off), so they reach the engine or a late check rather than the first validator.

Every answer must be below 500 (a stream's too: no in-band server error, ``[DONE]`` last);
after the run the process must be alive, serve a normal request, hold its memory within a
bound and have logged no unhandled error. The server runs the batching engine (two slots)
with a small context, so prompts and grammars reach llama.cpp and refusals by context length
happen too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.servers import ServerProcess

HELLO = [{"role": "user", "content": "Hello!"}]
REQUESTS = int(os.environ.get("QWEN3_MOE_FUZZ_REQUESTS", "1000"))
RSS_GROWTH_MAX_MB = 400
"""How much the server's memory may grow over the run (it starts at about 90 MB)."""


@pytest.fixture(scope="module")
def fuzzed(
    demo_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    cache = tmp_path_factory.mktemp("server-fuzz")
    args = ("--parallel", "2", "--n-ctx", "1024", "--n-threads", "1", "--max-queue", "256")
    with ServerProcess(demo_model_path, *args, cache_dir=cache) as process:
        yield process


def rss_mb(process: ServerProcess) -> float:
    assert process.process is not None
    for line in Path(f"/proc/{process.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# -- strategies --------------------------------------------------------------------------------

# Characters that matter: lone surrogates (Cs), NUL and other controls, private-use (the
# placeholders' alphabet), multi-byte text; and texts that matter: control and added tokens.
CHARACTERS = st.characters(codec=None, categories=None) | st.sampled_from(
    ["\x00", "\ud800", "\udfff", "\ue000", "\ue001", "\n", "\\", '"', "é", "🙂", "日"]
)
SPECIAL_TEXTS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "<|im_start|>system\n",
    "{{ 7*7 }}",
    "{% raw %}",
    "/think",
    "/no_think",
    "<function=f>",
    "<parameter=x>",
]
TEXT = st.one_of(
    st.text(CHARACTERS, max_size=20),
    st.lists(st.sampled_from(SPECIAL_TEXTS) | st.text(CHARACTERS, max_size=5), max_size=6).map(
        "".join
    ),
)
NUMBERS = st.one_of(
    st.integers(-5, 5),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, 1, -1, 2**31, 2**32 + 1, 2**63, 10**300, 1e-300, 0.5]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)

SCHEMA_KEYWORDS = [
    "type",
    "properties",
    "items",
    "prefixItems",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "$defs",
    "definitions",
    "required",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
    "pattern",
    "format",
    "additionalProperties",
    "not",
    "description",
    "default",
    "title",
    "minProperties",
    "maxProperties",
    "exclusiveMinimum",
    "uniqueItems",
]
TYPES = st.sampled_from(["object", "array", "string", "integer", "number", "boolean", "null"])


def _schema_value(key: str, inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A value for a schema keyword: mostly one of its kind, sometimes any JSON."""
    plausible: dict[str, st.SearchStrategy[Any]] = {
        "type": TYPES | st.lists(TYPES, max_size=3),
        "properties": st.dictionaries(TEXT, inner, max_size=4),
        "items": inner,
        "prefixItems": st.lists(inner, max_size=3),
        "enum": st.lists(SCALARS, max_size=5),
        "anyOf": st.lists(inner, max_size=3),
        "oneOf": st.lists(inner, max_size=3),
        "allOf": st.lists(inner, max_size=3),
        "$ref": st.sampled_from(["#/$defs/a", "#/definitions/a", "#", "#/nope", "http://x/y"]),
        "$defs": st.dictionaries(st.sampled_from(["a", "b"]), inner, max_size=2),
        "required": st.lists(TEXT, max_size=3),
        "minLength": st.integers(-2, 3000),
        "maxLength": st.integers(-2, 3000),
        "minItems": st.integers(-2, 50),
        "maxItems": st.integers(-2, 3000),
        "pattern": st.sampled_from(["^a+$", "^[0-9]{2,4}$", "(", "^(a|b)*$", "^.{0,1999}$"]),
        "format": st.sampled_from(["date", "date-time", "uuid", "email", "time", "bogus"]),
        "additionalProperties": st.booleans() | inner,
    }
    return plausible[key] | JSON if key in plausible else JSON


SCHEMAS = st.recursive(
    st.fixed_dictionaries({}, optional={"type": TYPES}) | JSON,
    lambda inner: st.lists(
        st.sampled_from(SCHEMA_KEYWORDS).flatmap(
            lambda key: st.tuples(st.just(key), _schema_value(key, inner))
        ),
        min_size=1,
        max_size=4,
    ).map(dict),
    max_leaves=10,
)

CONTENT = st.one_of(
    TEXT,
    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=3),
    JSON,
)
ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool"]) | TEXT
TOOL_CALL = st.fixed_dictionaries(
    {
        "id": TEXT,
        "type": st.just("function"),
        "function": st.fixed_dictionaries({"name": TEXT, "arguments": JSON.map(json.dumps) | TEXT}),
    }
)
MESSAGE = st.fixed_dictionaries(
    {"role": ROLES, "content": CONTENT},
    optional={
        "name": TEXT,
        "tool_calls": st.lists(TOOL_CALL, max_size=2),
        "tool_call_id": TEXT,
        "reasoning_content": TEXT,
    },
)
NAMES = st.sampled_from(["get_weather", "f", "a.b-c_1"]) | TEXT
TOOL = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries(
            {"name": NAMES}, optional={"description": TEXT, "parameters": SCHEMAS, "strict": JSON}
        ),
    }
)
TOOL_CHOICE = st.sampled_from(["none", "auto", "required"]) | st.fixed_dictionaries(
    {"type": st.just("function"), "function": st.fixed_dictionaries({"name": NAMES})}
)
RESPONSE_FORMAT = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
    st.fixed_dictionaries(
        {
            "type": st.just("json_schema"),
            "json_schema": st.fixed_dictionaries({"name": TEXT}, optional={"schema": SCHEMAS}),
        }
    ),
)
STOP = TEXT | st.lists(TEXT, max_size=5)
LOGIT_BIAS = st.dictionaries(
    st.integers(-5, 400).map(str) | TEXT, st.floats(-150, 150) | JSON, max_size=4
)

SAMPLING: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["qwen3-moe-demo", "gpt-4o"]) | TEXT,
    "max_tokens": st.integers(-2, 6) | NUMBERS,
    "temperature": st.sampled_from([0, 0.7, 2, 3]) | NUMBERS,
    "top_p": NUMBERS,
    "top_k": NUMBERS,
    "min_p": NUMBERS,
    "seed": NUMBERS,
    "presence_penalty": NUMBERS,
    "frequency_penalty": NUMBERS,
    "repeat_penalty": NUMBERS,
    "stop": STOP,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | JSON,
    "n": st.integers(0, 3),
    "user": TEXT,
    "logit_bias": LOGIT_BIAS,
}
CHAT_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    **SAMPLING,
    "messages": st.lists(MESSAGE, max_size=4),
    "max_completion_tokens": st.integers(-1, 6) | NUMBERS,
    "chat_template_kwargs": st.dictionaries(
        st.sampled_from(["enable_thinking", "namespace", "messages", "x", "self", "range"]) | TEXT,
        JSON,
        max_size=3,
    ),
    "logprobs": st.booleans() | JSON,
    "top_logprobs": st.integers(-1, 25),
    "tools": st.lists(TOOL, max_size=3),
    "tool_choice": TOOL_CHOICE | JSON,
    "parallel_tool_calls": st.booleans() | JSON,
    "response_format": RESPONSE_FORMAT | JSON,
    "thinking_budget": st.integers(-2, 50) | NUMBERS,
    "reasoning_effort": st.sampled_from(["none", "minimal", "low", "high", "max"]) | TEXT,
}
COMPLETION_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    **SAMPLING,
    "prompt": TEXT | st.lists(TEXT, max_size=2) | st.lists(st.integers(-5, 400), max_size=8) | JSON,
    "echo": st.booleans(),
    "suffix": TEXT | st.none(),
    "logprobs": st.integers(0, 5) | st.none(),
    "best_of": st.integers(0, 2),
}


# The agent APIs: OpenAI's Responses and Anthropic's Messages (with count_tokens).
PART = st.fixed_dictionaries(
    {"type": st.sampled_from(["input_text", "output_text", "input_image", "refusal"]) | TEXT},
    optional={"text": TEXT, "refusal": TEXT},
)
ITEM = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.just("message"),
            "role": st.sampled_from(["user", "assistant", "system", "developer"]) | TEXT,
            "content": TEXT | st.lists(PART, max_size=3),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("function_call"),
            "call_id": TEXT,
            "name": NAMES,
            "arguments": JSON.map(json.dumps) | TEXT,
        },
        optional={"namespace": TEXT},
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("function_call_output"),
            "call_id": TEXT,
            "output": TEXT | st.lists(PART, max_size=2),
        }
    ),
    st.fixed_dictionaries({"type": st.just("reasoning")}, optional={"content": st.lists(PART)}),
    st.fixed_dictionaries({"type": TEXT}, optional={"name": TEXT}),
)
FUNCTION_TOOL = st.fixed_dictionaries(
    {"type": st.just("function"), "name": NAMES},
    optional={"description": TEXT, "parameters": SCHEMAS, "strict": st.booleans()},
)
RESPONSES_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": SAMPLING["model"],
    "input": TEXT | st.lists(ITEM, max_size=4),
    "instructions": TEXT,
    "tools": st.lists(
        FUNCTION_TOOL
        | st.fixed_dictionaries(
            {"type": st.just("namespace"), "name": TEXT, "tools": st.lists(FUNCTION_TOOL)}
        )
        | st.fixed_dictionaries({"type": st.sampled_from(["web_search", "custom"]) | TEXT}),
        max_size=3,
    ),
    "tool_choice": st.sampled_from(["none", "auto", "required"])
    | st.fixed_dictionaries({"type": st.just("function"), "name": NAMES}),
    "parallel_tool_calls": st.booleans(),
    "max_output_tokens": st.integers(-1, 6) | NUMBERS,
    "temperature": NUMBERS,
    "top_p": NUMBERS,
    "reasoning": st.fixed_dictionaries(
        {}, optional={"effort": st.sampled_from(["none", "low", "medium", "high"]) | TEXT}
    ),
    "text": st.fixed_dictionaries(
        {},
        optional={
            "format": RESPONSE_FORMAT
            | st.fixed_dictionaries(
                {"type": st.just("json_schema"), "name": TEXT}, optional={"schema": SCHEMAS}
            )
        },
    ),
    "stream": st.booleans(),
    "previous_response_id": TEXT,
    "background": st.booleans(),
    "store": JSON,
}
BLOCK = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
    st.fixed_dictionaries(
        {
            "type": st.just("tool_use"),
            "id": TEXT,
            "name": NAMES,
            "input": st.dictionaries(TEXT, JSON, max_size=3),
        }
    ),
    st.fixed_dictionaries(
        {"type": st.just("tool_result"), "tool_use_id": TEXT},
        optional={
            "content": TEXT
            | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2),
            "is_error": st.booleans(),
        },
    ),
    st.fixed_dictionaries({"type": st.just("thinking"), "thinking": TEXT}),
    st.fixed_dictionaries({"type": st.sampled_from(["redacted_thinking", "image"]) | TEXT}),
)
MESSAGES_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": SAMPLING["model"],
    "system": TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT})),
    "messages": st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "assistant", "system"]) | TEXT,
                "content": TEXT | st.lists(BLOCK, max_size=3),
            }
        ),
        max_size=4,
    ),
    "tools": st.lists(
        st.fixed_dictionaries(
            {"name": NAMES, "input_schema": SCHEMAS}, optional={"description": TEXT}
        )
        | st.fixed_dictionaries(
            {"type": st.sampled_from(["web_search_20250305", "bash_20250124"]) | TEXT, "name": TEXT}
        ),
        max_size=3,
    ),
    "tool_choice": st.fixed_dictionaries(
        {"type": st.sampled_from(["auto", "any", "tool", "none"]) | TEXT},
        optional={"name": NAMES, "disable_parallel_tool_use": st.booleans()},
    ),
    "thinking": st.fixed_dictionaries(
        {"type": st.sampled_from(["enabled", "disabled", "adaptive"]) | TEXT},
        optional={"budget_tokens": NUMBERS},
    ),
    "max_tokens": st.integers(-1, 6) | NUMBERS,
    "stop_sequences": st.lists(TEXT, max_size=4) | JSON,
    "temperature": NUMBERS,
    "top_p": NUMBERS,
    "top_k": NUMBERS,
    "stream": st.booleans(),
    "metadata": JSON,
}
AGENT_ROUTES: dict[str, tuple[dict[str, st.SearchStrategy[Any]], dict[str, Any]]] = {
    "/v1/responses": (RESPONSES_FIELDS, {"input": "Hello", "max_output_tokens": 4}),
    "/v1/messages": (MESSAGES_FIELDS, {"messages": HELLO, "max_tokens": 4}),
    "/v1/messages/count_tokens": (MESSAGES_FIELDS, {"messages": HELLO}),
}


@st.composite
def nearly_valid(
    draw: st.DrawFn, fields: dict[str, st.SearchStrategy[Any]], base: dict[str, Any]
) -> dict[str, Any]:
    """A valid body with a few fields drawn from their families (most valid, some not)."""
    body = dict(base)
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True)):
        body[name] = draw(fields[name])
    if draw(st.booleans()):
        body.setdefault("max_tokens", draw(st.integers(1, 4)))
    if draw(st.integers(0, 9)) == 0:
        body[draw(TEXT)] = draw(JSON)  # a vendor field nobody knows
    return body


def _big(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A body past (or near) one of the limits."""
    kind = draw(st.sampled_from(["messages", "content", "stop", "tools", "enum", "deep", "props"]))
    if kind == "messages":
        n = draw(st.sampled_from([100, 1000, 4096, 4097, 20_000]))
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}] * n}
    if kind == "content":
        n = draw(st.sampled_from([5_000, 50_000, 500_000]))
        text = draw(st.sampled_from(["x", "<|im_end|>", "<think>", "🙂 "])) * n
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}
    if kind == "stop":
        n, length = draw(st.sampled_from([(64, 512), (65, 1), (1, 513), (10_000, 3)]))
        return "/v1/chat/completions", {"messages": HELLO, "stop": ["s" * length] * n}
    if kind == "tools":
        n = draw(st.sampled_from([50, 512, 513]))
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        choice = draw(st.sampled_from(["auto", "required"]))
        return "/v1/chat/completions", {
            "messages": HELLO,
            "tools": [tool] * n,
            "tool_choice": choice,
        }
    if kind == "enum":
        n = draw(st.sampled_from([1_000, 6_000, 10_000, 50_000]))
        schema = {"enum": [f"v{i}" for i in range(n)]}
        fmt = {"type": "json_schema", "json_schema": {"name": "e", "schema": schema}}
        return "/v1/chat/completions", {"messages": HELLO, "response_format": fmt}
    if kind == "deep":
        depth = draw(st.sampled_from([30, 64, 65, 500]))
        deep: Any = {}
        for _ in range(depth):
            deep = {"type": "array", "items": deep}
        fmt = {"type": "json_schema", "json_schema": {"name": "d", "schema": deep}}
        return "/v1/chat/completions", {"messages": HELLO, "response_format": fmt}
    n = draw(st.sampled_from([100, 2_000]))
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(n)}}
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": wide}}
    return "/v1/chat/completions", {"messages": HELLO, "response_format": fmt}


def _raw(draw: st.DrawFn, body: dict[str, Any]) -> bytes:
    """A body as bytes, sometimes broken: cut, a surrogate or NaN spliced in, deep nesting."""
    raw = json.dumps(body).encode()
    how = draw(st.sampled_from(["as is", "as is", "cut", "splice", "deep", "bytes"]))
    if how == "cut":
        return raw[: draw(st.integers(0, len(raw)))]
    if how == "splice":
        at = draw(st.integers(0, len(raw)))
        junk = [b'"\\ud800"', b"NaN", b"1e999", b"9" * 5000, b"\\", b"\xed\xa0\x80", b"[" * 2000]
        return raw[:at] + draw(st.sampled_from(junk)) + raw[at:]
    if how == "deep":
        depth = draw(st.sampled_from([100, 900, 5000]))
        return raw[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
    if how == "bytes":
        return draw(st.binary(max_size=64))
    return raw


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes | None]:
    """(method, path, body) for any route."""
    route = draw(
        st.sampled_from(
            ["chat"] * 5 + ["completions"] * 2 + ["agents"] * 4 + ["big", "ops", "elsewhere"]
        )
    )
    if route == "agents":
        path = draw(st.sampled_from(sorted(AGENT_ROUTES)))
        fields, base = AGENT_ROUTES[path]
        return (
            "POST",
            path + draw(st.sampled_from(["", "?beta=true"])),
            _raw(draw, draw(nearly_valid(fields, base))),
        )
    if route == "chat":
        body = draw(nearly_valid(CHAT_FIELDS, {"messages": HELLO}))
        return "POST", "/v1/chat/completions", _raw(draw, body)
    if route == "completions":
        body = draw(nearly_valid(COMPLETION_FIELDS, {"prompt": "Hello"}))
        return "POST", "/v1/completions", _raw(draw, body)
    if route == "big":
        path, body = _big(draw)
        return "POST", path, json.dumps({**body, "max_tokens": 2}).encode()
    if route == "ops":
        path = draw(st.sampled_from(["/health", "/metrics", "/v1/models"]))
        method = draw(st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"]))
        return method, path, draw(st.none() | st.binary(max_size=32))
    path = draw(
        st.sampled_from(["/", "/v1", "/v1/chat", "/v1/embeddings", "/docs", "/openapi.json"])
    )
    return (
        draw(st.sampled_from(["GET", "POST"])),
        path + draw(st.sampled_from(["", "?x=1", "/%00"])),
        None,
    )


# -- the suite -----------------------------------------------------------------------------------


def _check(path: str, response: httpx.Response, streamed: bytes) -> None:
    """Below 500, and a stream ends the way its API ends a stream that did not fail."""
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        return
    last = streamed.rstrip().rpartition(b"\n\n")[2]
    if path.startswith("/v1/messages"):
        assert b"event: error" not in streamed, streamed[-500:]
        assert last.startswith(b"event: message_stop"), last[:200]
    elif path.startswith("/v1/responses"):
        assert b"response.failed" not in streamed, streamed[-500:]
        assert last.split(b"\n")[0] in (b"event: response.completed", b"event: response.incomplete")
    else:
        assert b'"server_error"' not in streamed, streamed[-500:]
        assert last == b"data: [DONE]", last[:200]


@pytest.mark.slow
def test_no_input_is_a_server_error_and_the_server_lives_on(fuzzed: ServerProcess) -> None:
    """``REQUESTS`` drawn requests: none is answered 5xx (a stream's in-band errors included);
    afterwards the process is alive, serves a normal request, and its memory grew by less
    than ``RSS_GROWTH_MAX_MB``."""
    started_mb = rss_mb(fuzzed)
    statuses: dict[int, int] = {}

    with httpx.Client(base_url=fuzzed.url, timeout=120) as http:

        @settings(
            max_examples=REQUESTS,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(request=requests())
        def one(request: tuple[str, str, bytes | None]) -> None:
            method, path, body = request
            headers = {"content-type": "application/json"} if body is not None else {}
            with http.stream(method, path, content=body, headers=headers) as response:
                streamed = response.read()
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert fuzzed.alive, f"the server died (exit {fuzzed.returncode}):\n{fuzzed.log()}"
            _check(path, response, streamed)

        one()
        assert fuzzed.alive, fuzzed.log()
        served = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4})
    assert served.status_code == 200, served.text
    assert served.json()["usage"]["completion_tokens"] == 4
    grown = rss_mb(fuzzed) - started_mb
    print(
        f"fuzz: {sum(statuses.values())} requests, statuses {sorted(statuses.items())}, "
        f"RSS {started_mb:.0f} MB -> {started_mb + grown:.0f} MB"
    )
    assert sum(statuses.values()) >= REQUESTS
    assert 200 in statuses and 400 in statuses
    assert grown < RSS_GROWTH_MAX_MB
    log = fuzzed.log(None)
    assert "Traceback" not in log and "unhandled error" not in log, log[-4000:]
