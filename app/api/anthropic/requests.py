"""``POST /v1/messages`` requests (Anthropic Messages), and their translation into a chat
completion request.

A Messages request becomes one ``ChatCompletionRequest`` and runs through the same
preparation, engine and text pipeline as ``/v1/chat/completions``. What the translation does:

- ``system`` (a string or a list of text blocks; ``cache_control`` is ignored) becomes the
  first system message, its blocks joined by blank lines; Claude Code's
  ``x-anthropic-billing-header:`` block is left out (``BILLING_HEADER``). A ``system``
  message inside ``messages`` (Claude Code sends them) stays where it is.
- A user message's ``tool_result`` blocks become tool messages (in order, before the message's
  text), its ``text`` blocks one user message. An assistant message's ``text`` blocks are its
  content, its ``tool_use`` blocks its tool calls, its ``thinking`` blocks its
  ``reasoning_content`` (the signature, often empty, is ignored; ``redacted_thinking`` is
  dropped). Images, documents and the server tools' blocks are a 400 naming them: the model
  reads text only.
- ``tools`` (client tools: ``name``, ``description``, ``input_schema``) are function tools.
  Server tools (a ``type`` such as ``web_search_20250305`` or ``bash_20250124``) and MCP
  connectors (``mcp_servers``) are left out of the prompt (``app.api.http.hosted_tools``: logged
  and counted); ``--reject-unsupported-tools`` makes them a 400. ``tool_choice``
  ``auto``/``any``/``tool``/``none`` map to the chat API's
  ``auto``/``required``/a named function/``none``; ``disable_parallel_tool_use`` to
  ``parallel_tool_calls: false``.
- ``thinking`` ``enabled`` and ``adaptive`` turn Qwen3's thinking on, ``disabled`` off;
  ``enabled``'s ``budget_tokens`` is the thinking budget (the server closes the ``<think>``
  block when it is spent); without ``thinking`` the server's default holds.
- ``max_tokens`` is required, as Anthropic requires it. It is a ceiling, and agents send their
  own model's (Claude Code: 32000 or 64000), so one above what the context leaves after the
  prompt is lowered to that room rather than refused.

A final assistant message (Anthropic's "prefill") is a 400: the chat template always opens a
new assistant turn, so the answer would not continue the given text. Accepted and ignored:
``metadata``, ``context_management``, ``output_config``, ``service_tier``, ``cache_control``,
the ``anthropic-beta`` and ``anthropic-version`` headers and the ``?beta=true`` query.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, ValidationError

from app.api.http.hosted_tools import UnsupportedTools
from app.api.openai.requests import ChatCompletionRequest, RequestModel
from app.errors import InvalidRequest, validation_error


class TextBlockIn(RequestModel):
    type: Literal["text"]
    text: str


class OtherBlockIn(RequestModel):
    """A content block this server cannot read (an image, a document, a server tool's)."""

    type: str


def _nested_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else value.type
    return "text" if kind == "text" else "other"


ResultContent = list[
    Annotated[
        Annotated[TextBlockIn, Tag("text")] | Annotated[OtherBlockIn, Tag("other")],
        Discriminator(_nested_kind),
    ]
]


class ToolUseBlockIn(RequestModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlockIn(RequestModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | ResultContent | None = None
    is_error: bool | None = None


class ThinkingBlockIn(RequestModel):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlockIn(RequestModel):
    type: Literal["redacted_thinking"]


_BLOCK_TYPES = frozenset({"text", "tool_use", "tool_result", "thinking", "redacted_thinking"})


def _block_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else value.type
    return kind if kind in _BLOCK_TYPES else "other"


ContentBlockIn = Annotated[
    Annotated[TextBlockIn, Tag("text")]
    | Annotated[ToolUseBlockIn, Tag("tool_use")]
    | Annotated[ToolResultBlockIn, Tag("tool_result")]
    | Annotated[ThinkingBlockIn, Tag("thinking")]
    | Annotated[RedactedThinkingBlockIn, Tag("redacted_thinking")]
    | Annotated[OtherBlockIn, Tag("other")],
    Discriminator(_block_kind),
]


class MessageIn(RequestModel):
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlockIn]


class ClientToolIn(RequestModel):
    type: Literal["custom"] | None = None
    name: str
    description: str | None = None
    input_schema: dict[str, Any]


class ServerToolIn(RequestModel):
    type: str
    name: str | None = None


def _tool_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else value.type
    return "client" if kind in (None, "custom") else "server"


Tool = Annotated[
    Annotated[ClientToolIn, Tag("client")] | Annotated[ServerToolIn, Tag("server")],
    Discriminator(_tool_kind),
]


class ToolChoiceIn(RequestModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingIn(RequestModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class CountTokensRequest(RequestModel):
    """``POST /v1/messages/count_tokens``: a Messages request without the generation."""

    model: str | None = None
    system: str | list[TextBlockIn] | None = None
    messages: list[MessageIn] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: ToolChoiceIn | None = None
    thinking: ThinkingIn | None = None
    mcp_servers: list[dict[str, Any]] | None = None
    """Anthropic's MCP connector: servers the API would call; none is called here."""


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False


def messages_as_chat(
    req: CountTokensRequest, unsupported: UnsupportedTools
) -> ChatCompletionRequest:
    """The chat request ``req`` asks for; the tools it offers that cannot run here are left
    out into ``unsupported`` (or refused, as it says)."""
    body: dict[str, Any] = {"model": req.model, "messages": _messages(req)}
    tools = _tools(req.tools or [], unsupported)
    for n in range(len(req.mcp_servers or [])):
        unsupported.leave_out(f"mcp_servers[{n}]", "mcp_connector", "an MCP connector")
    if tools:
        body["tools"] = tools
    choice = req.tool_choice
    if choice is not None:
        if choice.type == "tool":
            if not choice.name:
                raise InvalidRequest(
                    "tool_choice of type 'tool' needs a 'name'", param="tool_choice.name"
                )
            body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        if choice.disable_parallel_tool_use:
            body["parallel_tool_calls"] = False
    if req.thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": req.thinking.type != "disabled"}
        if req.thinking.type == "enabled" and req.thinking.budget_tokens is not None:
            body["thinking_budget"] = req.thinking.budget_tokens
    if isinstance(req, MessagesRequest):
        body |= {
            "max_tokens": req.max_tokens,
            "stop": req.stop_sequences,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_k": req.top_k,
            "stream": req.stream,
        }
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc


def _tools(
    tools: list[ClientToolIn | ServerToolIn], unsupported: UnsupportedTools
) -> list[dict[str, Any]]:
    offered = []
    for n, tool in enumerate(tools):
        if isinstance(tool, ClientToolIn):
            function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
            if tool.description is not None:
                function["description"] = tool.description
            offered.append({"type": "function", "function": function})
        else:
            unsupported.leave_out(f"tools[{n}]", tool.type, f"a '{tool.type}' server tool")
    return offered


def _unreadable(where: str, kind: str, role: str | None = None) -> InvalidRequest:
    found = f"a '{kind}' block" + (f" in a '{role}' message" if role else "")
    return InvalidRequest(
        f"{where} is {found}; this server reads text blocks, tool_result blocks from the user "
        "and tool_use and thinking blocks from the assistant.",
        param=where,
        code="unsupported_content",
    )


def _text(blocks: str | Sequence[TextBlockIn | OtherBlockIn] | None, where: str) -> str:
    """Text blocks joined by blank lines (Claude Code's own blocks end where a new line of
    thought starts: its system prompt's header, its reminders)."""
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    texts = []
    for n, block in enumerate(blocks):
        if not isinstance(block, TextBlockIn):
            raise _unreadable(f"{where}[{n}]", block.type)
        texts.append(block.text)
    return "\n\n".join(texts)


BILLING_HEADER = "x-anthropic-billing-header:"
"""Claude Code's first system block: an attribution line for Anthropic's billing whose digits
follow the conversation's first message, so no two of its conversations would share a cached
prefix. It says nothing to the model, and is left out."""


def _system(blocks: str | list[TextBlockIn] | None) -> str:
    if isinstance(blocks, list):
        blocks = [b for b in blocks if not b.text.startswith(BILLING_HEADER)]
    return _text(blocks, "system")


def _messages(req: CountTokensRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    system = _system(req.system)
    if system:
        messages.append({"role": "system", "content": system})
    for n, message in enumerate(req.messages):
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
        elif message.role == "assistant":
            messages.append(_assistant_turn(message.content, f"messages[{n}].content"))
        else:
            messages += _user_turn(message.role, message.content, f"messages[{n}].content")
    if req.messages[-1].role == "assistant":
        raise InvalidRequest(
            "The last message is the assistant's (a prefill); this server always starts a new "
            "assistant turn, so end with a user message.",
            param="messages",
            code="unsupported_prefill",
        )
    return messages


def _assistant_turn(content: list[ContentBlockIn], where: str) -> dict[str, Any]:
    texts: list[TextBlockIn] = []
    calls: list[dict[str, Any]] = []
    thoughts: list[str] = []
    for m, block in enumerate(content):
        if isinstance(block, TextBlockIn):
            texts.append(block)
        elif isinstance(block, ToolUseBlockIn):
            arguments = json.dumps(block.input, ensure_ascii=False)
            function = {"name": block.name, "arguments": arguments}
            calls.append({"id": block.id, "type": "function", "function": function})
        elif isinstance(block, ThinkingBlockIn):
            thoughts.append(block.thinking)
        elif not isinstance(block, RedactedThinkingBlockIn):
            raise _unreadable(f"{where}[{m}]", block.type, "assistant")
    text = _text(texts, where)
    turn: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        turn["tool_calls"] = calls
    if thoughts:
        turn["reasoning_content"] = "".join(thoughts)
    return turn


def _user_turn(role: str, content: list[ContentBlockIn], where: str) -> list[dict[str, Any]]:
    """Tool results first (they answer the assistant turn before), then the text, if any."""
    turns: list[dict[str, Any]] = []
    texts: list[TextBlockIn] = []
    for m, block in enumerate(content):
        if isinstance(block, TextBlockIn):
            texts.append(block)
        elif isinstance(block, ToolResultBlockIn) and role == "user":
            result = _text(block.content, f"{where}[{m}].content")
            turns.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": result})
        else:
            raise _unreadable(f"{where}[{m}]", block.type, role)
    if texts or not turns:
        turns.append({"role": role, "content": _text(texts, where)})
    return turns
