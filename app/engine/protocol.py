"""The engine protocol: the one seam between the generation service and an inference engine.

A backend generates from prompt token ids and reports every sampled token through
``on_token(token_id) -> bool`` *before* it decides whether to stop, so the caller sees every
token the engine produced (the end-of-generation token included). Returning ``False`` ends the
generation: no further token is reported and the result says ``cancelled``. That is how the
service ends a generation on a stop string (stop strings are matched on decoded text, which
the service owns; it records why it said ``False``) and how a client that left frees its place.

``generate`` is a coroutine and ``on_token`` runs on its event loop. The engine decodes on its
own thread(s) and hands sampled tokens over to the loop — a batching backend all the streams'
tokens of one decode step at once — so the per-token work of a response (text decoding, JSON,
SSE) never needs a thread of its own, and the consumer needs no locks. Cancelling the task that
awaits ``generate`` ends the generation wherever it is: queued, prefilling or decoding. A
consumer that cannot keep up says so through its ``Flow``: the engine then decodes that
generation no further (its sequence is parked) until the consumer resumes it, and every other
generation goes on.

The alternatives rejected: a blocking ``generate`` called on a thread per request, which at
dozens of streams is dozens of threads taking turns on one GIL for every token; and a
pull-based async token iterator, which hides cancellation in ``aclose()`` and lets a consumer
that stops pulling hold a batch slot without the engine knowing why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

EngineFinish = Literal["stop", "length", "cancelled"]
"""``stop``: end-of-generation token; ``length``: max_tokens reached; ``cancelled``: the
callback returned ``False``."""

OnToken = Callable[[int], bool]


class EngineError(RuntimeError):
    """The engine failed a generation (a failed decode step, or the backend closed)."""


class GrammarError(ValueError):
    """A schema or grammar that constrained decoding cannot honour; the message says what."""


@dataclass(frozen=True)
class TokenLogprobs:
    """The model's log-probability of a sampled token and of its most likely alternatives.

    Raw model probabilities (before temperature, penalties and grammar), as OpenAI reports.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


OnLogprobs = Callable[[TokenLogprobs], None]


@dataclass(frozen=True)
class ThinkingBudget:
    """At most ``tokens`` tokens inside the thinking block, then the engine closes it itself.

    The engine counts the tokens it samples after ``start`` (or from the first one when the
    prompt already opened the block: ``inside``); when the count reaches ``tokens`` before
    ``end`` was sampled, it samples ``forced`` next, token by token, whatever the model's
    logits say (``app.engine.thinking_limit``). The ids come from the model's own tokenizer.
    """

    tokens: int
    start: tuple[int, ...]
    """The opening tag's token ids (Qwen3: ``<think>``, one token)."""
    end: tuple[int, ...]
    """The closing tag's token ids: the model ended its thinking itself."""
    forced: tuple[int, ...]
    """What closes a block whose budget is spent (Qwen3: ``"\\n</think>"``)."""
    inside: bool = False
    """The prompt ends inside an open block (a template that opens it for the model)."""


@dataclass(frozen=True)
class SamplingParams:
    """Engine sampling arguments, mapped explicitly from the request by the service."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    grammar: str | None = None
    """A GBNF grammar that constrains sampling (built by ``app.engine.grammar``)."""
    top_logprobs: int | None = None
    """Report logprobs with this many alternatives per token (``None``: no logprobs)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs: each bias is added to its token's logit before sampling."""
    thinking_budget: ThinkingBudget | None = None
    """Close the thinking block after this many tokens (``None``: no budget)."""
    revision: bool = False
    """The prompt revises a document rather than continuing a conversation (an editor's
    fill-in-the-middle prompt, sent again at every keystroke): what it leaves of a slot's
    cells, when it keeps most of them, is an old version nobody asks for again, so the
    engine does not copy it to the host-RAM prompt cache."""

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def argmax(self) -> bool:
        """Greedy with nothing else between the logits and the choice (no grammar, no logit
        biases, neutral penalties): the most likely token, which an engine may take from the
        logits itself."""
        return (
            self.greedy
            and not self.grammar
            and not self.logit_bias
            and self.repeat_penalty == 1.0
            and self.frequency_penalty == 0.0
            and self.presence_penalty == 0.0
        )


@dataclass(frozen=True)
class GenerationResult:
    finish_reason: EngineFinish
    prompt_tokens: int
    completion_tokens: int
    """Every token passed to ``on_token``, the end-of-generation token included."""
    cached_tokens: int
    """Prompt tokens whose KV cache entries were reused instead of being decoded again."""
    started: float
    """``time.perf_counter()`` when the engine took the generation up (the end of its wait
    for the engine, the start of its prefill)."""


@dataclass(frozen=True)
class PromptCacheStats:
    """The host-RAM prompt cache's counters (``--cache-ram``), since the backend loaded."""

    hits: int
    """Placements that restored a saved state."""
    misses: int
    """Placements that found no saved state worth restoring (and no slot holding a prefix)."""
    saved_bytes: int
    restored_bytes: int
    restored_tokens: int
    evictions: int
    bytes: int
    """Held now."""
    entries: int
    limit_bytes: int | None


@dataclass(frozen=True)
class ModelInfo:
    """What the service needs to know about the loaded model, read once at load time."""

    path: str
    n_ctx: int
    """Tokens one generation may use, prompt and completion together."""
    n_vocab: int
    architecture: str
    chat_template: str | None
    bos_token: str
    eos_token: str
    gpu_offload: bool


PromptPart = str | int
"""A piece of a prompt: text, or a token id placed as it is."""


@dataclass(frozen=True)
class FimTokens:
    """The model's fill-in-the-middle tokens (Qwen's ``<|fim_prefix|>`` …), as llama.cpp
    reads them from the GGUF: ``tokenizer.ggml.fim_*_token_id``, else found by their text."""

    prefix: int
    suffix: int
    middle: int
    repo_name: int | None = None
    """``<|repo_name|>``: opens the repository-level context (Qwen2.5/3-Coder)."""
    file_sep: int | None = None
    """``<|file_sep|>``: opens each file of that context."""


class Tokenizer(Protocol):
    control_texts: Mapping[int, str]
    """The text of each control token (``<|im_start|>``), by id."""
    max_token_bytes: int
    """The most bytes of text one token stands for (a lower bound on a text's token count is
    its UTF-8 length divided by this)."""
    fim: FimTokens | None
    """The fill-in-the-middle tokens, or None when the model has no prefix, suffix and middle."""

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids for ``text``, BOS added when the model wants it; with ``special``, the texts
        of control tokens (``<|im_start|>``) become those tokens, else they are text."""
        ...

    def split_control(self, text: str) -> list[PromptPart]:
        """``text`` cut at the texts of control tokens: their ids, and the text between."""
        ...

    def tokenize_parts(self, parts: Iterable[PromptPart]) -> list[int]:
        """Token ids for a prompt given as parts: an id as it is, a text as text (it never
        yields a control token); BOS added when the model wants it."""
        ...

    def tokenize_text(self, text: str) -> list[int]:
        """Token ids for ``text`` as text (never a control token), no BOS or EOS."""
        ...

    @property
    def bos(self) -> int | None:
        """The token a prompt starts with when the model wants one (Qwen: none)."""
        ...

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token; a byte-level token may be part of a UTF-8 character."""
        ...


def _no_engine_waiting() -> None:
    pass


class Flow:
    """Backpressure from a generation's consumer to the engine, on the consumer's event loop.

    The consumer pauses when it holds as much undelivered output as it may and resumes when it
    has room again. The engine reads ``paused`` before it decodes the next token of the
    generation and, while it is set, decodes that generation no further; ``resume`` wakes an
    engine that waits for it.
    """

    __slots__ = ("_wake", "paused")

    def __init__(self) -> None:
        self.paused = False
        self._wake: Callable[[], None] = _no_engine_waiting

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self._wake()

    def on_resume(self, wake: Callable[[], None]) -> None:
        """For the engine: ``wake`` is called (on the event loop) whenever a pause ends."""
        self._wake = wake


class Backend(Protocol):
    info: ModelInfo
    tokenizer: Tokenizer
    max_concurrency: int
    """Generations decoded at once; more wait in the backend's queue in arrival order."""

    async def generate(
        self,
        prompt_tokens: Sequence[int],
        sampling: SamplingParams,
        max_tokens: int,
        on_token: OnToken,
        *,
        on_logprobs: OnLogprobs | None = None,
        flow: Flow | None = None,
    ) -> GenerationResult:
        """Decode until end-of-generation, ``max_tokens``, or ``on_token`` returning False.

        ``on_token`` (and, with ``sampling.top_logprobs`` set, ``on_logprobs`` just before it)
        is called on the caller's event loop, in order, never after it returned False.
        Cancelling the awaiting task ends the generation wherever it is (queued, prefilling,
        decoding) and frees its place within one decode step.
        """
        ...

    def kv_cache_usage(self) -> float:
        """Share of the KV cache's cells that hold tokens (0 to 1)."""
        ...

    def prompt_cache_stats(self) -> PromptCacheStats | None:
        """The host-RAM prompt cache's counters; None when there is none."""
        ...

    def check_grammar(self, grammar: str) -> None:
        """Raise ``GrammarError`` unless the engine can sample with ``grammar``.

        Called while a request is prepared, so that a grammar the engine would refuse is a 400
        before any engine work (llama.cpp answers one with a NULL sampler).
        """
        ...

    def close(self) -> None:
        """Free the model and its context; generations still running fail."""
        ...
