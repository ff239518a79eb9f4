"""Chat prompts rendered from the model's own Jinja chat template.

The GGUF's ``tokenizer.chat_template`` is the template the model was trained with; rendering
it (rather than a hand-written Qwen format) keeps tools, tool responses, reasoning in history
and ``enable_thinking`` exactly as the model expects. The environment matches what Hugging Face
``transformers`` gives templates: a sandbox, ``trim_blocks``/``lstrip_blocks``, the
``loopcontrols`` extension, ``tojson`` that keeps non-ASCII text, ``raise_exception`` and
``strftime_now``. A template's own ``raise_exception`` becomes a 400 for the client.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from app.errors import InvalidRequest


class TemplateRejected(InvalidRequest):
    """The chat template refused the conversation (``raise_exception`` in the template)."""


def _raise_exception(message: str) -> None:
    raise TemplateRejected(message, param="messages")


def _tojson(
    value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False
) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template with the model's BOS and EOS token texts."""

    def __init__(self, source: str, *, bos_token: str, eos_token: str) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"chat template does not compile: {exc}") from exc
        self._bos_token = bos_token
        self._eos_token = eos_token

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text; ``extra`` carries ``chat_template_kwargs`` such as enable_thinking."""
        variables: dict[str, Any] = dict(extra or {})
        variables.update(
            messages=list(messages),
            tools=list(tools) if tools else None,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._bos_token,
            eos_token=self._eos_token,
        )
        try:
            return self._template.render(**variables)
        except InvalidRequest:
            raise
        except jinja2.TemplateError as exc:
            raise InvalidRequest(
                f"the chat template could not render these messages: {exc.message}",
                param="messages",
            ) from exc
