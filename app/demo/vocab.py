"""The Qwen3 tokenizer family as a GGUF vocabulary: byte-level BPE, Qwen's added tokens.

Both kinds of synthetic model (the scripted demo model here, the random bench models in
``bench.model``) use this one layout, so they tokenize and detokenize exactly like a Qwen3
checkpoint: 256 byte tokens in GPT-2 ``bytes_to_unicode`` form and order, a few real merges,
any extra pieces a script needs, then Qwen3's added tokens with Qwen3's types.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import gguf

__all__ = [
    "BOS_TEXT",
    "EOS_TEXT",
    "FIM_TEXTS",
    "PAD_TEXT",
    "QWEN3_ADDED_TOKENS",
    "Vocab",
    "added_token_texts",
    "build_vocab",
    "byte_table",
    "token_text",
]

# Qwen3's added tokens in Qwen3's order, with the ``special`` flag of its tokenizer config. The
# GGUF converter stores ``special`` tokens as CONTROL (hidden when detokenized, parsed in a
# prompt only on request) and the others as USER_DEFINED (plain text both ways), which is why
# ``<think>`` and ``<tool_call>`` reach clients as text.
QWEN3_ADDED_TOKENS: Final[tuple[tuple[str, bool], ...]] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
EOS_TEXT: Final = "<|im_end|>"
BOS_TEXT: Final = "<|endoftext|>"
PAD_TEXT: Final = "<|endoftext|>"

FIM_TEXTS: Final = frozenset(
    (
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    )
)
"""The fill-in-the-middle tokens, left out of a vocabulary built with ``fim=False``."""

# A few of the first byte-level merges of a GPT-2 style vocabulary, in ``bytes_to_unicode``
# form ("Ġ" is the space byte). They make the merge table real without letting any merge touch
# the newline byte, so every prompt still ends in the single "\n" byte token.
_MERGES: Final[tuple[tuple[str, str], ...]] = (
    ("Ġ", "Ġ"),
    ("i", "n"),
    ("Ġ", "t"),
    ("e", "r"),
    ("o", "n"),
    ("Ġ", "a"),
    ("r", "e"),
    ("a", "t"),
    ("s", "t"),
    ("e", "n"),
    ("o", "r"),
    ("Ġt", "h"),
    ("Ġth", "e"),
)

# Bytes that GPT-2's ``bytes_to_unicode`` keeps as themselves (printable Latin-1, no space).
_VISIBLE_BYTES: Final = (*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100))


@dataclass(frozen=True)
class Vocab:
    """A Qwen-style byte-level vocabulary: 256 byte tokens, merges, extra pieces, added tokens."""

    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]
    ids: dict[str, int]

    def id_of(self, piece: bytes) -> int:
        """The id of the token whose bytes are ``piece``."""
        return self.ids[token_text(piece)]


@functools.cache
def byte_table() -> tuple[str, ...]:
    """GPT-2's ``bytes_to_unicode``: byte value -> the printable character that stands for it.

    Byte-level vocabularies store tokens as text; bytes that are not printable Latin-1 are
    shifted to U+0100 and up so that every token is a visible, whitespace-free string.
    """
    table = [""] * 256
    shifted = 0
    for byte in range(256):
        if byte in _VISIBLE_BYTES:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(0x100 + shifted)
            shifted += 1
    return tuple(table)


def _byte_token_order() -> list[int]:
    """Byte values in GPT-2's and Qwen's vocabulary order: visible bytes first ("\\n" is 198)."""
    return [*_VISIBLE_BYTES, *(byte for byte in range(256) if byte not in _VISIBLE_BYTES)]


def added_token_texts() -> dict[str, bool]:
    """Qwen3's added tokens: text -> whether it is special (a CONTROL token)."""
    return dict(QWEN3_ADDED_TOKENS)


def token_text(piece: bytes) -> str:
    """The vocabulary string of a piece: an added token's own text, else byte-level form."""
    added = added_token_texts()
    try:
        text = piece.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text in added:
        return text
    table = byte_table()
    return "".join(table[byte] for byte in piece)


def build_vocab(extra_pieces: Sequence[bytes], *, fim: bool = True) -> Vocab:
    """Lay out the vocabulary like Qwen's: bytes, merged tokens, ``extra_pieces``, then the
    added tokens last (without ``fim``, the fill-in-the-middle ones left out: a model that
    cannot infill)."""
    table = byte_table()
    tokens: list[str] = [table[byte] for byte in _byte_token_order()]
    token_types: list[int] = [int(gguf.TokenType.NORMAL)] * len(tokens)
    ids = {text: index for index, text in enumerate(tokens)}

    def add(text: str, token_type: gguf.TokenType) -> None:
        if text not in ids:
            ids[text] = len(tokens)
            tokens.append(text)
            token_types.append(int(token_type))

    for left, right in _MERGES:
        add(left + right, gguf.TokenType.NORMAL)
    added = added_token_texts()
    for piece in extra_pieces:
        text = token_text(piece)
        if text not in added:
            add(text, gguf.TokenType.NORMAL)
    for text, special in QWEN3_ADDED_TOKENS:
        if not fim and text in FIM_TEXTS:
            continue
        add(text, gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    merges = tuple(f"{left} {right}" for left, right in _MERGES)
    return Vocab(tuple(tokens), tuple(token_types), merges, ids)
