"""A fill-in-the-middle prompt in the model's own format, cut to fit around the cursor.

Qwen2.5-Coder and Qwen3-Coder were trained on the repository-level format Qwen documents::

    <|repo_name|>myproject
    <|file_sep|>path/of/a/file
    its text
    <|file_sep|>path/of/another
    …
    <|file_sep|>filename
    <|fim_prefix|>text before the cursor<|fim_suffix|>text after it<|fim_middle|>

and answer with the middle, ending it with ``<|endoftext|>`` (or ``<|fim_pad|>``, or a
``<|file_sep|>``/``<|repo_name|>`` that would open the next file; all end the generation, as
llama.cpp marks them end-of-generation). The token ids are the model's (``FimTokens``, read
from the GGUF), never found in the client's text: every string a client sends is tokenized as
text, so a ``<|fim_middle|>`` typed in the code stays text.

What fits is decided in tokens, as llama-server's ``format_prompt_infill`` decides it, so that
an editor tuned against llama-server sees the same window: the text around the cursor gets
``--fim-window`` tokens (llama-server: its batch size, 1024 in its Qwen FIM presets), the
prefix's tail up to three quarters, the suffix's head the rest; the extra files get what the
context has left after room for the completion. The difference: extra files are dropped whole,
oldest first (editors send their ring of chunks newest last), where llama-server cuts the
token list at an arbitrary point and can leave half a file, or drop the ``<|repo_name|>``
header, in the prompt.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from app.engine import FimTokens, Tokenizer

_Tokenize = Callable[[str], list[int]]

REPO_NAME = "myproject"
"""The repository's name in the prompt (llama-server's; editors do not send one)."""
CURRENT_FILE = "filename"
"""The name the file being edited gets (llama-server's; editors do not send one)."""
EXTRA_FILE = "tmp"
"""The name of an extra chunk sent without one (llama-server's default)."""


@dataclass(frozen=True)
class ExtraChunk:
    """Context from elsewhere (another file, or another part of this one)."""

    text: str
    filename: str = EXTRA_FILE


@dataclass(frozen=True)
class FimRequest:
    """A fill-in-the-middle request in the core's terms (from ``/infill`` or a text
    completion's ``suffix``)."""

    prefix: str
    suffix: str
    middle: str = ""
    """Text typed on the cursor's line so far (``/infill``'s ``prompt``): after the prefix."""
    extra: tuple[ExtraChunk, ...] = ()
    n_predict: int | None = None
    """Tokens to generate; None: as many as the context leaves; 0: only fill the cache."""
    stop: tuple[str, ...] = ()
    n_indent: int = 0
    t_max_predict_ms: float = 0.0
    n_cmpl: int = 1
    """Completions of the one prompt, decoded together."""

    @property
    def size(self) -> int:
        """UTF-8 bytes of client text the prompt is built from."""
        texts = [self.prefix, self.suffix, self.middle]
        texts += [part for chunk in self.extra for part in (chunk.text, chunk.filename)]
        return sum(len(text.encode("utf-8")) for text in texts)


@dataclass(frozen=True)
class FimPrompt:
    tokens: list[int]
    truncated: bool
    """Some of the prefix, suffix, typed text or extra chunks did not fit and was left out."""


@dataclass(frozen=True)
class FimWindow:
    """How many tokens each part of the prompt may take."""

    prefix: int
    suffix: int
    middle: int
    extra: int

    @classmethod
    def of(cls, *, around: int, n_ctx: int, reserve: int) -> FimWindow:
        """llama-server's split: ``around`` tokens for the cursor's surroundings (three
        quarters before the cursor), the extra context what the context leaves after them and
        ``reserve`` tokens for the completion (llama-server leaves twice ``n_predict``, so its
        warm-up, ``n_predict`` 0, keeps more chunks than the completion that follows it)."""
        window = max(0, min(around, n_ctx - reserve - 3))
        return cls(
            prefix=3 * (window // 4),
            suffix=window // 4,
            middle=window // 4,
            extra=max(0, n_ctx - window - 3 - reserve),
        )


def fim_prompt(
    tokenizer: Tokenizer,
    fim: FimTokens,
    *,
    prefix: str,
    suffix: str,
    middle: str = "",
    extra: Sequence[ExtraChunk] = (),
    window: FimWindow,
    chunk_tokens: _Tokenize | None = None,
) -> FimPrompt:
    """The prompt for completing at the cursor between ``prefix`` + ``middle`` (the text typed
    on the cursor's line so far) and ``suffix``, with ``extra`` chunks as other files.
    ``chunk_tokens`` tokenizes the extra chunks' texts and names (``ChunkTokens``: an editor
    sends the same ring of chunks with every keystroke)."""
    text = tokenizer.tokenize_text
    middle_tokens = text(middle) if middle else []
    prefix_tokens = text(prefix) if prefix else []
    suffix_tokens = text(suffix) if suffix else []
    kept_middle = middle_tokens[max(0, len(middle_tokens) - window.middle) :]
    kept_prefix = prefix_tokens[max(0, len(prefix_tokens) - window.prefix) :]
    suffix_room = max(0, window.suffix - 2 - len(kept_middle))
    kept_suffix = suffix_tokens[:suffix_room]
    context, extra_cut = _repository(chunk_tokens or text, fim, extra, window.extra)
    truncated = extra_cut or (
        len(kept_middle) < len(middle_tokens)
        or len(kept_prefix) < len(prefix_tokens)
        or len(kept_suffix) < len(suffix_tokens)
    )
    bos = tokenizer.bos
    tokens = [bos] if bos is not None else []
    tokens += context
    tokens += [fim.prefix, *kept_prefix, *kept_middle, fim.suffix, *kept_suffix, fim.middle]
    return FimPrompt(tokens, truncated)


class ChunkTokens:
    """The token ids of the texts most recently tokenized, kept: an editor's ring of chunks
    (up to 16 of 64 lines) comes again with every keystroke, and tokenizing it again would be
    most of a request's own work. Thread-safe (``lru_cache``); the lists returned are shared
    and must not be changed."""

    def __init__(self, tokenizer: Tokenizer, size: int = 64) -> None:
        self._cached = functools.lru_cache(maxsize=size)(tokenizer.tokenize_text)

    def __call__(self, text: str) -> list[int]:
        return self._cached(text)


def _repository(
    text: _Tokenize, fim: FimTokens, extra: Sequence[ExtraChunk], room: int
) -> tuple[list[int], bool]:
    """The repository-level context (empty without extra chunks or the model's tokens for it)
    and whether chunks were left out: the newest chunks that fit, whole, in their order."""
    if not extra:
        return [], False
    if fim.repo_name is None or fim.file_sep is None:
        return [], True  # a model without the repository format: only the local context
    header = [fim.repo_name, *text(REPO_NAME + "\n")]
    current = [fim.file_sep, *text(CURRENT_FILE + "\n")]
    room -= len(header) + len(current)
    kept: list[list[int]] = []
    for chunk in reversed(extra):
        tokens = [fim.file_sep, *text(chunk.filename + "\n"), *text(chunk.text)]
        if len(tokens) > room:
            break
        kept.append(tokens)
        room -= len(tokens)
    if not kept:
        return [], True
    body = [token for tokens in reversed(kept) for token in tokens]
    return [*header, *body, *current], len(kept) < len(extra)
