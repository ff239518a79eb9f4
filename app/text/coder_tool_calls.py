"""Parsing Qwen3-Coder's XML tool calls out of the answer, as it streams.

Qwen3-Coder writes each call as::

    <tool_call>
    <function=NAME>
    <parameter=P1>
    VALUE1
    </parameter>
    </function>
    </tool_call>

one block per call (several in a row are parallel calls). Values are raw text: a string is not
quoted, numbers, booleans, objects and arrays are JSON text, so a value's JSON type comes from
the tool's schema (``app.text.schema_types``). The parser has the interface of the Qwen3 JSON
parser (``app.text.tool_calls``: the same ``ToolCallDelta`` and ``ParsedToolCall``), so the
pipeline, the response formats and the metrics do not know which format a model speaks.

Streaming. The first delta of a call carries its index, id and name as soon as
``<function=NAME>`` is read. ``arguments`` is JSON written as the model goes: ``{"P1": `` as
soon as ``<parameter=P1>`` is read, ``, "P2": `` for the next, ``}`` at ``</function>``. A value
leaves as soon as its type is decided:

- A value that can only be a string (the schema says ``string``, or its text can no longer
  become a value of any other type the schema allows: ``Paris`` for ``["integer", "string"]``)
  streams at once: ``"`` and then its characters, JSON-escaped, as they arrive; the quote
  closes at ``</parameter>``. Only what could still be markup is held back: the newline that
  ends the value and a partial closing tag.
- A value that may still be another type (``12`` for an integer, ``{"a"`` for an object) is
  held until its closing tag, then written as JSON if it parses as one of the allowed types,
  or as a JSON string of its text if it does not: a value that does not fit its type never
  drops the call.

The newline right after ``<parameter=P>`` and the one right before ``</parameter>`` belong to
the markup.

Calls as written in the wild. The model does not always follow its template, and other
servers lost such calls (Ollama #18563, vLLM #22975, Ollama #14570); each tag is read where
the template would have it, and its absence is tolerated:

- ``<function=NAME>`` without the ``<tool_call>`` wrapper, anywhere in the answer, opens a
  call (text before it is content). It is held only while the text could still be that tag.
- A missing closing tag is implied by what follows: a value ends at ``</parameter>``,
  ``</function>`` or ``</tool_call>`` wherever they are, and at ``<parameter=``,
  ``<function=`` or ``<tool_call>`` at the start of a line (opening tags inside a value count
  only there: an opening tag within a line of a file the model writes stays text). A function
  ends at ``</function>``, ``</tool_call>``, or the next function or block. After
  ``</function>``, text that is not ``</tool_call>`` is read as answer text again.
- Whitespace between the parts of a call (blank lines between tags) is skipped. A value's own
  text is kept as written, so where its ``</parameter>`` is missing, a blank line before the
  next tag is the value's.
- A generation that ends inside a call (``max_tokens``, or the end of the turn) has its value
  and its arguments object closed, so ``arguments`` is always valid JSON, streamed or buffered.
  Markup the end leaves unfinished is dropped, never shown: a partial tag at the end of a
  value, and a call whose name was not read (``<function=get_wea``).

A block whose head is not ``<function=NAME>`` is not a call: it is returned as content, tags
included. Once a name has been sent the call stays a call; text inside a function that is not a
parameter is dropped. The alternative rejected: buffering each call until ``</tool_call>`` and
parsing it whole (as several servers do), which holds a long string argument — a file the
model writes — back until the model has finished writing it, and loses a call whose tags do
not all match.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from typing import Any, Literal

from app.text.schema_types import ParameterTypes, json_type
from app.text.tags import partial_tag_suffix
from app.text.tool_calls import (
    CLOSE,
    OPEN,
    AnswerPart,
    CallParser,
    ParsedToolCall,
    ToolCallDelta,
    emit_text,
    take_text,
)

FUNCTION = "<function="
FUNCTION_END = "</function>"
PARAMETER = "<parameter="
PARAMETER_END = "</parameter>"
_OPENS = (OPEN, FUNCTION)
"""What opens a call in answer text: the wrapper, or a function written without it."""
_CLOSING = (PARAMETER_END, FUNCTION_END, CLOSE)
_OPENING = ("\n" + PARAMETER, "\n" + FUNCTION, "\n" + OPEN)
_VALUE_ENDS = _CLOSING + _OPENING
"""What ends a value: a closing tag anywhere, an opening tag at the start of a line."""
_BODY_TAGS = (PARAMETER, FUNCTION_END, CLOSE, FUNCTION, OPEN)
_LONGEST_END = max(len(tag) for tag in _VALUE_ENDS)
_MAX_NAME = 256
_NUMBER_PREFIX = re.compile(r"-?[0-9]*(?:\.[0-9]*)?(?:[eE][-+]?[0-9]*)?")

State = Literal["text", "head", "body", "value", "between", "done"]
"""``head``: after ``<tool_call>`` or at a bare ``<function=``, before the function's name is
read; ``body``: inside a function, between parameters; ``value``: inside a parameter;
``between``: after ``</function>``, before ``</tool_call>`` (or, that missing, more answer);
``done``: after the one call asked for (``parallel_tool_calls: false``), nothing is read."""


class CoderToolCallParser(CallParser):
    def __init__(
        self, tools: Mapping[str, Mapping[str, Any] | None], *, single_call: bool = False
    ) -> None:
        """``tools``: each offered tool's ``parameters`` schema, by tool name. A call is
        complete once its ``</function>`` is read, or what follows implies it. With
        ``single_call`` nothing after the first call is read: a call that ends only because
        the next one starts must not start the next one too."""
        super().__init__()
        self._single_call = single_call
        self._types = {name: ParameterTypes(schema) for name, schema in tools.items()}
        self._untyped = ParameterTypes(None)
        self._state: State = "text"
        self._bare = False  # the head is a <function= without <tool_call>
        self._call_types = self._untyped
        self._parameters = 0  # parameters written into the current call's arguments
        self._current = _Value(frozenset())

    def finish(self, *, cut: bool = True) -> list[AnswerPart]:
        parts = self.push("")
        rest, self._held = self._held, ""
        if self._state == "text":
            # Held only because it could still open a call: where the generation was cut, it
            # is the start of a call cut short, not answer text; where the model ended its
            # answer itself, it is text ("x <").
            unopened = partial_tag_suffix(rest, _OPENS) if cut else 0
            emit_text(
                rest[: len(rest) - unopened],
                called=self.called,
                parts=parts,
            )
        elif self._state == "value":
            self._end_value(rest[: len(rest) - self._unfinished_tag(rest)], parts)
            self._end_call(parts)
        elif self._state == "body":
            self._end_call(parts)
        # "head": a call whose name was never read, which cannot be reported; "between":
        # whitespace, or the start of </tool_call>. Neither is answer text.
        self._state = "text"
        return parts

    # -- states ----------------------------------------------------------------------------

    def _text(self, parts: list[AnswerPart]) -> None:
        self._held, opened = take_text(self._held, called=self.called, parts=parts, opens=_OPENS)
        if opened:
            self._bare = opened == FUNCTION
            if self._bare:
                self._held = FUNCTION + self._held  # the head reads the whole tag
            self._state = "head"

    def _head(self, parts: list[AnswerPart]) -> None:
        found = _tag_with_name(self._held.lstrip(), FUNCTION)
        if found is None:
            return  # could still be <function=NAME>: wait
        if found is False:
            # Not a call: the tag is content, and the text after it is answer text again
            # (which may open a real call).
            if self._bare:
                parts.append(FUNCTION)
                self._held = self._held[len(FUNCTION) :]
            else:
                parts.append(OPEN)
            self._state = "text"
            return
        name, self._held = found
        self._start_call(name, parts)

    def _body(self, parts: list[AnswerPart]) -> None:
        held = self._skip_to_tag(_BODY_TAGS)
        if held is None:
            return
        if held.startswith(FUNCTION_END):
            self._held = held[len(FUNCTION_END) :]
            self._end_call(parts)
            self._state = "between"
        elif held.startswith(CLOSE):
            self._held = held[len(CLOSE) :]
            self._end_call(parts)
            self._state = "text"
        elif held.startswith(OPEN):  # </function> and </tool_call> missing: the next block
            self._held = held[len(OPEN) :]
            self._end_call(parts)
            self._bare = False
            self._state = "head"
        else:
            tag = PARAMETER if held.startswith(PARAMETER) else FUNCTION
            found = _tag_with_name(held, tag)
            if found is None:
                self._held = held
            elif found is False:
                self._held = held[1:]  # not a tag: drop its "<", look further
            elif tag == PARAMETER:
                name, self._held = found
                self._start_value(name, parts)
            else:  # </function> missing: the next function is the next call
                name, self._held = found
                self._end_call(parts)
                self._start_call(name, parts)

    def _value(self, parts: list[AnswerPart]) -> None:
        value = self._current
        held = self._held
        if not value.opened:
            if not held:
                return
            if held[0] == "\n":  # the newline after <parameter=P> is markup
                held = held[1:]
            value.opened = True
        # Until some of it is sent, the held text starts the value's first line, where an
        # opening tag ends the value as one after a newline does.
        lead = "" if value.sent else "\n"
        text = lead + held
        ends = [(i, tag) for tag in _VALUE_ENDS if (i := text.find(tag, value.scanned)) >= 0]
        if ends:
            # A missing </parameter>: the value ends at the tag that closes the function or
            # the call, or at the next parameter, function or block, which the body reads.
            end, tag = min(ends)
            if tag in _OPENING:
                end += 1  # the newline is the value's last (markup, as before </parameter>)
            self._held = text[end + len(tag) :] if tag == PARAMETER_END else text[end:]
            self._end_value(text[len(lead) : end], parts)
            self._state = "body"
            return
        if value.until_end:
            # An object or array: nothing to decide before its closing tag, and nothing
            # before the last few characters to search again (a long value stays linear).
            value.scanned = max(len(text) - _LONGEST_END + 1, 0)
            self._held = held
            return
        keep = partial_tag_suffix(text, _VALUE_ENDS)
        if len(text) > keep and text[len(text) - keep - 1] == "\n":
            keep += 1  # may be the newline before </parameter>
        ready = held[: len(held) - min(keep, len(held))]
        fragment = value.stream(ready)
        if fragment is not None:
            held = held[len(ready) :]
            value.sent = value.sent or bool(ready)
            if fragment:
                self._arguments(fragment, parts)
        self._held = held

    def _between(self, _: list[AnswerPart]) -> None:
        held = self._held.lstrip()
        if held.startswith(CLOSE):
            self._held = held[len(CLOSE) :]
            self._state = "text"
        elif held and not CLOSE.startswith(held):
            # </tool_call> missing (or never opened): what follows is answer text, which
            # may open the next call (a second function in the block is a parallel call).
            self._state = "text"

    def _done(self, _: list[AnswerPart]) -> None:
        self._held = ""

    # -- helpers ---------------------------------------------------------------------------

    def _skip_to_tag(self, tags: tuple[str, ...]) -> str | None:
        """Inside a call, text outside a parameter is not part of any value: drop it up to
        the next ``<``. Returns the held text from there, or None (all dropped, or only a
        possible tag's beginning held)."""
        held = self._held.lstrip()
        start = held.find("<")
        if start < 0:
            self._held = ""
            return None
        held = held[start:]
        if not any(held.startswith(tag) for tag in tags) and any(
            tag.startswith(held) for tag in tags
        ):
            self._held = held
            return None
        return held

    def _unfinished_tag(self, held: str) -> int:
        """How much of the end of a value's ``held`` text, at the end of the generation, is
        the start of a tag that would have ended it (the newline before it stays the
        value's, dropped as markup)."""
        text = ("" if self._current.sent else "\n") + held
        closing = partial_tag_suffix(text, _CLOSING)
        opening = partial_tag_suffix(text, _OPENING) - 1
        return min(max(closing, opening, 0), len(held))

    def _start_call(self, name: str, parts: list[AnswerPart]) -> None:
        if self._single_call and self.calls:
            self._held, self._state = "", "done"
            return
        call = ParsedToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=name)
        self.calls.append(call)
        self._call_types = self._types.get(name, self._untyped)
        self._parameters = 0
        parts.append(ToolCallDelta(len(self.calls) - 1, "", id=call.id, name=name))
        self._state = "body"

    def _start_value(self, name: str, parts: list[AnswerPart]) -> None:
        self._current = _Value(self._call_types.of(name) - {"string"})
        key = ("{" if self._parameters == 0 else ", ") + json.dumps(name, ensure_ascii=False)
        self._parameters += 1
        self._arguments(key + ": " + self._current.start(), parts)
        self._state = "value"

    def _end_value(self, text: str, parts: list[AnswerPart]) -> None:
        if text.endswith("\n"):  # the newline before </parameter> is markup
            text = text[:-1]
        self._arguments(self._current.end(text), parts)

    def _end_call(self, parts: list[AnswerPart]) -> None:
        self._arguments("}" if self._parameters else "{}", parts)
        self.completed += 1

    def _arguments(self, fragment: str, parts: list[AnswerPart]) -> None:
        call = self.calls[-1]
        call.arguments += fragment
        parts.append(ToolCallDelta(len(self.calls) - 1, fragment))


def _tag_with_name(text: str, tag: str) -> tuple[str, str] | Literal[False] | None:
    """``text`` starts with ``<tag=NAME>``: (NAME, the text after it); False: it cannot; None:
    it still could."""
    if not text.startswith(tag):
        return None if tag.startswith(text) else False
    end = text.find(">", len(tag))
    name = text[len(tag) : end if end >= 0 else len(text)]
    if "<" in name or "\n" in name or len(name) > _MAX_NAME:
        return False
    if end < 0:
        return None
    name = name.strip()
    return (name, text[end + 1 :]) if name else False


class _Value:
    """One parameter value: streamed as a string, or held until its type is known."""

    def __init__(self, types: frozenset[str]) -> None:
        self._types = types
        """The JSON types other than string the value may parse as (string always fits)."""
        self.opened = False
        """The first character after ``<parameter=P>`` has been read (a newline is markup)."""
        self.sent = False
        """Some of the value's text has been streamed (what is held no longer starts it)."""
        self._streaming = not types
        self.until_end = False
        """Held to its closing tag whatever follows (it opened an object or array)."""
        self.scanned = 0
        """Where the search for the closing tag resumes in the held text."""

    def start(self) -> str:
        return '"' if self._streaming else ""

    def stream(self, ready: str) -> str | None:
        """The arguments fragment for ``ready``, the value's next text that cannot be markup;
        None while the value might still parse as another type (``ready`` stays held)."""
        if not self._streaming:
            if _may_become(ready, self._types):
                first = ready.lstrip()[:1]
                self.until_end = first in ("{", "[")
                return None
            self._streaming = True
            return '"' + _escape(ready)
        return _escape(ready)

    def end(self, rest: str) -> str:
        """The last fragment of the value, given the text still held at its closing tag."""
        if self._streaming:
            return _escape(rest) + '"'
        typed = _typed(rest, self._types)
        return typed if typed is not None else json.dumps(rest, ensure_ascii=False)


def _escape(text: str) -> str:
    # Per-character escaping, so the escaped pieces concatenate to the escaped whole.
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _may_become(text: str, types: frozenset[str]) -> bool:
    """Could ``text``, with more text after it, still parse as one of ``types``?
    Conservative: True whenever unsure (holding longer is never wrong)."""
    s = text.strip()
    if not s:
        return bool(types)
    low = s.lower()
    if (s[0] == "{" and "object" in types) or (s[0] == "[" and "array" in types):
        return True
    if "null" in types and ("null".startswith(low) or "none".startswith(low)):
        return True
    if "boolean" in types and ("true".startswith(low) or "false".startswith(low)):
        return True
    numeric = "integer" in types or "number" in types
    return numeric and _NUMBER_PREFIX.fullmatch(s) is not None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _typed(text: str, types: frozenset[str]) -> str | None:
    """The JSON text of a value that parses as one of ``types``; None if it does not.

    Besides JSON, ``True``/``False``/``None`` are read as booleans and null: the chat template
    renders history values with Jinja's ``string`` filter, so a model may echo Python's
    spelling.
    """
    s = text.strip()
    low = s.lower()
    if "null" in types and low in ("null", "none"):
        return "null"
    if "boolean" in types and low in ("true", "false"):
        return low
    try:
        value = json.loads(s, parse_constant=_reject_constant)
    except ValueError:
        return None
    kind = json_type(value)
    if kind == "number" and "number" not in types and float(value).is_integer():
        value, kind = int(value), "integer"
    fits = kind in types or (kind == "integer" and "number" in types)
    if not fits or kind == "string":
        return None
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError:  # 1e999 parses as infinity
        return None
