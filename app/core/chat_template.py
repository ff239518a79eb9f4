"""Chat prompts rendered from the model's own Jinja chat template.

The GGUF's ``tokenizer.chat_template`` is the template the model was trained with; rendering
it (rather than a hand-written Qwen format) keeps tools, tool responses, reasoning in history
and ``enable_thinking`` exactly as the model expects. The environment matches what Hugging Face
``transformers`` gives templates: a sandbox, ``trim_blocks``/``lstrip_blocks``, the
``loopcontrols`` extension, ``tojson`` that keeps non-ASCII text, ``raise_exception`` and
``strftime_now``. A template's own ``raise_exception`` becomes a 400 for the client.

Whatever else stops a rendering — a field the template reads and the messages lack, a value
of a type it does not expect, the sandbox refusing an operation or a range too large, a
template that recurses — is a 400 too, decided before any engine work, with a message that
says what kind of failure it was and never Jinja's own text (which quotes the template's
internals); the operator's log line has the details. ``chat_template_kwargs`` may not name a
variable or a global the renderer sets itself (``messages``, ``namespace``, ``range``…):
replacing one would break the template in ways the client cannot see.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from app.errors import InvalidRequest

logger = logging.getLogger(__name__)

RENDER_VARIABLES = frozenset(
    {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}
)
"""What the renderer passes besides ``chat_template_kwargs``."""


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
        self.reserved = RENDER_VARIABLES | frozenset(env.globals)
        """Names ``chat_template_kwargs`` may not set (the renderer's variables, the globals)."""

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
        for name in variables:
            if name in self.reserved:
                raise InvalidRequest(
                    f"chat_template_kwargs may not set '{name}': the chat template's renderer "
                    "sets it.",
                    param=f"chat_template_kwargs.{name}",
                    code="invalid_value",
                )
        variables.update(
            messages=list(messages),
            tools=list(tools) if tools else None,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._bos_token,
            eos_token=self._eos_token,
        )
        try:
            # One mapping, not keywords: a kwarg named like render's own parameters ("self")
            # would be a TypeError.
            return self._template.render(variables)
        except InvalidRequest:
            raise
        except Exception as exc:
            # Info, not a warning: a client's request made it fail (its text may be long).
            logger.info("the chat template failed to render: %s", repr(exc)[:300])
            raise InvalidRequest(
                f"The chat template could not render these messages: {_failure(exc)}.",
                param="messages",
                code="template_error",
            ) from exc


def _failure(exc: Exception) -> str:
    """What kind of failure stopped a rendering, in the client's terms."""
    if isinstance(exc, jinja2.UndefinedError):
        return "it reads a field or value that the request does not have"
    if isinstance(exc, jinja2.exceptions.SecurityError):
        return "it attempted an operation the template sandbox does not allow"
    if isinstance(exc, OverflowError):
        return "it asked for a range or a value too large"
    if isinstance(exc, RecursionError):
        return "it recursed too deeply"
    if isinstance(exc, jinja2.TemplateError):
        return "the template failed"
    return "a value in the request has a type or form it does not expect"
