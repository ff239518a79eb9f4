"""OpenAI chat and text completion bodies as the core's requests (``app.core.requests``).

The Responses and Anthropic Messages APIs first become a chat completion body (their own
packages' translations), then come through here too, so every chat prompt is built from one
shape.
"""

from __future__ import annotations

from app.api.openai.requests import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    GenerationRequest,
    NamedToolChoice,
)
from app.core.requests import (
    ChatRequest,
    JsonOutput,
    NamedTool,
    Sampling,
    TextRequest,
    ToolCall,
    ToolChoice,
    ToolDef,
    Turn,
)


def sampling_of(body: GenerationRequest) -> Sampling:
    return Sampling(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repeat_penalty=body.repeat_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        logit_bias=tuple((int(key), bias) for key, bias in (body.logit_bias or {}).items()),
    )


def chat_request(body: ChatCompletionRequest) -> ChatRequest:
    fmt = body.response_format
    choice: ToolChoice = (
        NamedTool(body.tool_choice.function.name)
        if isinstance(body.tool_choice, NamedToolChoice)
        else body.tool_choice
    )
    return ChatRequest(
        turns=tuple(turn_of(m) for m in body.messages),
        model=body.model,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        stop=tuple(body.stop_list()),
        sampling=sampling_of(body),
        tools=tuple(
            ToolDef(
                t.function.name, t.function.description, t.function.parameters, t.function.strict
            )
            for t in body.tools or []
        ),
        tool_choice=choice,
        parallel_tool_calls=body.parallel_tool_calls,
        json_output=(
            JsonOutput(fmt.json_schema.schema_ if fmt.json_schema is not None else None)
            if fmt is not None and fmt.type != "text"
            else None
        ),
        template_kwargs=dict(body.chat_template_kwargs or {}),
        top_logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        thinking_budget=body.thinking_budget,
        reasoning_effort=body.reasoning_effort,
    )


def turn_of(message: ChatMessage) -> Turn:
    """A message; ``developer`` is OpenAI's newer name for ``system``."""
    return Turn(
        role="system" if message.role == "developer" else message.role,
        text=message.text(),
        name=message.name,
        tool_calls=tuple(
            ToolCall(call.id, call.function.name, call.function.arguments)
            for call in message.tool_calls or []
        ),
        tool_call_id=message.tool_call_id,
        reasoning=message.reasoning_content,
    )


def text_request(body: CompletionRequest) -> TextRequest:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        text_or_ids: str | tuple[int, ...] = tuple(int(t) for t in prompt)
    else:
        text_or_ids = prompt if isinstance(prompt, str) else str(prompt[0])
    return TextRequest(
        prompt=text_or_ids,
        model=body.model,
        max_tokens=body.max_tokens,
        stop=tuple(body.stop_list()),
        sampling=sampling_of(body),
        suffix=body.suffix,
    )
