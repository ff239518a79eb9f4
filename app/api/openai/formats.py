"""OpenAI object shapes for one request: its stream chunks and its buffered response.

Chat and text completions differ only in shape, so each has a format class with the same
methods, which one adapter (``app.api.openai.wire.ChunkWire``) puts on the wire. A buffered
response is built from the very events a stream would have sent (``Answer`` collects them),
so the two cannot disagree.

A token's chunk is on the hot path of every stream, so ``event_json`` renders the common chunk
(one piece of text, no logprobs, no tool call) from a per-request ``JsonTemplate``
(``app.api.http.templates``); every other chunk goes through pydantic.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel

from app.api.http.templates import JsonTemplate
from app.api.openai.objects import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    DeltaFunction,
    DeltaMessage,
    DeltaToolCall,
    FunctionCallOut,
    PromptTokensDetails,
    Timings,
    TokenLogprob,
    ToolCallOut,
    TopLogprob,
    Usage,
)
from app.core.results import Event, Finished
from app.engine import TokenLogprobs
from app.text import ParsedToolCall
from app.text.utf8 import TokenBytes


def usage_of(finished: Finished) -> Usage:
    return Usage(
        prompt_tokens=finished.prompt_tokens,
        completion_tokens=finished.completion_tokens,
        total_tokens=finished.prompt_tokens + finished.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=finished.cached_tokens),
    )


def timings_of(finished: Finished) -> Timings:
    t = finished.times
    decoded = finished.prompt_tokens - finished.cached_tokens
    after_first = max(finished.completion_tokens - 1, 0)
    return Timings(
        queue_ms=round(t.queue_ms, 3),
        prompt_n=decoded,
        prompt_ms=round(t.prompt_ms, 3),
        prompt_per_second=round(decoded / t.prompt_ms * 1000, 2) if t.prompt_ms > 0 else 0.0,
        predicted_n=finished.completion_tokens,
        predicted_ms=round(t.decode_ms, 3),
        predicted_per_second=(
            round(after_first / t.decode_ms * 1000, 2) if t.decode_ms > 0 else 0.0
        ),
        cache_n=finished.cached_tokens,
    )


@dataclass
class Answer:
    """Everything a stream carried, collected for the buffered response."""

    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: list[ParsedToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)

    def add(self, event: Event) -> None:
        delta = event.delta
        self.logprobs += event.logprobs
        if delta.content:
            self.content.append(delta.content)
        if delta.reasoning:
            self.reasoning.append(delta.reasoning)
        call = delta.tool_call
        if call is not None:
            if call.name is not None and call.id is not None:
                self.calls.append(ParsedToolCall(call.id, call.name))
            self.calls[call.index].arguments += call.arguments


def _logprob_entries(
    logprobs: Sequence[TokenLogprobs], token_bytes: TokenBytes
) -> list[TokenLogprob]:
    def text(token_id: int) -> tuple[str, list[int]]:
        raw = token_bytes(token_id)
        return raw.decode("utf-8", errors="backslashreplace"), list(raw)

    entries = []
    for item in logprobs:
        token, raw = text(item.token_id)
        top = [
            TopLogprob(token=alt, logprob=logprob, bytes=alt_raw)
            for alt_id, logprob in item.top
            for alt, alt_raw in [text(alt_id)]
        ]
        entries.append(TokenLogprob(token=token, logprob=item.logprob, bytes=raw, top_logprobs=top))
    return entries


class Format(Protocol):
    id: str

    def first_chunk(self) -> BaseModel | None: ...
    def event_chunk(self, event: Event) -> BaseModel: ...
    def event_json(self, event: Event) -> str:
        """``event_chunk(event).model_dump_json()``, faster for the common chunks."""
        ...

    def finish_chunk(self, finished: Finished) -> BaseModel: ...
    def usage_chunk(self, usage: Usage) -> BaseModel: ...
    def response(self, answer: Answer, finished: Finished) -> BaseModel: ...


class ChatFormat:
    def __init__(
        self,
        model: str,
        *,
        reasoning_field: str,
        token_bytes: TokenBytes,
        logprobs: bool,
    ) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self._reasoning_field = reasoning_field
        self._token_bytes = token_bytes
        self._logprobs = logprobs
        self._content_json = JsonTemplate.around(
            lambda text, _: self._text_chunk(content=text).model_dump_json()
        )
        self._reasoning_json = JsonTemplate.around(
            lambda text, _: self._text_chunk(**{reasoning_field: text}).model_dump_json()
        )

    def _text_chunk(self, **delta: str) -> BaseModel:
        choice = ChunkChoice(delta=DeltaMessage(**delta), logprobs=None, finish_reason=None)
        return self._chunk([choice])

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> BaseModel:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def _choice_logprobs(self, logprobs: Sequence[TokenLogprobs]) -> ChoiceLogprobs | None:
        if not self._logprobs:
            return None
        return ChoiceLogprobs(content=_logprob_entries(logprobs, self._token_bytes))

    def first_chunk(self) -> BaseModel:
        delta = DeltaMessage(role="assistant", content="")
        return self._chunk([ChunkChoice(delta=delta, finish_reason=None)])

    def event_chunk(self, event: Event) -> BaseModel:
        delta = event.delta
        message = DeltaMessage()
        if delta.content:
            message.content = delta.content
        if delta.reasoning:
            setattr(message, self._reasoning_field, delta.reasoning)
        call = delta.tool_call
        if call is not None:
            first = call.name is not None
            message.tool_calls = [
                DeltaToolCall(
                    index=call.index,
                    id=call.id,
                    type="function" if first else None,
                    function=DeltaFunction(name=call.name, arguments=call.arguments),
                )
            ]
        choice = ChunkChoice(
            delta=message, logprobs=self._choice_logprobs(event.logprobs), finish_reason=None
        )
        return self._chunk([choice])

    def event_json(self, event: Event) -> str:
        delta = event.delta
        if not self._logprobs and delta.tool_call is None:
            if delta.content and not delta.reasoning and self._content_json is not None:
                return self._content_json.fill(delta.content)
            if delta.reasoning and not delta.content and self._reasoning_json is not None:
                return self._reasoning_json.fill(delta.reasoning)
        return self.event_chunk(event).model_dump_json()

    def finish_chunk(self, finished: Finished) -> BaseModel:
        choice = ChunkChoice(delta=DeltaMessage(), finish_reason=finished.finish_reason)
        return ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[choice],
            timings=timings_of(finished),
        )

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return self._chunk([], usage)

    def response(self, answer: Answer, finished: Finished) -> BaseModel:
        content = "".join(answer.content)
        message = AssistantMessage(content=content if content or not answer.calls else None)
        reasoning = "".join(answer.reasoning)
        if reasoning:
            setattr(message, self._reasoning_field, reasoning)
        if answer.calls:
            message.tool_calls = [
                ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
                for c in answer.calls
            ]
        choice = ChatChoice(
            message=message,
            logprobs=self._choice_logprobs(answer.logprobs),
            finish_reason=finished.finish_reason,
        )
        return ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[choice],
            usage=usage_of(finished),
            timings=timings_of(finished),
        )


class CompletionFormat:
    def __init__(self, model: str) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self._text_json = JsonTemplate.around(
            lambda text, _: self._chunk(
                [CompletionChoice(text=text, finish_reason=None)]
            ).model_dump_json()
        )

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> BaseModel:
        return Completion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def first_chunk(self) -> None:
        return None

    def event_chunk(self, event: Event) -> BaseModel:
        return self._chunk([CompletionChoice(text=event.delta.content, finish_reason=None)])

    def event_json(self, event: Event) -> str:
        if self._text_json is not None:
            return self._text_json.fill(event.delta.content)
        return self.event_chunk(event).model_dump_json()

    def finish_chunk(self, finished: Finished) -> BaseModel:
        choice = CompletionChoice(text="", finish_reason=finished.finish_reason)
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[choice],
            timings=timings_of(finished),
        )

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return self._chunk([], usage)

    def response(self, answer: Answer, finished: Finished) -> BaseModel:
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                CompletionChoice(text="".join(answer.content), finish_reason=finished.finish_reason)
            ],
            usage=usage_of(finished),
            timings=timings_of(finished),
        )
