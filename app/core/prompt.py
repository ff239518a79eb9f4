"""A chat prompt in token ids: the chat template's markup as control tokens, client text as text.

A chat template writes client strings (message content, names, tool calls and their
arguments, tool results, tool descriptions and schemas, ``chat_template_kwargs``) between its
own ``<|im_start|>``/``<|im_end|>`` markup. Tokenizing the rendered prompt with llama.cpp's
special-token parsing would make a client's ``<|im_end|>\\n<|im_start|>system\\n…`` the real
tokens, so any user could forge a system or assistant turn (llama-server does exactly that).

So before rendering, every occurrence of a control token's text in a client string is
replaced by a placeholder that holds a per-request random nonce (``\\ue000<nonce><id>\\ue001``,
private-use characters no template strips); the rendered prompt is cut at the control token
texts, which now are all the template's own, into those tokens' ids; each text between them
gets the client's literal text back in place of its placeholders and is tokenized as text
(``Tokenizer.tokenize_parts``), where a control token's text can only become ordinary
tokens. A client cannot write a placeholder of its own: it would have to guess the nonce.

For a prompt whose client strings hold no control token text this gives exactly the ids that
tokenizing the rendered prompt with special parsing gives (tests/test_prompt_tokens.py holds
that over conversations with tools, history, thinking and Qwen3-Coder's template). USER_DEFINED
added tokens (``<think>``, ``<tool_call>``, ``<tool_response>``) are text in Qwen's vocabulary
and are matched in client text as llama.cpp (and Hugging Face's tokenizer) match them.

The alternatives rejected: rendering the template twice or once per segment to learn which
text came from the client (templates are not composable that way), and deleting control
token texts from client strings (it silently changes what the client sent, and a model
asked about its own chat format could not be shown it).
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from app.engine import PromptPart, Tokenizer

_OPEN, _CLOSE = "\ue000", "\ue001"


class ClientText:
    """One request's placeholders for the control token texts in its client strings."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._nonce = secrets.token_hex(8)
        self._placeholder = re.compile(f"{_OPEN}{self._nonce}(\\d+){_CLOSE}")
        self._escaped = False

    def escape(self, value: Any) -> Any:
        """``value`` (a string, or JSON-like lists and dicts of them, keys included) with every
        control token text in its strings replaced by a placeholder."""
        if isinstance(value, str):
            return self._escape_text(value)
        if isinstance(value, dict):
            return {self.escape(key): self.escape(member) for key, member in value.items()}
        if isinstance(value, list | tuple):
            return [self.escape(member) for member in value]
        return value

    def _escape_text(self, text: str) -> str:
        parts = self._tokenizer.split_control(text)
        if all(isinstance(part, str) for part in parts):
            return text
        self._escaped = True
        return "".join(
            f"{_OPEN}{self._nonce}{part}{_CLOSE}" if isinstance(part, int) else part
            for part in parts
        )

    def restore(self, text: str) -> str:
        """A text part of the rendered prompt with the client's literal text back."""
        if not self._escaped or _OPEN not in text:
            return text
        texts = self._tokenizer.control_texts
        return self._placeholder.sub(lambda match: texts[int(match.group(1))], text)

    def prompt_parts(self, rendered: str) -> list[PromptPart]:
        """The rendered prompt as control token ids (the template's) and texts (restored)."""
        return [
            self.restore(part) if isinstance(part, str) else part
            for part in self._tokenizer.split_control(rendered)
        ]
