"""Parsing Qwen3's ``<tool_call>{json}</tool_call>`` blocks out of the answer, as it streams.

Qwen3 (like Hermes) writes each call as
``<tool_call>\\n{"name": "...", "arguments": {...}}\\n</tool_call>``, one block per call. The
parser turns content text into plain text and tool-call deltas the way OpenAI streams them:
the first delta of a call carries its index, id, type and name (as soon as the name is
complete), later deltas carry fragments of ``arguments`` as they are decoded. The arguments are
the model's own JSON text, so the fragments of a stream concatenate to exactly the buffered
``function.arguments``.

A block whose head is not ``{"name": "<string>", "arguments": `` is not a call: it is returned
as content, tags included, never as an error. Once a name has been sent the call stays a call;
constrained decoding (``tool_choice`` ``required`` or a named function) makes its arguments
valid JSON by construction.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Literal

from app.text.tags import partial_tag_suffix

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_MAX_HEAD = 512  # a head longer than this is not a call


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    arguments: str
    id: str | None = None
    name: str | None = None
    """``id`` and ``name`` are set on the first delta of a call only."""


@dataclass
class ParsedToolCall:
    """A call as parsed so far: ``arguments`` grows as its fragments are decoded."""

    id: str
    name: str
    arguments: str = ""


AnswerPart = str | ToolCallDelta
"""Plain answer text, or a piece of a tool call."""


def take_text(
    held: str, *, called: bool, parts: list[AnswerPart], opens: tuple[str, ...] = (OPEN,)
) -> tuple[str, str]:
    """The answer text before the next tag that opens a call (``opens``: ``<tool_call>``, and
    for Qwen3-Coder also a bare ``<function=``), for both call formats' parsers.

    Text that cannot be part of an opening tag goes to ``parts``; returns what is still held
    and the opening tag that was read ("" if none; what is held is then the text after it).
    Whitespace between or after calls is not an answer: it is held until text follows it, or
    dropped.
    """
    found = [(start, tag) for tag in opens if (start := held.find(tag)) >= 0]
    if found:
        start, tag = min(found)
        emit_text(held[:start], called=called, parts=parts)
        return held[start + len(tag) :], tag
    keep = partial_tag_suffix(held, opens)
    release = held[: len(held) - keep]
    if called and not release.strip():
        return held, ""  # wait for more
    emit_text(release, called=called, parts=parts)
    return held[len(held) - keep :], ""


def emit_text(text: str, *, called: bool, parts: list[AnswerPart]) -> None:
    if text and not (called and not text.strip()):
        parts.append(text)


class _JsonValueEnd:
    """Finds where one JSON value ends, fed a character at a time (strings and nesting aware)."""

    def __init__(self) -> None:
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._started = False
        self.done = False

    def feed(self, text: str) -> int:
        """How many characters of ``text`` belong to the value (all of them unless it ended)."""
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
                    if self._depth == 0:
                        self.done = True
                        return i + 1
                continue
            if ch == '"':
                self._in_string = True
                self._started = True
            elif ch in "{[":
                self._depth += 1
                self._started = True
            elif self._started and self._depth == 0 and (ch.isspace() or ch in ",}]"):
                self.done = True  # the end of a bare number or literal
                return i
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self.done = True
                    return i + 1
            elif not ch.isspace():
                self._started = True
        return len(text)


class CallParser:
    """What both tool-call formats' parsers share: a state machine over the held text.

    Each state is a method ``_<state>(parts)`` that consumes what it can decide of the held
    text; ``push`` runs states until one decides nothing more, so a delta leaves as soon as
    it is decided and text that could still be a tag stays held.
    """

    def __init__(self) -> None:
        self._state = "text"
        self._held = ""
        self.calls: list[ParsedToolCall] = []
        self.completed = 0
        """Calls that are complete (their closing tag has been read)."""

    @property
    def called(self) -> bool:
        return bool(self.calls)

    def push(self, text: str) -> list[AnswerPart]:
        self._held += text
        parts: list[AnswerPart] = []
        while True:
            before = (self._state, len(self._held))
            getattr(self, f"_{self._state}")(parts)
            if (self._state, len(self._held)) == before:
                return parts


class ToolCallParser(CallParser):
    """Qwen3's JSON format: ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``."""

    def __init__(self) -> None:
        super().__init__()
        self._state: Literal["text", "head", "arguments", "tail"] = "text"
        self._value: _JsonValueEnd | None = None

    def finish(self, *, cut: bool = True) -> list[AnswerPart]:
        """What is still held, at the end of generation (``cut`` does not matter here: held
        answer text and an unfinished head are shown as text either way)."""
        parts = self.push("")
        rest, self._held = self._held, ""
        if self._state == "head":
            parts.append(OPEN + rest)  # never became a call
        elif self._state == "text":
            emit_text(rest, called=self.called, parts=parts)
        elif self._state == "arguments" and rest:
            parts.append(self._arguments_delta(rest))
        return parts

    def _text(self, parts: list[AnswerPart]) -> None:
        self._held, opened = take_text(self._held, called=self.called, parts=parts)
        if opened:
            self._state = "head"

    def _head(self, parts: list[AnswerPart]) -> None:
        match = _HEAD.match(self._held)
        if match is not None and match.end() < len(self._held):
            name = json.loads(f'"{match.group(1)}"')
            call = ParsedToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=name)
            self.calls.append(call)
            parts.append(ToolCallDelta(len(self.calls) - 1, "", id=call.id, name=name))
            self._held = self._held[match.end() :]
            self._value = _JsonValueEnd()
            self._state = "arguments"
            return
        if CLOSE in self._held or len(self._held) > _MAX_HEAD or not self._plausible_head():
            not_a_call, self._held = OPEN + self._held, ""
            self._state = "text"
            parts.append(not_a_call)

    def _plausible_head(self) -> bool:
        """Could more text still make the held head match ``{"name": "...", "arguments": ``?"""
        probe = self._held.lstrip()
        skeleton = '{"name": "'
        compact = re.sub(r"\s+", "", probe)
        if len(compact) < len(skeleton) - 1:
            return skeleton.replace(" ", "").startswith(compact)
        return compact.startswith(skeleton.replace(" ", ""))

    def _arguments(self, parts: list[AnswerPart]) -> None:
        assert self._value is not None
        taken = self._value.feed(self._held)
        if taken:
            parts.append(self._arguments_delta(self._held[:taken]))
            self._held = self._held[taken:]
        if self._value.done:
            self._state = "tail"

    def _arguments_delta(self, fragment: str) -> ToolCallDelta:
        call = self.calls[-1]
        call.arguments += fragment
        return ToolCallDelta(len(self.calls) - 1, fragment)

    def _tail(self, _: list[AnswerPart]) -> None:
        end = self._held.find(CLOSE)
        if end >= 0:
            self._held = self._held[end + len(CLOSE) :]
            self._state = "text"
            self.completed += 1
