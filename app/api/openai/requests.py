"""OpenAI request bodies: chat and text completions. Pydantic only; no engine imports.

Request models ignore fields they do not know (clients and UIs send vendor extensions such as
``user`` or ``cache_prompt``), but a field we know and cannot honour is a 400, never a silent
drop: ``n > 1``, ``echo``, ``logprobs`` on text completions. No number may be NaN
or infinite.
Defaults for unset sampling fields are llama.cpp's (``temperature`` 0.8, ``top_p`` 0.95,
``top_k`` 40, ``min_p`` 0.05); ``temperature: 0`` means greedy decoding.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Role = Literal["system", "developer", "user", "assistant", "tool"]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class RequestModel(BaseModel):
    """A request body or part of one: unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class FunctionCall(RequestModel):
    name: str
    arguments: str


class MessageToolCall(RequestModel):
    """A tool call in the history an assistant message carries."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestModel):
    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a '{self.role}' message needs 'content'")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(RequestModel):
    include_usage: bool = False


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
LogitBias = Annotated[float, Field(ge=-100.0, le=100.0)]
INT32_MAX = 2**31 - 1


class GenerationRequest(RequestModel):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=INT32_MAX)
    min_p: Probability | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repeat_penalty: float | None = Field(None, gt=0.0)
    logit_bias: dict[str, LogitBias] | None = None
    """OpenAI's: token id (as a string) -> a bias added to its logit, -100 (never) to 100."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")
    user: str | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' is only allowed when 'stream' is true")
        return self

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise ValueError(f"keys must be token ids (decimal integers), got '{key[:40]}'")
        return bias

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def _reject_truthy(value: Any, name: str) -> None:
    if value:
        raise ValueError(f"'{name}' is not supported by this server yet")


class FunctionDefinition(RequestModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(RequestModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        schema = self.json_schema.schema_ if self.json_schema is not None else None
        if self.type == "json_schema" and not schema:
            raise ValueError("response_format of type 'json_schema' needs 'json_schema.schema'")
        return self


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    thinking_budget: int | None = Field(
        None,
        ge=-1,
        description="Tokens the model may think before the server closes its <think> block "
        "(-1: unlimited); wins over reasoning_effort and the server's --reasoning-budget.",
    )
    reasoning_effort: ReasoningEffort | None = Field(
        None, description="OpenAI's effort levels as thinking budgets (docs/llama-knobs.md)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' requires 'logprobs': true")
        names = [tool.function.name for tool in self.tools or []]
        if self.tool_choice not in (None, "none", "auto") and not names:
            raise ValueError("'tool_choice' other than 'none'/'auto' requires 'tools'")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names '{choice.function.name}', which is not in 'tools'")
        json_output = self.response_format is not None and self.response_format.type != "text"
        forced = bool(names) and self.tool_choice not in (None, "auto", "none")
        if json_output and forced:
            raise ValueError("a JSON response_format cannot be combined with a forced tool call")
        return self


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = Field(None, ge=1, le=1)

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        _reject_truthy(self.echo, "echo")
        _reject_truthy(self.logprobs, "logprobs")
        prompt = self.prompt
        if isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], str):
            raise ValueError("only one prompt per request is supported")
        if not self.prompt:
            raise ValueError("'prompt' must not be empty")
        return self
