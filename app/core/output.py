"""A generation's output on its way to the response: a bounded queue on the event loop.

``on_token`` (run by the engine on the event loop) puts the deltas it decoded; the response
takes them. Both ends live on the loop, so there is no lock and no thread. The bound is kept
by backpressure rather than by blocking: once ``capacity`` items wait unread (a client that
reads slowly), the generation's ``Flow`` is paused and the engine decodes it no further; it
resumes once the reader has taken what waits (it takes everything waiting at once, so a
reader just at the engine's pace does not pause and resume it every token).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

from app.engine import Flow

Item = TypeVar("Item")


@dataclass(frozen=True)
class Failed:
    """The generation ended with this error instead of a finish."""

    error: BaseException


class Output(Generic[Item]):
    def __init__(self, capacity: int, flow: Flow) -> None:
        self._capacity = capacity
        self._flow = flow
        self._items: deque[Item | Failed] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        """The consumer left, or the generation was failed: it should stop at its next token."""

    def put(self, item: Item | Failed) -> None:
        self._items.append(item)
        if len(self._items) >= self._capacity:
            self._flow.pause()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, error: BaseException) -> None:
        """End the output with ``error``; whatever the engine sends later is not wanted."""
        self.closed = True
        self.put(Failed(error))

    def close(self) -> None:
        self.closed = True
        self._flow.resume()  # a paused engine must see that nobody waits for it any more

    async def get(self) -> list[Item | Failed]:
        """Every item waiting, in order (at least one: it waits for the first). A response
        that falls behind takes several at once and writes them in one send, each still its
        own event."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items = list(self._items)
        self._items.clear()
        self._flow.resume()  # nothing waits unread any more
        return items
