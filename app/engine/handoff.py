"""Engine thread -> event loop: what the engine produced, delivered on the loop in order.

``Handoff`` carries the items; ``Requester`` is the receiving end of one generation (its
callbacks, counts and result), the same for both backends.

Every sampled token crosses here, so it is built to cost little: the engine thread appends
under one lock and wakes the loop (``call_soon_threadsafe``, a write to its self-pipe) only
when no earlier wake-up is still pending, so a loop that is behind drains a burst on one
wake-up instead of one per item, and a batching scheduler's whole decode step (every
stream's token) is one wake-up. ``wait_for_room`` lets the engine wait while the loop has more
than a bound of items undelivered, so an engine faster than its consumers never runs ahead of
them by more than that.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from app.engine.protocol import (
    EngineFinish,
    Flow,
    GenerationResult,
    OnLogprobs,
    OnToken,
    TokenLogprobs,
)

Item = TypeVar("Item")


class LoopClosed(RuntimeError):
    """The event loop the items were for is gone (its app shut down)."""


class Handoff(Generic[Item]):
    def __init__(
        self, loop: asyncio.AbstractEventLoop, deliver: Callable[[list[Item]], None]
    ) -> None:
        self.loop = loop
        self._deliver = deliver
        self._lock = threading.Condition(threading.Lock())
        self._items: list[Item] = []  # guarded by _lock
        self._wake_pending = False  # guarded by _lock
        self._delivering = 0  # guarded by _lock: taken by the loop, not yet delivered
        self.closed = False

    def post(self, items: Iterable[Item]) -> None:
        """From any thread: deliver ``items`` on the loop, after everything posted before."""
        with self._lock:
            if self.closed:
                raise LoopClosed
            self._items.extend(items)
            wake = not self._wake_pending
            self._wake_pending = True
        if wake:
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError as exc:  # the loop is closed
                with self._lock:
                    self.closed = True
                    self._lock.notify_all()
                raise LoopClosed from exc

    def backlog(self) -> int:
        """Items posted and not delivered yet."""
        with self._lock:
            return len(self._items) + self._delivering

    def wait_for_room(self, limit: int, timeout: float) -> None:
        """From the engine thread: wait (at most ``timeout``) while more than ``limit`` items
        are undelivered. An item counts until its delivery has returned, so what the consumer
        decided on it (a pause, a refusal) is visible once this returns."""
        with self._lock:
            self._lock.wait_for(
                lambda: len(self._items) + self._delivering <= limit or self.closed, timeout
            )

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._wake_pending = False
            self._delivering = len(items)
        try:
            if items:
                self._deliver(items)
        finally:
            with self._lock:
                self._delivering = 0
                self._lock.notify_all()


@dataclass(frozen=True)
class Sampled:
    """A token the engine sampled, with its logprobs when the requester asked for them."""

    token_id: int
    logprobs: TokenLogprobs | None = None


@dataclass(frozen=True)
class Ended:
    """The engine let go of the generation: why (``finish_reason``), or the failure."""

    finish_reason: EngineFinish | None
    error: BaseException | None = None


Update = Sampled | Ended


@dataclass(eq=False)
class Requester:
    """A generation as its requester sees it: the callbacks and the result, on the requester's
    event loop, where ``deliver`` reports each update in order.

    ``cancelled`` is set on the loop (``on_token`` said False, or the awaiting task was
    cancelled) and read by the engine, which then decodes the generation no further.
    ``cached`` and ``started`` are written by the engine before its first hand-off.
    """

    prompt_tokens: int
    on_token: OnToken
    on_logprobs: OnLogprobs | None
    flow: Flow | None
    result: asyncio.Future[GenerationResult]
    cancelled: bool = False
    cached: int = 0
    started: float = 0.0
    reported: int = 0

    def deliver(self, update: Update) -> None:
        if self.result.done():
            return  # refused, cancelled or failed: nothing more is reported
        if isinstance(update, Ended):
            if update.error is not None:
                self.result.set_exception(update.error)
            else:
                self._finish(update.finish_reason or "cancelled")
            return
        self.reported += 1
        try:
            if update.logprobs is not None and self.on_logprobs is not None:
                self.on_logprobs(update.logprobs)
            keep = self.on_token(update.token_id)
        except Exception as exc:
            self.cancelled = True
            self.result.set_exception(exc)
            return
        if not keep:
            self.cancelled = True
            self._finish("cancelled")

    def _finish(self, reason: EngineFinish) -> None:
        self.result.set_result(
            GenerationResult(
                finish_reason=reason,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.reported,
                cached_tokens=self.cached,
                started=self.started or time.perf_counter(),
            )
        )
