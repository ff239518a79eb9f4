"""Admission: how many generations the service takes on, how long each may run, and when it
stops taking them.

A request takes a ``Ticket`` when it is prepared, before any response byte is sent, so that
"too busy" is a real HTTP 429 (OpenAI's envelope, ``Retry-After``) rather than an error in
the middle of a stream. Tickets count running *and* waiting generations: at most the
backend's ``max_concurrency`` run, at most ``max_queue`` more wait for a slot. The place is
held until the generation ends (``release``); a request whose response never starts (its
client left before the first byte) gives its place back when it is dropped.

A ticket also carries the two ways the server itself ends a generation: the per-request
timeout and the shutdown grace period. Both *abort* the ticket, which fails the generation's
output and cancels its engine work: the route sends the error in-band (a stream) or as the
response (buffered), and the engine drops the generation at its next step. The alternative
rejected: cancelling the response task, which would cut a stream off without ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Callable

from app.errors import ApiError, Overloaded, Unavailable

logger = logging.getLogger(__name__)

Abort = Callable[[ApiError], None]


def shutting_down() -> Unavailable:
    return Unavailable(
        "The server is shutting down; retry the request on another instance.",
        code="shutting_down",
    )


class Admission:
    """The service's places: ``concurrency`` running plus ``max_queue`` waiting.

    Thread-safe: tickets are taken on the event loop but may be dropped on any thread.
    """

    def __init__(
        self, concurrency: int, *, max_queue: int | None = None, timeout_s: float | None = None
    ) -> None:
        self.concurrency = concurrency
        self.capacity = None if max_queue is None else concurrency + max_queue
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        # Weak: a ticket nobody holds any more (a response that never started) frees its place.
        self._tickets: weakref.WeakSet[Ticket] = weakref.WeakSet()
        self._draining = False

    @property
    def in_flight(self) -> int:
        """Generations admitted and not yet ended: running plus waiting."""
        with self._lock:
            return len(self._tickets)

    @property
    def draining(self) -> bool:
        return self._draining

    def admit(self) -> Ticket:
        """A place for one generation; 503 while shutting down, 429 when every place is taken."""
        with self._lock:
            if self._draining:
                raise shutting_down()
            if self.capacity is not None and len(self._tickets) >= self.capacity:
                raise Overloaded(
                    f"The server is at capacity ({self.concurrency} running, "
                    f"{self.capacity - self.concurrency} waiting); retry shortly.",
                    code="overloaded",
                )
            ticket = Ticket(self)
            self._tickets.add(ticket)
            return ticket

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            self._tickets.discard(ticket)

    async def drain(self, grace_s: float) -> None:
        """Stop admitting; let admitted generations run for ``grace_s``, then end the rest
        with a shutting-down error (in-band on a stream, followed by ``[DONE]``)."""
        with self._lock:
            self._draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        with self._lock:
            left = list(self._tickets)
        if left:
            logger.warning("shutdown grace period over: ending %d generation(s)", len(left))
        for ticket in left:
            ticket.abort(shutting_down())
        # The aborted streams now send their error and [DONE]; give them a moment to flush.
        flushed = loop.time() + 5.0
        while self.in_flight and loop.time() < flushed:
            await asyncio.sleep(0.05)


class Ticket:
    """One admitted generation's place, its deadline, and the way to end it early."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._admitted = time.monotonic()
        self._abort: Abort | None = None
        self._aborted: ApiError | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._released = False

    def start(self, abort: Abort) -> None:
        """On the event loop, as the generation starts: ``abort`` ends it with an error."""
        self._abort = abort
        if self._aborted is not None:
            abort(self._aborted)
            return
        timeout = self._admission.timeout_s
        if timeout is not None:
            remaining = max(0.0, self._admitted + timeout - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(
                remaining,
                self.abort,
                Unavailable(
                    f"The request did not finish within the server's {timeout:g} s limit.",
                    code="timeout",
                ),
            )

    def abort(self, error: ApiError) -> None:
        """On the event loop: end the generation with ``error`` (once it starts, if queued)."""
        if self._released or self._aborted is not None:
            return
        self._aborted = error
        if self._abort is not None:
            self._abort(error)

    def release(self) -> None:
        """The generation ended: give the place back (idempotent)."""
        if self._released:
            return
        self._released = True
        if self._timer is not None:
            self._timer.cancel()
        self._admission._release(self)
