"""OpenAI response objects: chat completions, their stream chunks, text completions, the model
list. Fields a response does not carry are left out of the JSON, not sent as null."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


def _absent(value: object) -> bool:
    return value is None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class Timings(BaseModel):
    """llama-server's ``timings``: where the request's time went (milliseconds)."""

    queue_ms: float
    prompt_n: int
    """Prompt tokens actually decoded (the rest came from the KV cache: ``cache_n``)."""
    prompt_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_second: float
    """Decode speed over the tokens after the first (the first one ends the prompt phase)."""
    cache_n: int


class AssistantMessage(BaseModel):
    """``reasoning_content`` or ``reasoning`` (per ``--reasoning-format``) only when present."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = Field(None, exclude_if=_absent)
    reasoning: str | None = Field(None, exclude_if=_absent)
    tool_calls: list[ToolCallOut] | None = Field(None, exclude_if=_absent)


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    timings: Timings | None = Field(None, exclude_if=_absent)


class DeltaFunction(BaseModel):
    name: str | None = Field(None, exclude_if=_absent)
    arguments: str | None = Field(None, exclude_if=_absent)


class DeltaToolCall(BaseModel):
    """The first delta of a call carries ``id``, ``type`` and the name; later ones arguments."""

    index: int
    id: str | None = Field(None, exclude_if=_absent)
    type: Literal["function"] | None = Field(None, exclude_if=_absent)
    function: DeltaFunction


class DeltaMessage(BaseModel):
    """A stream delta carries only what it changes: ``{}`` on the final chunk."""

    role: Literal["assistant"] | None = Field(None, exclude_if=_absent)
    content: str | None = Field(None, exclude_if=_absent)
    reasoning_content: str | None = Field(None, exclude_if=_absent)
    reasoning: str | None = Field(None, exclude_if=_absent)
    tool_calls: list[DeltaToolCall] | None = Field(None, exclude_if=_absent)


class ChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_absent)
    timings: Timings | None = Field(None, exclude_if=_absent)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    """A text completion; also each chunk of a streamed one (``usage`` unset there)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, exclude_if=_absent)
    timings: Timings | None = Field(None, exclude_if=_absent)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qwen3-moe-serve"
    context_length: int
    """Tokens one request may use, prompt and completion together (the per-slot --n-ctx)."""
    max_model_len: int
    """The same, under vLLM's name, which some clients read instead."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
