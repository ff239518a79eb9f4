"""Sampled token ids to the deltas a client sees: content, reasoning and tool calls.

The stages are fixed: token bytes become text (``utf8``: characters whole), stop strings are
cut (``stops``), Qwen3's ``<think>`` block is split from the answer (``reasoning``), and the
answer is parsed for tool calls when the request offered tools, in the format the model
speaks (``tool_calls`` for Qwen3's JSON calls, ``coder_tool_calls`` for Qwen3-Coder's XML
ones; both produce the same deltas, so nothing downstream knows which). Each stage
holds back only what it must — an unfinished character, text that could still become a stop
string or a tag — so every delta leaves as soon as it is decided, and the deltas of a whole
generation concatenate to exactly what the buffered response says.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from app.text.coder_tool_calls import CoderToolCallParser
from app.text.lines import LineLimit, LineLimits
from app.text.reasoning import Mode, ReasoningSplitter, Segment
from app.text.stops import StopMatcher
from app.text.tool_calls import AnswerPart, ParsedToolCall, ToolCallDelta, ToolCallParser
from app.text.utf8 import TokenBytes, Utf8Decoder

ToolCallFormat = Literal["qwen3", "qwen3_coder"]
"""How the model writes tool calls: Qwen3's ``<tool_call>{json}</tool_call>`` or Qwen3-Coder's
``<tool_call><function=NAME><parameter=P>…`` XML."""


@dataclass(frozen=True)
class Delta:
    """One piece of an answer: exactly one of the fields is set."""

    content: str = ""
    reasoning: str = ""
    tool_call: ToolCallDelta | None = None


@dataclass(frozen=True)
class TextOptions:
    """What a request asks of the pipeline."""

    stop: tuple[str, ...] = ()
    reasoning: Mode = "raw"
    """How to split a ``<think>`` block from the answer (``raw``: no splitting)."""
    tool_calls: bool = False
    """Parse the answer for tool calls (the request offered tools)."""
    single_tool_call: bool = False
    """``parallel_tool_calls: false``: the generation is over once the first call is complete."""
    tool_call_format: ToolCallFormat = "qwen3"
    tool_parameters: Mapping[str, Mapping[str, Any] | None] = field(
        default_factory=dict, hash=False
    )
    """The offered tools' ``parameters`` schemas by name: the Coder format types values by them."""
    n_indent: int = 0
    """An editor's completion ends at a later line indented less (``app.text.lines``)."""
    t_max_predict_ms: float = 0.0
    """An editor's completion ends at the first newline after this long generating."""


class TextPipeline:
    def __init__(self, token_bytes: TokenBytes, options: TextOptions) -> None:
        self._utf8 = Utf8Decoder(token_bytes)
        self._stop = StopMatcher(options.stop)
        self._reasoning = ReasoningSplitter(options.reasoning)
        self._tools: ToolCallParser | CoderToolCallParser | None = None
        if options.tool_calls:
            self._tools = (
                CoderToolCallParser(options.tool_parameters, single_call=options.single_tool_call)
                if options.tool_call_format == "qwen3_coder"
                else ToolCallParser()
            )
        self._single_call = options.single_tool_call
        self._lines = (
            LineLimits(options.n_indent, options.t_max_predict_ms)
            if options.n_indent > 0 or options.t_max_predict_ms > 0
            else None
        )
        self._pushed = 0  # tokens pushed so far
        self._thought_until = 0  # tokens pushed when the last reasoning delta came out
        self._answer_from: int | None = None  # tokens pushed before the answer's first delta

    @property
    def finished(self) -> bool:
        """The text says the generation is over: a stop string, or the one tool call asked."""
        if self._stop.stopped or self.line_limit is not None:
            return True
        return self._single_call and self._tools is not None and self._tools.completed > 0

    @property
    def reasoning_tokens(self) -> int:
        """Tokens spent thinking: those before the answer's first delta (all of them up to
        the last piece of reasoning when no answer follows); 0 without reasoning. A token
        that ends the thought and starts the answer counts as the answer's."""
        if not self._thought_until:
            return 0
        return self._thought_until if self._answer_from is None else self._answer_from

    @property
    def line_limit(self) -> LineLimit | None:
        """The editor's line limit that ended the generation, if one did."""
        return self._lines.stopped if self._lines is not None else None

    @property
    def stop_sequence(self) -> str | None:
        """The stop string that ended the generation, if one did."""
        return self._stop.matched

    @property
    def tool_calls(self) -> list[ParsedToolCall]:
        return self._tools.calls if self._tools is not None else []

    def push(self, token_id: int) -> list[Delta]:
        self._pushed += 1
        text = self._stop.push(self._utf8.push(token_id))
        if self._lines is not None:
            text = self._lines.push(text)
        return self._route(self._reasoning.push(text), final=False) if text else []

    def finish(self, *, cut: bool = True) -> list[Delta]:
        """End of generation: release what every stage still holds. ``cut``: the generation
        may have stopped mid-markup (``max_tokens``); False when the model ended its answer
        itself, so that text held only because it could still open a tool call is text."""
        text = self._stop.push(self._utf8.finish()) + self._stop.flush()
        if self._lines is not None:
            text = self._lines.push(text) + self._lines.finish()
        segments = self._reasoning.push(text) if text else []
        return self._route(segments + self._reasoning.finish(), final=True, cut=cut)

    def _route(self, segments: list[Segment], *, final: bool, cut: bool = True) -> list[Delta]:
        deltas: list[Delta] = []
        for kind, text in segments:
            if kind == "reasoning":
                self._thought_until = self._pushed
                deltas.append(Delta(reasoning=text))
                continue
            if self._answer_from is None:
                self._answer_from = self._pushed - 1
            if self._tools is None:
                deltas.append(Delta(content=text))
            else:
                deltas += _answer(self._tools.push(text))
        if final and self._tools is not None:
            deltas += _answer(self._tools.finish(cut=cut))
        return deltas


def _answer(parts: list[AnswerPart]) -> list[Delta]:
    return [
        Delta(content=part) if isinstance(part, str) else Delta(tool_call=part) for part in parts
    ]
