"""Requests as the core understands them: a chat and a text completion (a fill-in-the-middle
is ``app.core.infill.FimRequest``).

Each API translates its own wire types into these (``app.api.<api>``), so the core decides
from one shape whatever the client spoke: which tools the model is offered, whether its
output must be a tool call or JSON, what it samples with. They are plain frozen data; the
wire has already validated every value (ranges, types, that a named tool exists).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class Sampling:
    """The sampling a client asked for; None takes llama.cpp's default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs, as the client gave them."""


@dataclass(frozen=True)
class ToolCall:
    """A call the assistant made earlier in the conversation."""

    id: str
    name: str
    arguments: str
    """The arguments as the client sent them: a JSON text."""


@dataclass(frozen=True)
class Turn:
    """One message of a conversation."""

    role: Role
    text: str
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    reasoning: str | None = None
    """The assistant's earlier thinking, when the client sends it back."""


@dataclass(frozen=True)
class ToolDef:
    """A function the model may call."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def template_form(self) -> dict[str, Any]:
        """The tool as chat templates read it: OpenAI's shape, unset fields left out."""
        function: dict[str, Any] = {"name": self.name}
        for key in ("description", "parameters", "strict"):
            value = getattr(self, key)
            if value is not None:
                function[key] = value
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class NamedTool:
    """A ``tool_choice`` that forces a call to one tool."""

    name: str


ToolChoice = Literal["none", "auto", "required"] | NamedTool | None


@dataclass(frozen=True)
class JsonOutput:
    """The answer must be JSON: any object, or one that matches ``schema``."""

    schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class ChatRequest:
    turns: tuple[Turn, ...]
    model: str | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    sampling: Sampling = field(default_factory=Sampling)
    tools: tuple[ToolDef, ...] = ()
    tool_choice: ToolChoice = None
    parallel_tool_calls: bool | None = None
    json_output: JsonOutput | None = None
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Extra variables for the chat template (``chat_template_kwargs``)."""
    top_logprobs: int | None = None
    """Logprobs of each sampled token with this many alternatives; None: no logprobs."""
    thinking_budget: int | None = None
    reasoning_effort: str | None = None

    @property
    def offered_tools(self) -> tuple[ToolDef, ...]:
        """Tools the model may call: none when ``tool_choice`` is ``none``, only the named one
        when it names one."""
        if not self.tools or self.tool_choice == "none":
            return ()
        if isinstance(self.tool_choice, NamedTool):
            return tuple(t for t in self.tools if t.name == self.tool_choice.name)
        return self.tools

    @property
    def forced_tools(self) -> bool:
        """The output must be a tool call (``required`` or a named function)."""
        return bool(self.offered_tools) and self.tool_choice not in (None, "auto")


@dataclass(frozen=True)
class TextRequest:
    """A text completion of a raw prompt, or (``suffix`` given) of the gap between the prompt
    and the suffix."""

    prompt: str | tuple[int, ...]
    model: str | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    sampling: Sampling = field(default_factory=Sampling)
    suffix: str | None = None
