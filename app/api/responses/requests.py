"""``POST /v1/responses`` requests, and their translation into a chat completion request.

The Responses API is served statelessly, the way Codex uses it (``store: false``): every
request carries its whole conversation in ``input``, so it becomes one
``ChatCompletionRequest`` and runs through the same preparation, engine and text pipeline as
``/v1/chat/completions``. What the translation does, item by item:

- ``instructions`` and ``developer``/``system`` messages become system messages (Codex sends
  its system prompt as ``developer`` messages); ``input_text`` and ``output_text`` parts are
  text.
- ``function_call`` items become the assistant's tool calls, ``function_call_output`` items
  tool messages, and a ``reasoning`` item the ``reasoning_content`` of the assistant turn
  after it (Qwen3's template keeps it for the turn in progress). ``encrypted_content`` is
  never produced here and is ignored.
- ``function`` tools are offered as they are. A ``namespace`` tool (Codex's sub-agent tools)
  is flattened: its functions are offered as ``<namespace>.<name>`` and a call of one comes
  back as ``name`` plus ``namespace``, as Codex expects. Any other tool type — hosted tools
  such as ``web_search``, ``file_search``, ``custom`` (freeform grammar) tools, ``tool_search``
  — is left out of the prompt (``app.api.http.hosted_tools``: logged and counted), so a client
  whose default config offers them works; ``--reject-unsupported-tools`` makes it a 400.
- ``reasoning.effort`` ``none`` turns Qwen3's thinking off, any other effort turns it on with
  that effort's thinking budget (``reasoning_effort`` of the chat API); without an effort the
  server's default holds. ``text.format`` is the chat API's
  ``response_format``.

Fields that need server-side state are refused (400): ``previous_response_id``,
``conversation``, a stored ``prompt``, ``background: true``. Fields that ask nothing of a
stateless server are accepted and ignored: ``store`` (nothing is ever stored), ``include``,
``prompt_cache_key`` (the KV cache reuses a shared prefix by itself), ``client_metadata``,
``metadata``, ``user``, ``safety_identifier``, ``service_tier``, ``truncation``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import Discriminator, Field, Tag, ValidationError

from app.api.http.hosted_tools import UnsupportedTools
from app.api.openai.requests import ChatCompletionRequest, ReasoningEffort, RequestModel
from app.errors import InvalidRequest, validation_error

TEXT_PARTS = frozenset({"input_text", "output_text", "text", "summary_text", "reasoning_text"})


class ContentPart(RequestModel):
    type: str
    text: str | None = None
    refusal: str | None = None


Content = str | list[ContentPart]


def content_text(content: Content | None, where: str) -> str:
    """The text of a message's content; a part that is not text (an image, a file, audio)
    is a 400, since the model reads text only."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for n, part in enumerate(content):
        if part.type in TEXT_PARTS and part.text is not None:
            texts.append(part.text)
        elif part.type == "refusal" and part.refusal is not None:
            texts.append(part.refusal)
        else:
            raise InvalidRequest(
                f"{where}.content[{n}] is of type '{part.type}'; this server reads text only.",
                param=f"{where}.content[{n}]",
                code="unsupported_content",
            )
    return "".join(texts)


class MessageItem(RequestModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content


class FunctionCallItem(RequestModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    namespace: str | None = None


class FunctionCallOutputItem(RequestModel):
    type: Literal["function_call_output"]
    call_id: str
    output: Content


class ReasoningItem(RequestModel):
    type: Literal["reasoning"]
    content: list[ContentPart] | None = None


class OtherItem(RequestModel):
    """An item type this server does not take (it says which, as a 400)."""

    type: str


_ITEM_TYPES = frozenset({"message", "function_call", "function_call_output", "reasoning"})


def _item_kind(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else value.type
    return kind if kind in _ITEM_TYPES else "other"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")]
    | Annotated[OtherItem, Tag("other")],
    Discriminator(_item_kind),
]


class FunctionToolIn(RequestModel):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class OtherTool(RequestModel):
    type: str
    name: str | None = None


def _tool_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else value.type
    return kind if kind in ("function", "namespace") else "other"


class NamespaceTool(RequestModel):
    type: Literal["namespace"]
    name: str
    description: str | None = None
    tools: list[
        Annotated[
            Annotated[FunctionToolIn, Tag("function")] | Annotated[OtherTool, Tag("other")],
            Discriminator(lambda v: "function" if _tool_kind(v) == "function" else "other"),
        ]
    ]


ToolIn = Annotated[
    Annotated[FunctionToolIn, Tag("function")]
    | Annotated[NamespaceTool, Tag("namespace")]
    | Annotated[OtherTool, Tag("other")],
    Discriminator(_tool_kind),
]


class FunctionChoice(RequestModel):
    type: Literal["function"]
    name: str


class ReasoningConfig(RequestModel):
    effort: str | None = None


class TextFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(RequestModel):
    format: TextFormat | None = None


class ResponsesRequest(RequestModel):
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[ToolIn] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    stream: bool = False
    previous_response_id: str | None = None
    conversation: Any = None
    prompt: Any = None
    background: bool | None = None


_STATEFUL = {
    "previous_response_id": "this server stores no responses: send the whole conversation "
    "in 'input' instead of 'previous_response_id'",
    "conversation": "this server keeps no conversations: send the whole conversation in 'input'",
    "prompt": "this server has no stored prompts: send 'instructions' instead",
    "background": "background responses must be stored and fetched later; this server stores "
    "nothing",
}


def _refuse_stateful(req: ResponsesRequest) -> None:
    for field, why in _STATEFUL.items():
        if getattr(req, field):
            raise InvalidRequest(
                f"'{field}' is not supported: {why}.", param=field, code="unsupported_parameter"
            )
    if not req.input:
        raise InvalidRequest("'input' must not be empty.", param="input", code="invalid_value")


@dataclass(frozen=True)
class ChatTranslation:
    """A Responses request as a chat request, with what the response needs to undo."""

    chat: ChatCompletionRequest
    namespaces: dict[str, tuple[str, str]]
    """Offered tool name -> (namespace, function name), for each flattened namespace tool."""
    tools: list[dict[str, Any]]
    """The function tools offered, as chat tools (flattened names)."""


def responses_as_chat(req: ResponsesRequest, unsupported: UnsupportedTools) -> ChatTranslation:
    """The chat request ``req`` asks for; the tools it offers that cannot run here are left
    out into ``unsupported`` (or refused, as it says)."""
    _refuse_stateful(req)
    tools, namespaces = _tools(req.tools or [], unsupported)
    body: dict[str, Any] = {
        "model": req.model,
        "messages": _messages(req),
        "stream": req.stream,
        "max_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "parallel_tool_calls": req.parallel_tool_calls,
    }
    if tools:
        body["tools"] = tools
    choice = req.tool_choice
    if isinstance(choice, FunctionChoice):
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None:
        body["tool_choice"] = choice
    effort = req.reasoning.effort if req.reasoning is not None else None
    if effort is not None:
        body["chat_template_kwargs"] = {"enable_thinking": effort != "none"}
        if effort in get_args(ReasoningEffort):
            body["reasoning_effort"] = effort  # its thinking budget (docs/llama-knobs.md)
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type != "text":
        body["response_format"] = {"type": fmt.type}
        if fmt.type == "json_schema":
            body["response_format"]["json_schema"] = {
                "name": fmt.name,
                "description": fmt.description,
                "schema": fmt.schema_,
                "strict": fmt.strict,
            }
    try:
        chat = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc
    return ChatTranslation(chat, namespaces, tools)


def _function(tool: FunctionToolIn, name: str) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, "parameters": tool.parameters}
    if tool.description is not None:
        function["description"] = tool.description
    if tool.strict is not None:
        function["strict"] = tool.strict
    return {"type": "function", "function": function}


def _tools(
    tools: list[FunctionToolIn | NamespaceTool | OtherTool], unsupported: UnsupportedTools
) -> tuple[list[dict[str, Any]], dict[str, tuple[str, str]]]:
    offered: list[dict[str, Any]] = []
    namespaces: dict[str, tuple[str, str]] = {}
    for n, tool in enumerate(tools):
        where = f"tools[{n}]"
        if isinstance(tool, FunctionToolIn):
            offered.append(_function(tool, tool.name))
        elif isinstance(tool, NamespaceTool):
            for m, inner in enumerate(tool.tools):
                if isinstance(inner, FunctionToolIn):
                    flat = f"{tool.name}.{inner.name}"
                    namespaces[flat] = (tool.name, inner.name)
                    offered.append(_function(inner, flat))
                else:
                    inner_where = f"{where}.tools[{m}]"
                    unsupported.leave_out(inner_where, inner.type, f"a '{inner.type}' tool")
        else:
            unsupported.leave_out(where, tool.type, f"a '{tool.type}' tool")
    return offered, namespaces


def _messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
        return messages
    reasoning: str | None = None  # a reasoning item, waiting for its assistant turn
    for n, item in enumerate(req.input):
        where = f"input[{n}]"
        if isinstance(item, MessageItem):
            message: dict[str, Any] = {
                "role": item.role,
                "content": content_text(item.content, where),
            }
            if item.role == "assistant" and reasoning is not None:
                message["reasoning_content"], reasoning = reasoning, None
            messages.append(message)
        elif isinstance(item, FunctionCallItem):
            name = f"{item.namespace}.{item.name}" if item.namespace else item.name
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                if reasoning is not None:
                    messages[-1]["reasoning_content"], reasoning = reasoning, None
        elif isinstance(item, FunctionCallOutputItem):
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item.call_id,
                    "content": content_text(item.output, f"{where}.output"),
                }
            )
        elif isinstance(item, ReasoningItem):
            reasoning = content_text(item.content, where) or None
        else:
            raise InvalidRequest(
                f"{where} is a '{item.type}' item, which this server does not take (it takes "
                "message, function_call, function_call_output and reasoning items).",
                param=where,
                code="unsupported_item",
            )
    return messages
