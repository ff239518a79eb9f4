"""``app.core.limits``: what one request may cost, refused as a 400 before any of it is paid.

Each refusal is a ``LimitExceeded`` (code ``limit_exceeded``) whose message names the value,
the limit and the flag that raises it, and whose ``param`` points at the field. The JSON walk
is iterative: a value far deeper than Python's stack is refused, never a ``RecursionError``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.core.limits import MAX_JSON_DEPTH, Limits, check_json, lone_surrogate_at
from app.errors import LimitExceeded
from app.settings import Settings


def nested(depth: int) -> Any:
    """An object ``depth`` levels deep: ``{"a": {"a": ... {} }}``."""
    value: Any = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def compact_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def about(estimate: int, size: int) -> bool:
    """The walk's size is an estimate (it counts structure, not every quote and colon)."""
    return abs(estimate - size) <= 0.15 * size + 4


def test_limits_come_from_the_settings_of_the_same_names() -> None:
    values = {
        "max_messages": 3,
        "max_prompt_bytes": 5000,
        "max_stop_strings": 2,
        "max_stop_chars": 5,
        "max_tools": 7,
        "max_schema_bytes": 2048,
        "max_grammar_bytes": 4096,
    }
    limits = Limits.from_settings(Settings.model_validate(values))
    assert {name: getattr(limits, name) for name in values} == values


def test_stop_strings_are_counted_and_measured() -> None:
    limits = Limits(max_stop_strings=2, max_stop_chars=4)
    limits.check_stop(["abcd", "x"])  # at both limits: accepted
    with pytest.raises(LimitExceeded) as many:
        limits.check_stop(["a", "b", "c"])
    assert (many.value.param, many.value.code, many.value.status_code) == (
        "stop",
        "limit_exceeded",
        400,
    )
    assert "(3)" in many.value.message and "--max-stop-strings" in many.value.message
    with pytest.raises(LimitExceeded) as long_second:
        limits.check_stop(["ok", "abcde"])
    assert long_second.value.param == "stop.1"
    assert "5 characters" in long_second.value.message
    assert "--max-stop-chars" in long_second.value.message
    with pytest.raises(LimitExceeded) as long_only:
        limits.check_stop(["abcde"])
    assert long_only.value.param == "stop"  # a single string is the field itself


def test_a_schema_is_refused_over_its_size_and_its_size_is_returned_under_it() -> None:
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(40)}}
    size = compact_size(schema)
    limits = Limits(max_schema_bytes=2 * size)
    assert about(limits.check_schema(schema, param="tools.0.function.parameters"), size)
    with pytest.raises(LimitExceeded) as refused:
        Limits(max_schema_bytes=size // 2).check_schema(schema, param="response_format")
    assert refused.value.param == "response_format"
    assert "'response_format'" in refused.value.message
    assert "--max-schema-bytes" in refused.value.message


@pytest.mark.parametrize(
    "value", [nested(5), [1, "é", None, True, 2.5, {"k": [[]]}], "text", 12345678901234567890]
)
def test_the_size_walk_is_about_the_compact_json_size(value: Any) -> None:
    assert about(check_json(value, param="v"), compact_size(value))


def test_depth_is_refused_past_the_fixed_limit_whatever_the_size() -> None:
    assert check_json(nested(MAX_JSON_DEPTH), param="v") > 0
    for too_deep in (nested(MAX_JSON_DEPTH + 1), _list_nested(MAX_JSON_DEPTH + 1)):
        with pytest.raises(LimitExceeded) as refused:
            check_json(too_deep, param="tools.0.function.parameters", max_bytes=10**9)
        assert f"{MAX_JSON_DEPTH} levels" in refused.value.message
        assert refused.value.param == "tools.0.function.parameters"
        assert "--" not in refused.value.message  # no setting raises it


def _list_nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_a_value_deeper_than_the_python_stack_is_refused_without_recursion() -> None:
    with pytest.raises(LimitExceeded):
        check_json(_list_nested(100_000), param="v")


def test_the_walk_stops_at_the_first_limit_passed() -> None:
    """A huge value costs what the limit allows: the walk ends once the size is past it."""
    huge = ["x" * 100] * 1_000_000
    with pytest.raises(LimitExceeded):
        check_json(huge, param="v", max_bytes=1024, setting="max_schema_bytes")


def test_grammar_and_prompt_sizes_name_their_source_and_setting() -> None:
    limits = Limits(max_grammar_bytes=2048, max_prompt_bytes=100)
    limits.check_grammar("x" * 2048, param="tools")
    with pytest.raises(LimitExceeded) as grammar:
        limits.check_grammar("x" * 3 * 1024, param="tools")
    assert grammar.value.message.startswith(
        "The grammar for the forced tool call's parameter schemas (3 KiB)"
    )
    assert "2 KiB" in grammar.value.message and "--max-grammar-bytes" in grammar.value.message
    with pytest.raises(LimitExceeded) as schema_grammar:
        limits.check_grammar("é" * 1500, param="response_format")  # 3000 bytes of UTF-8
    assert "response_format schema" in schema_grammar.value.message
    limits.check_prompt_bytes(100, param="messages")
    with pytest.raises(LimitExceeded) as prompt:
        limits.check_prompt_bytes(101, param="prompt")
    assert prompt.value.param == "prompt"
    assert "101 bytes" in prompt.value.message and "--max-prompt-bytes" in prompt.value.message


def test_check_count_refuses_only_past_the_limit() -> None:
    limits = Limits()
    limits.check_count("The number of tools", 5, 5, param="tools", setting="max_tools")
    with pytest.raises(LimitExceeded) as refused:
        limits.check_count("The number of tools", 6, 5, param="tools", setting="max_tools")
    assert refused.value.message == (
        "The number of tools (6) is over this server's limit of 5 (--max-tools)."
    )


def test_lone_surrogates_are_found_with_their_path() -> None:
    clean = {"messages": [{"role": "user", "content": "café 😀"}], "n": 1}
    assert lone_surrogate_at(clean) is None
    in_value = {"messages": [{"content": "ok"}, {"content": "bad \ud800"}]}
    assert lone_surrogate_at(in_value) == "messages.1.content"
    assert lone_surrogate_at(["\udfff"], "stop") == "stop.0"
    assert lone_surrogate_at({"tools": {"\ud83d": 1}}) == "tools"
    assert lone_surrogate_at({"\ud83d": 1}) == "(a key)"
    assert lone_surrogate_at(_list_nested(100_000)) is None  # iterative, like the size walk
