"""A chat request as a prompt: rendered with the model's own chat template, tokenized with
the template's markup as control tokens and the client's text as text, and the text options
its answer's pipeline needs (reasoning split, tool-call format, stop strings).

The tool-call format is decided once per model from the chat template it was trained with: a
template that renders ``<function=`` teaches Qwen3-Coder's XML calls, any other Qwen3's JSON
ones (``--tool-call-format`` overrides it). Guessing from the model's name or architecture
would not work: Qwen3 and Qwen3-Coder share both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.core.chat_template import ChatTemplate
from app.core.context import ContextFit
from app.core.limits import check_json, lone_surrogate_at
from app.core.offload import INLINE_TOKENIZE_CHARS, offloaded
from app.core.prompt import ClientText
from app.core.requests import ChatRequest, Turn
from app.core.thinking_budget import prompt_opens_thinking
from app.engine import ModelInfo, Tokenizer
from app.errors import InvalidRequest
from app.settings import ReasoningFormat, ToolCallFormatSetting
from app.text import Mode, TextOptions, ToolCallFormat

SOFT_SWITCHES = {"/think": True, "/no_think": False}
CODER_TEMPLATE_MARKER = "<function="
"""What Qwen3-Coder's chat template renders (its tool-call examples and history); Qwen3's never
does."""
TOOL_WEIGHT_CHARS = 512
"""What one tool counts for, in prompt characters, when deciding where to render a prompt."""


@dataclass(frozen=True)
class ChatSemantics:
    """How the server treats Qwen3's thinking and tool calls (from the settings)."""

    reasoning_format: ReasoningFormat = "reasoning_content"
    enable_thinking: bool = True
    tool_call_format: ToolCallFormatSetting = "auto"
    """``auto``: from the chat template."""
    reasoning_budget: int = -1
    """Thinking budget for requests that set none (``app.core.thinking_budget``); -1: none."""


@dataclass(frozen=True)
class ChatPrompt:
    """A chat request rendered and tokenized, with what its text pipeline must do."""

    tokens: list[int]
    text: TextOptions
    thinks: bool = False
    """The request thinks (``thinking_possible`` and no ``/no_think``): a budget applies."""
    opens_thinking: bool = False
    """The rendered prompt ends inside an open ``<think>`` block."""


class ChatPrompter:
    def __init__(
        self, tokenizer: Tokenizer, info: ModelInfo, semantics: ChatSemantics, fit: ContextFit
    ) -> None:
        self._tokenizer = tokenizer
        self._semantics = semantics
        self._fit = fit
        self._template = (
            ChatTemplate(info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
            if info.chat_template
            else None
        )
        source = info.chat_template or ""
        self.tool_call_format = detect_tool_call_format(semantics.tool_call_format, source)
        # Qwen3-Coder's template iterates a history call's arguments as a mapping.
        self._arguments_as_object = CODER_TEMPLATE_MARKER in source
        self.template_thinks = "<think>" in source
        """A template that knows no thinking (Qwen3-Coder's) serves a model that does not
        think: a forced call or JSON output is not preceded by an optional think block."""

    def check_template(self) -> None:
        if self._template is None:
            raise InvalidRequest(
                "This model has no chat template; use /v1/completions or start the server "
                "with --chat-template-file."
            )

    def template_kwargs(self, req: ChatRequest) -> dict[str, Any]:
        kwargs = dict(req.template_kwargs)
        if not self._semantics.enable_thinking:
            kwargs.setdefault("enable_thinking", False)
        return kwargs

    async def prompt(
        self, req: ChatRequest, kwargs: dict[str, Any], *, completion: int | None
    ) -> ChatPrompt:
        """The prompt's tokens (refused early when even its size says that it cannot fit with
        ``completion`` tokens after it; None: no context check) and what its text pipeline
        must do."""
        # With thinking off in the template, Qwen3 ignores the soft switches.
        thinking = thinking_possible(kwargs) and soft_switch(req.turns) is not False
        tools = req.offered_tools
        text_chars = sum(len(t.text) for t in req.turns) + TOOL_WEIGHT_CHARS * len(tools)
        tokens, opens_thinking = await offloaded(
            text_chars > INLINE_TOKENIZE_CHARS,
            self._tokens,
            req,
            [tool.template_form() for tool in tools],
            kwargs,
            completion,
        )
        reasoning: Mode = (
            "raw"
            if self._semantics.reasoning_format == "none"
            else ("extract" if thinking else "no_thinking")
        )
        text = TextOptions(
            stop=req.stop,
            reasoning=reasoning,
            tool_calls=bool(tools),
            single_tool_call=req.parallel_tool_calls is False,
            tool_call_format=self.tool_call_format,
            tool_parameters={t.name: t.parameters for t in tools},
        )
        return ChatPrompt(tokens, text, thinking, opens_thinking)

    def _tokens(
        self,
        req: ChatRequest,
        tools: list[dict[str, Any]],
        kwargs: dict[str, Any],
        completion: int | None,
    ) -> tuple[list[int], bool]:
        """The chat prompt rendered with every client string escaped, then tokenized; and
        whether it ends inside an open ``<think>`` block."""
        assert self._template is not None
        client = ClientText(self._tokenizer)
        messages = [
            client.escape(template_message(t, arguments_as_object=self._arguments_as_object))
            for t in req.turns
        ]
        prompt = self._template.render(
            messages,
            tools=client.escape(tools),
            add_generation_prompt=True,
            extra=client.escape(kwargs),
        )
        tokens = self._fit.tokens(client.prompt_parts(prompt), completion, param="messages")
        return tokens, prompt_opens_thinking(prompt)


def thinking_possible(template_kwargs: dict[str, Any]) -> bool:
    """The template leaves the model free to think (a grammar must allow a ``<think>``)."""
    return template_kwargs.get("enable_thinking", True) is not False


def soft_switch(turns: Sequence[Turn]) -> bool | None:
    """Qwen3's ``/think`` or ``/no_think`` in the latest user message (the last one wins)."""
    latest = next((t for t in reversed(turns) if t.role == "user"), None)
    if latest is None:
        return None
    found = [(latest.text.rfind(switch), on) for switch, on in SOFT_SWITCHES.items()]
    position, on = max(found)
    return on if position >= 0 else None


def detect_tool_call_format(setting: str, chat_template: str) -> ToolCallFormat:
    """The setting, or (``auto``) the format the model's chat template teaches."""
    if setting == "auto":
        return "qwen3_coder" if CODER_TEMPLATE_MARKER in chat_template else "qwen3"
    return "qwen3_coder" if setting == "qwen3_coder" else "qwen3"


def template_message(turn: Turn, *, arguments_as_object: bool = False) -> dict[str, Any]:
    """A message as chat templates read it (content always a string, as Qwen's expects).

    ``arguments_as_object``: a history tool call's ``arguments``, a JSON string on the wire,
    is passed as the object it encodes (Qwen3-Coder's template iterates it; Qwen3's takes it
    either way, so it gets the client's own text).
    """
    out: dict[str, Any] = {"role": turn.role, "content": turn.text}
    if turn.name is not None:
        out["name"] = turn.name
    if turn.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {
                    "name": call.name,
                    "arguments": (
                        _arguments_object(call.name, call.arguments)
                        if arguments_as_object
                        else call.arguments
                    ),
                },
            }
            for call in turn.tool_calls
        ]
    if turn.tool_call_id is not None:
        out["tool_call_id"] = turn.tool_call_id
    if turn.reasoning is not None:
        out["reasoning_content"] = turn.reasoning
    return out


def _arguments_object(name: str, arguments: str) -> dict[str, Any]:
    try:
        parsed = json.loads(arguments)
    except (ValueError, RecursionError):  # RecursionError: nested past the parser's stack
        parsed = None
    if not isinstance(parsed, dict):
        raise InvalidRequest(
            f"The arguments of the history tool call to '{name}' must be a JSON object.",
            param="messages",
        )
    check_json(parsed, param="messages")
    if lone_surrogate_at(parsed) is not None:
        raise InvalidRequest(
            f"The arguments of the history tool call to '{name}' hold a lone UTF-16 "
            "surrogate escape; strings must be valid Unicode.",
            param="messages",
            code="invalid_text",
        )
    return parsed
