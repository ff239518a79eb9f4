"""What one request may cost, checked before any of it is paid.

Each cap is a setting (``Limits.from_settings``; docs/api.md, Limits) whose default is far
above what agents send — 100+ messages, 50+ tools, 20k-token prompts — and below what would
hold the engine or the event loop: the stop strings are matched on the event loop against
every token's text, a tool's schema becomes a grammar that llama.cpp walks at every decode
step, a prompt is rendered and tokenized before its length is known. A refusal is a 400
(``LimitExceeded``, code ``limit_exceeded``) naming the field, the limit and its setting.

The values the wire types leave untyped (tool parameters, a ``response_format`` schema,
``chat_template_kwargs``, the arguments of a history tool call) are walked once, without
recursion, for their size and depth, stopping at the first limit passed: the walk costs at
most what the limit allows. A value nested deeper than ``MAX_JSON_DEPTH`` is refused whatever
its size: the schema converter, pydantic's serializer and the template's ``tojson`` all
recurse on it, and past Python's stack they would fail with a 500. That depth is not a setting
for the same reason.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.core.requests import ChatRequest
from app.errors import LimitExceeded
from app.settings import Settings

MAX_JSON_DEPTH = 64
"""Deepest nesting of objects and arrays in one untyped value (a schema 30 levels deep is
about 60: ``properties`` and the property's schema are a level each)."""


@dataclass(frozen=True)
class Limits:
    max_messages: int = 4096
    max_prompt_bytes: int = 4 * 1024 * 1024
    max_stop_strings: int = 64
    max_stop_chars: int = 512
    max_tools: int = 512
    max_schema_bytes: int = 256 * 1024
    max_grammar_bytes: int = 128 * 1024

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_messages=settings.max_messages,
            max_prompt_bytes=settings.max_prompt_bytes,
            max_stop_strings=settings.max_stop_strings,
            max_stop_chars=settings.max_stop_chars,
            max_tools=settings.max_tools,
            max_schema_bytes=settings.max_schema_bytes,
            max_grammar_bytes=settings.max_grammar_bytes,
        )

    def check_chat(self, req: ChatRequest) -> int:
        """A chat request's counts and untyped values within the limits; returns the size of
        its schemas (as compact JSON, about)."""
        self.check_count(
            "The number of messages",
            len(req.turns),
            self.max_messages,
            param="messages",
            setting="max_messages",
        )
        self.check_count(
            "The number of tools",
            len(req.tools),
            self.max_tools,
            param="tools",
            setting="max_tools",
        )
        self.check_stop(req.stop)
        schema_bytes = 0
        for i, tool in enumerate(req.tools):
            if tool.parameters is not None:
                schema_bytes += self.check_schema(
                    tool.parameters, param=f"tools.{i}.function.parameters"
                )
        if req.json_output is not None and req.json_output.schema:
            schema_bytes += self.check_schema(
                req.json_output.schema, param="response_format.json_schema.schema"
            )
        if req.template_kwargs:
            check_json(req.template_kwargs, param="chat_template_kwargs")
        return schema_bytes

    def check_count(self, what: str, count: int, limit: int, *, param: str, setting: str) -> None:
        if count > limit:
            raise LimitExceeded(f"{what} ({count})", f"{limit}", param=param, setting=setting)

    def check_stop(self, stop: Sequence[str]) -> None:
        self.check_count(
            "The number of stop strings",
            len(stop),
            self.max_stop_strings,
            param="stop",
            setting="max_stop_strings",
        )
        for i, text in enumerate(stop):
            if len(text) > self.max_stop_chars:
                raise LimitExceeded(
                    f"Stop string {i} ({len(text)} characters)",
                    f"{self.max_stop_chars} characters",
                    param=f"stop.{i}" if len(stop) > 1 else "stop",
                    setting="max_stop_chars",
                )

    def check_schema(self, schema: Any, *, param: str) -> int:
        """A tool's parameters or a response_format schema: at most ``max_schema_bytes`` of
        compact JSON and ``MAX_JSON_DEPTH`` deep. Returns its size."""
        return check_json(
            schema, param=param, max_bytes=self.max_schema_bytes, setting="max_schema_bytes"
        )

    def check_grammar(self, grammar: str, *, param: str) -> None:
        size = len(grammar.encode("utf-8"))
        if size > self.max_grammar_bytes:
            raise LimitExceeded(
                f"The grammar for the {_GRAMMAR_SOURCE.get(param, param)} ({size // 1024} KiB)",
                f"{self.max_grammar_bytes // 1024} KiB",
                param=param,
                setting="max_grammar_bytes",
            )

    def check_prompt_bytes(self, size: int, *, param: str) -> None:
        if size > self.max_prompt_bytes:
            raise LimitExceeded(
                f"The prompt ({size} bytes of UTF-8)",
                f"{self.max_prompt_bytes} bytes",
                param=param,
                setting="max_prompt_bytes",
            )


_GRAMMAR_SOURCE = {
    "tools": "forced tool call's parameter schemas",
    "response_format": "response_format schema",
}


def check_json(
    value: Any, *, param: str, max_bytes: int | None = None, setting: str | None = None
) -> int:
    """Refuse ``value`` if it is nested deeper than ``MAX_JSON_DEPTH`` or (with ``max_bytes``)
    its compact JSON is larger; else return that size (about). One walk without recursion that
    stops at the first limit passed, so it costs at most what the limits allow."""
    size = 0
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            if depth > MAX_JSON_DEPTH:
                raise _too_deep(param)
            size += 1 + len(item)  # braces, and a colon or comma per member
            for key, member in item.items():
                size += _scalar_size(key)
                pending.append((member, depth + 1))
        elif isinstance(item, list | tuple):
            if depth > MAX_JSON_DEPTH:
                raise _too_deep(param)
            size += 1 + max(len(item), 1)
            pending.extend((member, depth + 1) for member in item)
        else:
            size += _scalar_size(item)
        if max_bytes is not None and size > max_bytes:
            raise LimitExceeded(
                f"The value of '{param}' (more than {max_bytes // 1024} KiB as JSON)",
                f"{max_bytes // 1024} KiB",
                param=param,
                setting=setting,
            )
    return size


def lone_surrogate_at(value: Any, path: str = "") -> str | None:
    """Where in ``value`` (JSON-like) a string or key holds a lone UTF-16 surrogate, which no
    UTF-8 text can (JSON's ``"\\ud800"`` escapes can); None if nowhere. Without recursion."""
    pending: list[tuple[Any, str]] = [(value, path)]
    while pending:
        item, where = pending.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return where
        elif isinstance(item, dict):
            for key, member in item.items():
                inside = f"{where}.{key}" if where else str(key)
                if isinstance(key, str) and _SURROGATE.search(key):
                    return where or "(a key)"
                pending.append((member, inside))
        elif isinstance(item, list | tuple):
            pending.extend(
                (member, f"{where}.{i}" if where else str(i)) for i, member in enumerate(item)
            )
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _scalar_size(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode("utf-8", errors="surrogatepass")) + 2
    if value is None or isinstance(value, bool | float):
        return 5
    if isinstance(value, int):
        return value.bit_length() * 3 // 10 + 1  # its decimal digits, about
    return 2


def _too_deep(param: str) -> LimitExceeded:
    return LimitExceeded(
        f"The value of '{param}' (objects and arrays nested more than {MAX_JSON_DEPTH} deep)",
        f"{MAX_JSON_DEPTH} levels",
        param=param,
    )
