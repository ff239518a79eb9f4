"""The backend protocol: the one seam between the service and an inference engine.

A backend generates from prompt token ids and reports every sampled token through
``on_token(token_id) -> bool`` *before* it checks whether to stop, so the caller sees every
token the engine produced (the end-of-generation token included). Returning ``False`` ends the
generation at once; the result then says ``cancelled``. That is how a disconnected client
frees the model within one decode step, and how the service ends a generation on a stop
string: stop strings are matched on decoded text, which the service owns, so the service
records why it said ``False`` and reports ``stop`` to the client.

The alternative rejected: an async token iterator as the protocol. A pull-based iterator lets
the engine run ahead of a slow consumer and hides cancellation in ``aclose()`` semantics; a
push callback whose return value is the cancellation is explicit, cheap, and identical for the
one-request-at-a-time adapter and a batching scheduler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "cancelled"]
"""``stop``: end-of-generation token; ``length``: max_tokens reached; ``cancelled``: the
callback returned ``False``."""

FlashAttn = Literal["auto", "on", "off"]
"""llama.cpp's flash attention switch; ``auto`` lets llama.cpp decide per device."""

OnToken = Callable[[int], bool]


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
    """A GBNF grammar that constrains sampling (built by ``app.backends.grammar``)."""
    top_logprobs: int | None = None
    """Report logprobs with this many alternatives per token (``None``: no logprobs)."""

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class GenerationResult:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    """Every token sampled and passed to ``on_token``, the end-of-generation token included."""
    cached_tokens: int
    """Prompt tokens whose KV cache entries were reused instead of being decoded again."""


@dataclass(frozen=True)
class ModelInfo:
    """What the service needs to know about the loaded model, read once at load time."""

    path: str
    n_ctx: int
    n_vocab: int
    architecture: str
    chat_template: str | None
    bos_token: str
    eos_token: str
    add_bos: bool
    gpu_offload: bool


class Tokenizer(Protocol):
    def tokenize(self, text: str) -> list[int]:
        """Token ids for ``text``, special tokens parsed, BOS added when the model wants it."""
        ...

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token; a byte-level token may be part of a UTF-8 character."""
        ...


class Backend(Protocol):
    info: ModelInfo
    tokenizer: Tokenizer

    def generate(
        self,
        prompt_tokens: Sequence[int],
        sampling: SamplingParams,
        max_tokens: int,
        on_token: OnToken,
        on_logprobs: OnLogprobs | None = None,
    ) -> GenerationResult:
        """Decode until end-of-generation, ``max_tokens``, or ``on_token`` returning False.

        With ``sampling.top_logprobs`` set, ``on_logprobs`` receives each token's logprobs just
        before ``on_token`` receives the token. Blocking: the service calls it on its engine
        thread, never on the event loop.
        """
        ...

    def check_grammar(self, grammar: str) -> None:
        """Raise ``GrammarError`` unless the engine can sample with ``grammar``.

        Called while a request is prepared, so that a grammar the engine would refuse is a 400
        before any engine work (llama.cpp answers one with a NULL sampler).
        """
        ...

    def close(self) -> None:
        """Free the model and its context."""
        ...
