"""An answer's deltas as the ordered output blocks that the Responses and Anthropic APIs send.

OpenAI's chat API puts an answer into one message with fields (content, reasoning, tool
calls); the Responses and Messages APIs put it into a sequence of typed parts — a reasoning
(thinking) part, text, one part per tool call — each opened, filled by deltas and closed, in
the order the model wrote them. ``Blocks`` turns the text pipeline's deltas into that
sequence as they stream: a delta of another kind than the open block, or the first delta of
another tool call, closes the open block and opens the next. Both wires stream from it and
build their buffered response from the very same blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.text import Delta

BlockKind = Literal["reasoning", "text", "tool_call"]


@dataclass
class Block:
    kind: BlockKind
    index: int
    """Its place among the answer's blocks, from 0."""
    text: str = ""
    """The reasoning, the text, or the call's arguments (JSON text), so far."""
    call_id: str = ""
    name: str = ""
    """A tool call's id and function name (empty for the other kinds)."""


@dataclass(frozen=True)
class Step:
    """What one delta did."""

    block: Block
    """The block the delta belongs to."""
    text: str
    """What it added to ``block.text`` (empty for the first delta of a call: its name)."""
    opened: bool
    """The delta opened ``block``."""
    closed: Block | None
    """The block it closed by opening another."""


class Blocks:
    def __init__(self) -> None:
        self.blocks: list[Block] = []

    @property
    def last(self) -> Block | None:
        """The open block: the last one (blocks are closed only by the next one, or at the
        end of the answer)."""
        return self.blocks[-1] if self.blocks else None

    def add(self, delta: Delta) -> Step:
        call = delta.tool_call
        current = self.last
        if call is not None:
            kind: BlockKind = "tool_call"
            text = call.arguments
            continues = call.name is None
        else:
            kind = "reasoning" if delta.reasoning else "text"
            text = delta.reasoning or delta.content
            continues = current is not None and current.kind == kind
        if continues:
            # A call's later deltas always follow its first one (the parser sends a call whole).
            assert current is not None and current.kind == kind
            current.text += text
            return Step(current, text, opened=False, closed=None)
        block = Block(kind, len(self.blocks), text)
        if call is not None:
            block.call_id, block.name = call.id or "", call.name or ""
        self.blocks.append(block)
        return Step(block, text, opened=True, closed=current)
