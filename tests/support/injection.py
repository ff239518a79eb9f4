"""Fault injection and observation around the real engine: never the only evidence.

``InjectedBackend`` wraps a real backend and records every generation it passes on (``Seen``),
cancelled ones included; its kinds hold a generation before it starts (``HeldStart``) or fail
it partway (``FailingBackend``). Tests subclass it for their own hooks.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from app.engine import (
    Backend,
    Flow,
    GenerationResult,
    OnLogprobs,
    OnToken,
    PromptCacheStats,
    SamplingParams,
)

__all__ = ["FailingBackend", "HeldStart", "InjectedBackend", "Seen"]


@dataclass
class Seen:
    """One generation as the wrapper saw it."""

    index: int
    prompt: list[int]
    loop: asyncio.AbstractEventLoop
    """The loop the generation's callbacks run on (a test thread reaches it with
    ``call_soon_threadsafe``)."""
    tokens: list[int] = field(default_factory=list)
    result: GenerationResult | None = None
    refused: bool = False
    """``on_token`` said False."""
    cancelled: bool = False
    """The caller cancelled the generation (its client left, or the server aborted it)."""
    calls_after_end: list[int] = field(default_factory=list)
    """Tokens reported after ``on_token`` said False or the generation was cancelled."""

    @property
    def ended(self) -> bool:
        return self.result is not None or self.cancelled

    @property
    def finish(self) -> str | None:
        if self.cancelled or self.refused:
            return "cancelled"
        return None if self.result is None else self.result.finish_reason


class InjectedBackend:
    """The real engine with a test's hooks around every generation.

    ``started(seen)`` is awaited before the generation reaches the engine; ``watch(seen,
    on_token)`` wraps its callback (which runs on the event loop); ``flow(seen, flow)`` may
    replace the consumer's backpressure with the test's own. Every generation is recorded in
    ``seen``, cancelled ones included.
    """

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.info = inner.info
        self.tokenizer = inner.tokenizer
        self.max_concurrency = inner.max_concurrency
        self.seen: list[Seen] = []

    def kv_cache_usage(self) -> float:
        return self.inner.kv_cache_usage()

    def prompt_cache_stats(self) -> PromptCacheStats | None:
        return self.inner.prompt_cache_stats()

    def check_grammar(self, grammar: str) -> None:
        self.inner.check_grammar(grammar)

    async def started(self, seen: Seen) -> None:
        pass

    def watch(self, seen: Seen, on_token: OnToken) -> OnToken:
        return on_token

    def flow(self, seen: Seen, flow: Flow | None) -> Flow | None:
        return flow

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
        seen = Seen(len(self.seen), list(prompt_tokens), asyncio.get_running_loop())
        self.seen.append(seen)
        watched = self.watch(seen, on_token)

        def observed(token_id: int) -> bool:
            if seen.refused or seen.cancelled:
                seen.calls_after_end.append(token_id)
            seen.tokens.append(token_id)
            keep = watched(token_id)
            seen.refused = seen.refused or not keep
            return keep

        try:
            await self.started(seen)
            seen.result = await self.inner.generate(
                prompt_tokens,
                sampling,
                max_tokens,
                observed,
                on_logprobs=on_logprobs,
                flow=self.flow(seen, flow),
            )
        except asyncio.CancelledError:
            seen.cancelled = True
            raise
        return seen.result

    def close(self) -> None:
        raise AssertionError("an injected backend is never closed by the app")


class HeldStart(InjectedBackend):
    """The demo model, held before decoding (a long prefill or a queue) until released."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.release = threading.Event()

    async def started(self, seen: Seen) -> None:
        await asyncio.to_thread(self.release.wait, 30)


class FailingBackend(InjectedBackend):
    """Fault injection: the real engine, failing after ``after`` tokens."""

    def __init__(self, inner: Backend, after: int) -> None:
        super().__init__(inner)
        self._after = after

    def watch(self, seen: Seen, on_token: OnToken) -> OnToken:
        def failing(token_id: int) -> bool:
            if len(seen.tokens) > self._after:
                raise RuntimeError("llama_decode returned -3 at 0xdeadbeef")
            return on_token(token_id)

        return failing
