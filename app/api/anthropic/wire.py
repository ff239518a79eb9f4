"""The Anthropic Messages API's shape of a generation: its stream events and its message.

Everything sent is built from the types the official ``anthropic`` SDK publishes
(``anthropic.types``), so each event is exactly what the SDK's stream accumulator — and
Claude Code, which reads the same wire — expects. The stream:

- ``message_start`` (sent at once, before the prompt is decoded, with the prompt's tokens as
  ``input_tokens``);
- per content block, in the order the model wrote them (``app.api.http.blocks``: ``thinking``,
  ``text``, one ``tool_use`` per call): ``content_block_start`` (a tool_use block with its id,
  name and ``input: {}``), its deltas one per token (``thinking_delta``, ``text_delta``,
  ``input_json_delta`` — Claude Code ignores input sent any other way),
  ``content_block_stop``;
- ``message_delta`` with the ``stop_reason`` and the usage, then ``message_stop``.

Every event is a named SSE event (Claude Code retries without streaming when names are
missing). An idle stream sends ``ping`` events, as Anthropic's API does. A failure after the
headers is an ``error`` event in Anthropic's error shape, the stream's last.

Stop reasons: the end of the model's turn is ``end_turn``, a stop sequence ``stop_sequence``
(with the sequence), the token limit ``max_tokens``, tool calls ``tool_use``. Usage follows
Anthropic's accounting: ``input_tokens`` are the prompt tokens decoded for this request,
``cache_read_input_tokens`` those served from the KV cache; together they are the prompt
(what ``count_tokens`` answers). ``message_start`` cannot know the cache hits yet and counts
the whole prompt as input; ``message_delta`` carries the split, which clients take as final.

A thinking block has no signature to give (Qwen3 signs nothing): it is ``""``, which Claude
Code sends back unchanged. A tool call's ``input`` in the buffered message is its arguments
parsed the way the SDK parses the streamed ``partial_json`` (jiter, partial mode), so that a
call cut short by ``max_tokens`` reads the same either way; arguments that are not a JSON
object give ``{}``.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from anthropic.types import (
    InputJSONDelta,
    Message,
    MessageDeltaUsage,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    StopReason,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolUseBlock,
    Usage,
)
from anthropic.types.raw_message_delta_event import Delta as MessageDelta
from jiter import from_json
from pydantic import BaseModel

from app.api.http.blocks import Block, Blocks
from app.api.http.sse import Keepalive, frame
from app.api.http.templates import JsonTemplate
from app.core.results import Event, Finished
from app.errors import ApiError

logger = logging.getLogger(__name__)

PING = Keepalive("ping", json.dumps({"type": "ping"}))
_STOP_REASONS: dict[str, StopReason] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
}
ContentBlock = TextBlock | ThinkingBlock | ToolUseBlock


def _json(model: BaseModel) -> str:
    # Only the fields this module sets: the SDK's types declare optional fields (citations,
    # containers, server tool usage) that a local server has no value for.
    return model.model_dump_json(exclude_unset=True)


def _event(model: BaseModel, name: str) -> bytes:
    return frame(_json(model), name)


def tool_use_id(call_id: str) -> str:
    """Anthropic's id form (``toolu_…``) for the text pipeline's call id (``call_…``)."""
    return "toolu_" + call_id.removeprefix("call_")


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments as its ``input``, parsed as the SDK parses streamed input."""
    if not arguments:
        return {}
    try:
        parsed = from_json(arguments.encode(), partial_mode=True)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        logger.warning("a tool call's arguments are not a JSON object; its input is {}")
        return {}
    return parsed


class MessagesWire:
    def __init__(self, model: str, *, prompt_tokens: int) -> None:
        self.id = f"msg_{uuid.uuid4().hex}"
        self.model = model
        self._prompt_tokens = prompt_tokens
        self._blocks = Blocks()
        self._templates: list[JsonTemplate | None] = []

    @property
    def blocks(self) -> list[Block]:
        """The answer's blocks so far, in order."""
        return self._blocks.blocks

    # -- the wire ------------------------------------------------------------------------

    def keepalive(self) -> Keepalive:
        return PING

    def waiting(self) -> bytes:
        return b""  # the pings do it: they carry no sequence to keep

    def opening(self) -> bytes:
        start = RawMessageStartEvent(
            message=Message(
                id=self.id,
                type="message",
                role="assistant",
                model=self.model,
                content=[],
                stop_reason=None,
                stop_sequence=None,
                usage=Usage(input_tokens=self._prompt_tokens, output_tokens=0),
            ),
            type="message_start",
        )
        return _event(start, start.type)

    def event(self, event: Event) -> bytes:
        step = self._blocks.add(event.delta)
        block = step.block
        frames = b""
        if step.closed is not None:
            stop = RawContentBlockStopEvent(index=step.closed.index, type="content_block_stop")
            frames += _event(stop, stop.type)
        if step.opened:
            self._templates.append(
                JsonTemplate.around(lambda text, _: _json(self.delta_event(block, text)))
            )
            start = RawContentBlockStartEvent(
                content_block=self._content(block, opening=True),
                index=block.index,
                type="content_block_start",
            )
            frames += _event(start, start.type)
        if step.text:
            template = self._templates[block.index]
            payload = (
                template.fill(step.text)
                if template is not None
                else _json(self.delta_event(block, step.text))
            )
            frames += frame(payload, "content_block_delta")
        return frames

    def closing(self, finished: Finished) -> bytes:
        frames = b""
        last = self._blocks.last
        if last is not None:
            stop = RawContentBlockStopEvent(index=last.index, type="content_block_stop")
            frames += _event(stop, stop.type)
        stop_reason, stop_sequence = self._stop(finished)
        delta = RawMessageDeltaEvent(
            delta=MessageDelta(stop_reason=stop_reason, stop_sequence=stop_sequence),
            usage=MessageDeltaUsage(
                input_tokens=finished.prompt_tokens - finished.cached_tokens,
                cache_read_input_tokens=finished.cached_tokens,
                cache_creation_input_tokens=0,
                output_tokens=finished.completion_tokens,
            ),
            type="message_delta",
        )
        end = RawMessageStopEvent(type="message_stop")
        return frames + _event(delta, delta.type) + _event(end, end.type)

    def failure(self, error: ApiError) -> bytes:
        return frame(json.dumps(error.anthropic_envelope()), "error")

    def add(self, event: Event) -> None:
        self._blocks.add(event.delta)

    def body(self, finished: Finished) -> dict[str, Any]:
        stop_reason, stop_sequence = self._stop(finished)
        message = Message(
            id=self.id,
            type="message",
            role="assistant",
            model=self.model,
            content=[self._content(block) for block in self._blocks.blocks],
            stop_reason=stop_reason,
            stop_sequence=stop_sequence,
            usage=Usage(
                input_tokens=finished.prompt_tokens - finished.cached_tokens,
                cache_read_input_tokens=finished.cached_tokens,
                cache_creation_input_tokens=0,
                output_tokens=finished.completion_tokens,
            ),
        )
        dumped: dict[str, Any] = message.model_dump(mode="json", exclude_unset=True)
        return dumped

    # -- the per-token event (public for the template tests) --------------------------------

    def delta_event(self, block: Block, text: str) -> BaseModel:
        """The pydantic form of a delta event, which the block's template renders faster."""
        delta: TextDelta | ThinkingDelta | InputJSONDelta
        if block.kind == "text":
            delta = TextDelta(text=text, type="text_delta")
        elif block.kind == "reasoning":
            delta = ThinkingDelta(thinking=text, type="thinking_delta")
        else:
            delta = InputJSONDelta(partial_json=text, type="input_json_delta")
        return RawContentBlockDeltaEvent(delta=delta, index=block.index, type="content_block_delta")

    def delta_json(self, block: Block, text: str) -> str:
        template = self._templates[block.index]
        assert template is not None
        return template.fill(text)

    # -- content -------------------------------------------------------------------------

    @staticmethod
    def _stop(finished: Finished) -> tuple[StopReason, str | None]:
        if finished.stop_sequence is not None:
            return "stop_sequence", finished.stop_sequence
        return _STOP_REASONS[finished.finish_reason], None

    @staticmethod
    def _content(block: Block, *, opening: bool = False) -> ContentBlock:
        """The block as a content block: empty as it opens, whole in the message."""
        text = "" if opening else block.text
        if block.kind == "text":
            return TextBlock(text=text, type="text")
        if block.kind == "reasoning":
            return ThinkingBlock(thinking=text, signature="", type="thinking")
        return ToolUseBlock(
            id=tool_use_id(block.call_id),
            input={} if opening else tool_input(block.text),
            name=block.name,
            type="tool_use",
        )
