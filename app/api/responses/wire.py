"""The Responses API's shape of a generation: its typed stream events and its response object.

Everything sent is built from the types the official ``openai`` SDK publishes
(``openai.types.responses``, as vLLM's Responses route does), so each event is exactly what
the SDK's typed parser — and Codex, which reads the same wire — expects. The stream is the
documented sequence:

- ``response.created``, ``response.in_progress`` (sent at once, before the prompt is decoded);
- per output item, in the order the model wrote them (``app.api.http.blocks``: a ``reasoning``
  item, a ``message``, one ``function_call`` per call): ``response.output_item.added``; for a
  message or reasoning item ``response.content_part.added``; its deltas
  (``response.output_text.delta``, ``response.reasoning_text.delta``,
  ``response.function_call_arguments.delta``), one per token; their ``.done``;
  ``response.content_part.done``; ``response.output_item.done`` (Codex takes each item from
  this event);
- ``response.completed`` with usage, or ``response.incomplete`` (``max_output_tokens``) when
  the token limit ended the answer.

Every event is a named SSE event with its ``sequence_number``. While the first token is
awaited (a long prompt, a queue) the stream repeats ``response.in_progress`` every
``--sse-keepalive-s``: Codex resets its idle timer (300 s by default) on events only, never on
SSE comments. (Later idle time gets SSE comments: a keep-alive event sent beside the stream
could overtake an event numbered before it.) A failure after the headers is
``response.failed`` carrying the error, the stream's last event. The buffered response is the
final ``response`` object, built from the same blocks.

Reasoning is sent as ``reasoning_text`` content, never a summary (there is none to give), and
without ``encrypted_content``; ``output_tokens_details.reasoning_tokens`` counts the tokens
decoded before the answer began (``TextPipeline.reasoning_tokens``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from openai.types.responses import (
    FunctionTool,
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseError,
    ResponseFailedEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseFunctionToolCall,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItem,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseReasoningItem,
    ResponseReasoningTextDeltaEvent,
    ResponseReasoningTextDoneEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    ResponseUsage,
    ToolChoiceFunction,
)
from openai.types.responses import response_content_part_added_event as part_added
from openai.types.responses import response_content_part_done_event as part_done
from openai.types.responses.response import IncompleteDetails
from openai.types.responses.response_reasoning_item import Content as ReasoningContent
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails
from pydantic import BaseModel

from app.api.http.blocks import Block, Blocks
from app.api.http.sse import frame
from app.api.http.templates import JsonTemplate
from app.api.responses.requests import ChatTranslation, FunctionChoice, ResponsesRequest
from app.core.results import Event, Finished
from app.errors import ApiError

ItemStatus = Literal["in_progress", "completed", "incomplete"]
_ID_PREFIX = {"reasoning": "rs", "text": "msg", "tool_call": "fc"}
_DELTA_EVENT = {
    "reasoning": "response.reasoning_text.delta",
    "text": "response.output_text.delta",
    "tool_call": "response.function_call_arguments.delta",
}


def _json(model: BaseModel) -> str:
    # Only the fields this module sets: the SDK's types declare dozens of optional fields
    # that a local server has no value for.
    return model.model_dump_json(exclude_unset=True, by_alias=True)


def _event(model: BaseModel, name: str) -> bytes:
    return frame(_json(model), name)


class ResponsesWire:
    def __init__(
        self,
        model: str,
        request: ResponsesRequest,
        translation: ChatTranslation,
    ) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.model = model
        self._request = request
        self._namespaces = translation.namespaces
        self._tools = [
            FunctionTool(
                type="function",
                name=tool["function"]["name"],
                parameters=tool["function"]["parameters"],
                strict=tool["function"].get("strict"),
                description=tool["function"].get("description"),
            )
            for tool in translation.tools
        ]
        self._blocks = Blocks()
        self._ids: list[str] = []
        self._status: list[ItemStatus] = []
        self._templates: list[JsonTemplate | None] = []
        self._sequence = 0

    @property
    def blocks(self) -> list[Block]:
        """The answer's blocks so far, in order."""
        return self._blocks.blocks

    # -- the wire ------------------------------------------------------------------------

    def keepalive(self) -> None:
        # An idle-stream event sent beside the stream could overtake an event numbered
        # before it; the stream's own ``waiting`` events cannot.
        return None

    def waiting(self) -> bytes:
        event = ResponseInProgressEvent(
            response=self._response("in_progress", []),
            sequence_number=self._next(),
            type="response.in_progress",
        )
        return _event(event, event.type)

    def opening(self) -> bytes:
        created = ResponseCreatedEvent(
            response=self._response("in_progress", []),
            sequence_number=self._next(),
            type="response.created",
        )
        progress = ResponseInProgressEvent(
            response=self._response("in_progress", []),
            sequence_number=self._next(),
            type="response.in_progress",
        )
        return _event(created, created.type) + _event(progress, progress.type)

    def event(self, event: Event) -> bytes:
        step = self._blocks.add(event.delta)
        frames = b""
        if step.closed is not None:
            frames += self._close(step.closed, "completed")
        if step.opened:
            frames += self._open(step.block)
        if step.text:
            block = step.block
            template = self._templates[block.index]
            number = self._next()
            payload = (
                template.fill(step.text, number)
                if template is not None
                else _json(self.delta_event(block, step.text, number))
            )
            frames += frame(payload, _DELTA_EVENT[block.kind])
        return frames

    def closing(self, finished: Finished) -> bytes:
        frames = b""
        last = self._blocks.last
        if last is not None:
            frames += self._close(last, self._final_status(finished))
        response = self._final(finished)
        if response.status == "incomplete":
            incomplete = ResponseIncompleteEvent(
                response=response, sequence_number=self._next(), type="response.incomplete"
            )
            return frames + _event(incomplete, incomplete.type)
        completed = ResponseCompletedEvent(
            response=response, sequence_number=self._next(), type="response.completed"
        )
        return frames + _event(completed, completed.type)

    def failure(self, error: ApiError) -> bytes:
        if self._blocks.last is not None:
            self._status[-1] = "incomplete"
        response = self._response(
            "failed",
            self._output(),
            error=ResponseError(
                code="rate_limit_exceeded" if error.status_code == 429 else "server_error",
                message=error.message,
            ),
        )
        failed = ResponseFailedEvent(
            response=response, sequence_number=self._next(), type="response.failed"
        )
        return _event(failed, failed.type)

    def add(self, event: Event) -> None:
        step = self._blocks.add(event.delta)
        if step.opened:
            self._opened(step.block)
        if step.closed is not None:
            self._status[step.closed.index] = "completed"

    def body(self, finished: Finished) -> dict[str, Any]:
        if self._blocks.last is not None:
            self._status[-1] = self._final_status(finished)
        dumped: dict[str, Any] = self._final(finished).model_dump(
            mode="json", exclude_unset=True, by_alias=True
        )
        return dumped

    # -- the per-token events (public for the template tests) -------------------------------

    def delta_event(self, block: Block, text: str, sequence_number: int) -> BaseModel:
        """The pydantic form of a delta event, which the block's template renders faster."""
        item_id = self._ids[block.index]
        if block.kind == "text":
            return ResponseTextDeltaEvent(
                content_index=0,
                delta=text,
                item_id=item_id,
                logprobs=[],
                output_index=block.index,
                sequence_number=sequence_number,
                type="response.output_text.delta",
            )
        if block.kind == "reasoning":
            return ResponseReasoningTextDeltaEvent(
                content_index=0,
                delta=text,
                item_id=item_id,
                output_index=block.index,
                sequence_number=sequence_number,
                type="response.reasoning_text.delta",
            )
        return ResponseFunctionCallArgumentsDeltaEvent(
            delta=text,
            item_id=item_id,
            output_index=block.index,
            sequence_number=sequence_number,
            type="response.function_call_arguments.delta",
        )

    def delta_json(self, block: Block, text: str, sequence_number: int) -> str:
        template = self._templates[block.index]
        assert template is not None
        return template.fill(text, sequence_number)

    # -- items ---------------------------------------------------------------------------

    def _next(self) -> int:
        number = self._sequence
        self._sequence += 1
        return number

    def _opened(self, block: Block) -> None:
        self._ids.append(f"{_ID_PREFIX[block.kind]}_{uuid.uuid4().hex}")
        self._status.append("in_progress")
        self._templates.append(
            JsonTemplate.around(lambda text, n: _json(self.delta_event(block, text, n)))
        )

    def _open(self, block: Block) -> bytes:
        self._opened(block)
        added = ResponseOutputItemAddedEvent(
            item=self._item(block, ""),
            output_index=block.index,
            sequence_number=self._next(),
            type="response.output_item.added",
        )
        frames = _event(added, added.type)
        part: part_added.Part
        if block.kind == "text":
            part = ResponseOutputText(annotations=[], text="", type="output_text")
        elif block.kind == "reasoning":
            part = part_added.PartReasoningText(text="", type="reasoning_text")
        else:
            return frames
        part_event = ResponseContentPartAddedEvent(
            content_index=0,
            item_id=self._ids[block.index],
            output_index=block.index,
            part=part,
            sequence_number=self._next(),
            type="response.content_part.added",
        )
        return frames + _event(part_event, part_event.type)

    def _close(self, block: Block, status: ItemStatus) -> bytes:
        self._status[block.index] = status
        item_id = self._ids[block.index]
        frames = b""
        if block.kind == "tool_call":
            arguments = ResponseFunctionCallArgumentsDoneEvent(
                arguments=block.text,
                item_id=item_id,
                output_index=block.index,
                sequence_number=self._next(),
                type="response.function_call_arguments.done",
            )
            frames += _event(arguments, arguments.type)
        else:
            done: BaseModel
            part: part_done.Part
            if block.kind == "text":
                done = ResponseTextDoneEvent(
                    content_index=0,
                    item_id=item_id,
                    logprobs=[],
                    output_index=block.index,
                    sequence_number=self._next(),
                    text=block.text,
                    type="response.output_text.done",
                )
                part = ResponseOutputText(annotations=[], text=block.text, type="output_text")
                frames += _event(done, "response.output_text.done")
            else:
                done = ResponseReasoningTextDoneEvent(
                    content_index=0,
                    item_id=item_id,
                    output_index=block.index,
                    sequence_number=self._next(),
                    text=block.text,
                    type="response.reasoning_text.done",
                )
                part = part_done.PartReasoningText(text=block.text, type="reasoning_text")
                frames += _event(done, "response.reasoning_text.done")
            part_event = ResponseContentPartDoneEvent(
                content_index=0,
                item_id=item_id,
                output_index=block.index,
                part=part,
                sequence_number=self._next(),
                type="response.content_part.done",
            )
            frames += _event(part_event, part_event.type)
        item_done = ResponseOutputItemDoneEvent(
            item=self._item(block, block.text),
            output_index=block.index,
            sequence_number=self._next(),
            type="response.output_item.done",
        )
        return frames + _event(item_done, item_done.type)

    def _item(self, block: Block, text: str) -> ResponseOutputItem:
        """The block as an output item holding ``text`` ("" when it has just been added)."""
        item_id, status = self._ids[block.index], self._status[block.index]
        if block.kind == "text":
            content = [ResponseOutputText(annotations=[], text=text, type="output_text")]
            return ResponseOutputMessage(
                id=item_id,
                content=content if text else [],
                role="assistant",
                status=status,
                type="message",
            )
        if block.kind == "reasoning":
            return ResponseReasoningItem(
                id=item_id,
                summary=[],
                type="reasoning",
                content=[ReasoningContent(text=text, type="reasoning_text")] if text else [],
                status=status,
            )
        # A flattened namespace tool's call goes back under its own name and namespace.
        named: dict[str, str] = {"name": block.name}
        if block.name in self._namespaces:
            named["namespace"], named["name"] = self._namespaces[block.name]
        return ResponseFunctionToolCall(
            arguments=text,
            call_id=block.call_id,
            type="function_call",
            id=item_id,
            status=status,
            **named,
        )

    def _output(self) -> list[ResponseOutputItem]:
        return [self._item(block, block.text) for block in self._blocks.blocks]

    # -- the response object -------------------------------------------------------------

    @staticmethod
    def _final_status(finished: Finished) -> ItemStatus:
        return "incomplete" if finished.finish_reason == "length" else "completed"

    def _final(self, finished: Finished) -> Response:
        usage = ResponseUsage(
            input_tokens=finished.prompt_tokens,
            input_tokens_details=InputTokensDetails(
                cached_tokens=finished.cached_tokens, cache_write_tokens=0
            ),
            output_tokens=finished.completion_tokens,
            output_tokens_details=OutputTokensDetails(reasoning_tokens=finished.reasoning_tokens),
            total_tokens=finished.prompt_tokens + finished.completion_tokens,
        )
        if finished.finish_reason == "length":
            return self._response(
                "incomplete",
                self._output(),
                usage=usage,
                incomplete=IncompleteDetails(reason="max_output_tokens"),
            )
        return self._response("completed", self._output(), usage=usage)

    def _response(
        self,
        status: Literal["in_progress", "completed", "incomplete", "failed"],
        output: list[ResponseOutputItem],
        *,
        usage: ResponseUsage | None = None,
        incomplete: IncompleteDetails | None = None,
        error: ResponseError | None = None,
    ) -> Response:
        req = self._request
        choice = req.tool_choice
        return Response(
            id=self.id,
            object="response",
            created_at=self.created_at,
            model=self.model,
            status=status,
            output=output,
            error=error,
            incomplete_details=incomplete,
            instructions=req.instructions,
            usage=usage,
            parallel_tool_calls=req.parallel_tool_calls is not False,
            tool_choice=(
                ToolChoiceFunction(name=choice.name, type="function")
                if isinstance(choice, FunctionChoice)
                else (choice or "auto")
            ),
            tools=list(self._tools),
            temperature=req.temperature,
            top_p=req.top_p,
            max_output_tokens=req.max_output_tokens,
        )
