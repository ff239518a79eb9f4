"""The text pipeline: sampled token ids to content, reasoning and tool-call deltas."""

from __future__ import annotations

from app.text.pipeline import Delta, TextOptions, TextPipeline, ToolCallFormat
from app.text.reasoning import Mode
from app.text.tool_calls import ParsedToolCall, ToolCallDelta

__all__ = [
    "Delta",
    "Mode",
    "ParsedToolCall",
    "TextOptions",
    "TextPipeline",
    "ToolCallDelta",
    "ToolCallFormat",
]
