"""Tokenization over the model's own vocabulary: linear in the text, client text kept text.

llama.cpp's ``llama_tokenize`` with ``parse_special`` first partitions the text at the texts of
the vocabulary's added tokens (CONTROL, USER_DEFINED and UNKNOWN ones, longest first), then
BPE-tokenizes the text between them. That cannot serve a chat prompt as it is, for two
reasons. Its partition is quadratic in the number of matches (each match walks the fragment
list from its head, so a chat of many short messages costs seconds to minutes). And it
cannot tell the chat template's ``<|im_start|>`` from one a client typed into a message, so
any client could forge a system or assistant turn.

So the partition happens here, in one regular-expression pass over the text, and llama.cpp
only ever tokenizes text in which no added token occurs. ``split_control`` cuts a text at the
CONTROL (and UNKNOWN) token texts into token ids and text; ``tokenize_parts`` turns a prompt
given as such parts into ids: an id stays itself, a text is cut at the USER_DEFINED token texts
(``<think>``, ``<tool_call>``: plain text in Qwen's vocabulary, which llama.cpp matches even
without ``parse_special``) and the rest goes to llama.cpp without special parsing. A caller
that puts a client's text into a text part (``app.core.prompt`` does, for every string a chat
request carries) can never see it become a control token.

For any text, ``tokenize(text)`` gives exactly the ids ``llama_tokenize(text,
parse_special=True)`` gives when no added token's text overlaps another's — a proper suffix of
one being a proper prefix of another, where llama.cpp's longest-first passes and a
leftmost-longest scan could cut differently — which holds for Qwen's added tokens (checked at
load; tests/test_prompt_tokens.py holds the equality on the demo model's vocabulary). Added
tokens with llama.cpp's LSTRIP/RSTRIP attributes (whitespace eaten around them; no Qwen token
has them) are not supported and logged at load.
"""

from __future__ import annotations

import ctypes
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import llama_cpp

from app.engine.protocol import FimTokens
from app.engine.protocol import PromptPart as Part

logger = logging.getLogger(__name__)

_SPECIAL_ATTRS = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
_STRIP_ATTRS = llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP | llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP
_CACHED_FRAGMENT_CHARS = 64
"""Text fragments up to this long are tokenized once per prompt (a chat prompt repeats its
``user\\n`` and ``\\n`` between turns thousands of times)."""


@dataclass(frozen=True)
class AddedTokens:
    """Some added tokens by text, and the one scan that finds them in a text."""

    ids: Mapping[str, int]
    _pattern: re.Pattern[str] | None

    @classmethod
    def of(cls, ids: Mapping[str, int]) -> AddedTokens:
        # At one position the longest text wins (the alternatives are tried in order), as in
        # llama.cpp's partition, which takes the added tokens longest first.
        texts = sorted((text for text in ids if text), key=len, reverse=True)
        pattern = re.compile("|".join(map(re.escape, texts))) if texts else None
        return cls(dict(ids), pattern)

    def split(self, text: str) -> list[Part]:
        """``text`` cut at these tokens' texts: the token ids, and the text between them."""
        if self._pattern is None:
            return [text] if text else []
        parts: list[Part] = []
        at = 0
        for match in self._pattern.finditer(text):
            if match.start() > at:
                parts.append(text[at : match.start()])
            parts.append(self.ids[match.group()])
            at = match.end()
        if at < len(text):
            parts.append(text[at:])
        return parts


def overlapping(texts: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs of texts where a proper suffix of the first is a proper prefix of the second."""
    texts = [text for text in texts if text]
    return [
        (a, b)
        for a in texts
        for b in texts
        if a != b and any(a.endswith(b[:k]) for k in range(1, min(len(a), len(b))))
    ]


class LlamaTokenizer:
    """Tokenization over a loaded ``LlamaModel``'s vocabulary (thread-safe: it only reads)."""

    def __init__(self, model: Any) -> None:
        self._vocab = model.vocab
        vocab = self._vocab
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self._add_eos = bool(llama_cpp.llama_vocab_get_add_eos(vocab))
        self._bos = int(llama_cpp.llama_vocab_bos(vocab))
        self._eos = int(llama_cpp.llama_vocab_eos(vocab))
        control: dict[str, int] = {}
        user_defined: dict[str, int] = {}
        stripping: list[str] = []
        longest = 1
        for token_id in range(int(llama_cpp.llama_vocab_n_tokens(vocab))):
            longest = max(longest, len(self._piece(token_id, special=True)))
            attrs = int(llama_cpp.llama_vocab_get_attr(vocab, token_id))
            kind = (
                control
                if attrs & _SPECIAL_ATTRS
                else user_defined
                if attrs & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
                else None
            )
            if kind is None:
                continue
            try:
                text = bytes(llama_cpp.llama_vocab_get_text(vocab, token_id)).decode("utf-8")
            except UnicodeDecodeError:
                continue  # it cannot occur in valid UTF-8 text
            kind.setdefault(text, token_id)
            if attrs & _STRIP_ATTRS:
                stripping.append(text)
        self.control = AddedTokens.of(control)
        self.control_texts: Mapping[int, str] = {i: text for text, i in control.items()}
        self.user_defined = AddedTokens.of(user_defined)
        self.max_token_bytes = longest
        """The most bytes of text one token stands for: a prompt of more than ``n`` times this
        many bytes has more than ``n`` tokens."""
        self.fim = fim_tokens(vocab)
        self._pieces: dict[int, bytes] = {}
        overlaps = overlapping([*control, *user_defined])
        if overlaps or stripping:
            logger.warning(
                "added tokens that overlap (%s) or strip whitespace (%s): prompts holding them "
                "may tokenize differently from llama.cpp's own partition",
                overlaps[:3],
                stripping[:3],
            )

    @property
    def bos(self) -> int | None:
        return self._bos if self._add_bos else None

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids for ``text``, BOS (and EOS) as the model wants them; with ``special``,
        CONTROL token texts become those tokens, else they are text."""
        return self.tokenize_parts(self.split_control(text) if special else [text])

    def split_control(self, text: str) -> list[Part]:
        """``text`` cut at CONTROL token texts: their ids, and the text between them."""
        return self.control.split(text)

    def tokenize_parts(self, parts: Iterable[Part]) -> list[int]:
        """Token ids for a prompt given as parts: an id as it is, a text as text (its USER_DEFINED
        tokens matched, as llama.cpp does, never a CONTROL one); BOS and EOS per the model."""
        tokens = [self._bos] if self._add_bos else []
        cache: dict[str, list[int]] = {}
        for part in parts:
            if isinstance(part, int):
                tokens.append(part)
            else:
                tokens += self._text(part, cache)
        if self._add_bos and self._add_eos:
            tokens.append(self._eos)
        return tokens

    def tokenize_text(self, text: str) -> list[int]:
        """Token ids for ``text`` as text (never a CONTROL token), with no BOS or EOS: a piece
        of a prompt that is put together from several."""
        return self._text(text, {})

    def _text(self, text: str, cache: dict[str, list[int]]) -> list[int]:
        tokens: list[int] = []
        for piece in self.user_defined.split(text):
            if isinstance(piece, int):
                tokens.append(piece)
            elif len(piece) > _CACHED_FRAGMENT_CHARS:
                tokens += self._text_tokens(piece)
            else:
                cached = cache.get(piece)
                if cached is None:
                    cached = cache[piece] = self._text_tokens(piece)
                tokens += cached
        return tokens

    def _text_tokens(self, text: str) -> list[int]:
        """llama.cpp's BPE of a text holding no added token (its partition finds nothing)."""
        data = text.encode("utf-8")
        room = len(data) + 1  # BPE: at most one token per byte; SPM may add a space
        buffer = (llama_cpp.llama_token * room)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, room, False, False)
        if n < 0:  # never for these vocabularies, but llama.cpp says how many it needs
            room = -n
            buffer = (llama_cpp.llama_token * room)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, room, False, False)
            if n < 0:
                raise RuntimeError("llama.cpp could not tokenize a prompt fragment")
        return list(buffer[:n])

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self._piece(token_id, special=False)
        return piece

    def _piece(self, token_id: int, *, special: bool) -> bytes:
        # llama-cpp-python's own detokenize reads through 32 bytes and cuts longer pieces.
        size = 64
        while True:
            buffer = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self._vocab, token_id, buffer, size, 0, special)
            if n >= 0:
                return buffer.raw[:n]
            size = -n


def fim_tokens(vocab: Any) -> FimTokens | None:
    """llama.cpp's fill-in-the-middle token ids for ``vocab`` (from the GGUF's
    ``tokenizer.ggml.fim_*_token_id``, or found by text at load: ``<|fim_prefix|>`` …), or None
    when prefix, suffix or middle is missing."""

    def token(read: Any) -> int | None:
        token_id = int(read(vocab))
        return None if token_id < 0 else token_id

    prefix = token(llama_cpp.llama_vocab_fim_pre)
    suffix = token(llama_cpp.llama_vocab_fim_suf)
    middle = token(llama_cpp.llama_vocab_fim_mid)
    if prefix is None or suffix is None or middle is None:
        return None
    return FimTokens(
        prefix,
        suffix,
        middle,
        repo_name=token(llama_cpp.llama_vocab_fim_rep),
        file_sep=token(llama_cpp.llama_vocab_fim_sep),
    )
