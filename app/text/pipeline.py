"""Released text to the deltas a chat client sees: reasoning, content and tool calls.

The chain is fixed: text (already UTF-8 whole and stop-string free, from ``TextStream``) goes
through the reasoning splitter; the answer part goes through the tool-call parser when the
request offered tools. Each stage only holds back what it must, so every delta still leaves
as soon as it is decided.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.reasoning import Mode, Piece, ReasoningSplitter
from app.tool_calls import ToolCall, ToolCallDelta, ToolCallParser


@dataclass(frozen=True)
class Delta:
    """One piece of a chat answer: exactly one of the fields is set."""

    content: str = ""
    reasoning: str = ""
    tool_call: ToolCallDelta | None = None


class OutputParser:
    def __init__(self, *, reasoning: Mode, tools: bool) -> None:
        self._reasoning = ReasoningSplitter(reasoning)
        self._tools = ToolCallParser() if tools else None

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self._tools.calls if self._tools is not None else []

    @property
    def completed_tool_calls(self) -> int:
        return self._tools.completed if self._tools is not None else 0

    def push(self, text: str) -> list[Delta]:
        return self._route(self._reasoning.push(text), final=False)

    def finish(self) -> list[Delta]:
        return self._route(self._reasoning.finish(), final=True)

    def _route(self, pieces: list[Piece], *, final: bool) -> list[Delta]:
        deltas: list[Delta] = []
        for kind, text in pieces:
            if kind == "reasoning":
                deltas.append(Delta(reasoning=text))
            elif self._tools is None:
                deltas.append(Delta(content=text))
            else:
                deltas += self._answer(self._tools.push(text))
        if final and self._tools is not None:
            deltas += self._answer(self._tools.finish())
        return deltas

    @staticmethod
    def _answer(pieces: list[str | ToolCallDelta]) -> list[Delta]:
        return [
            Delta(content=piece) if isinstance(piece, str) else Delta(tool_call=piece)
            for piece in pieces
        ]
