"""What the scheduler works on: a ``Generation`` from its arrival to its end, and the
``WorkQueue`` of those waiting for a slot, with the condition the scheduler thread sleeps on
(``llama-server``'s task queue)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.engine.chunk_reuse import ReusePlan
from app.engine.handoff import Handoff, Requester, Update
from app.engine.prompt_cache import SavedPrompt
from app.engine.protocol import EngineError, SamplingParams
from app.engine.thinking_limit import BudgetTracker

PARKED_POLL_S = 0.02
"""Longest the scheduler sleeps while every running generation is parked before it looks
again (a resumed consumer or new work wakes it sooner)."""


@dataclass(eq=False)
class Generation(Requester):
    """One generation in the scheduler, from its arrival to its end."""

    prompt: list[int] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 0
    handoff: Handoff[tuple[Generation, Update]] | None = None
    # Scheduler thread only.
    sampler: Any = None
    grammar: Any = None
    """The request's grammar sampler, beside ``sampler`` (sample, then check)."""
    next_token: int | None = None
    """Sampled and handed off, not yet decoded (its KV cell is written next step)."""
    sampled: int = 0
    budget: BudgetTracker | None = None
    restore: tuple[SavedPrompt, int] | None = None
    """A saved state to copy into the slot before its prefill (and how much of it matches)."""
    plan: ReusePlan | None = None
    """What of its slot's cells the prompt keeps, worked out once when the slot was chosen."""
    leader: Generation | None = None
    """A generation with the same prompt placed before this one (``n_cmpl``, or two clients
    asking alike) whose prefill this one waits for, then copies, instead of decoding its own."""

    @property
    def parked(self) -> bool:
        return self.flow is not None and self.flow.paused


Updates = list[tuple[Generation, Update]]
"""What a step hands to the requesters' loops: each update with the generation it is for."""


def deliver(updates: Updates) -> None:
    """On the requester's loop: each update to its generation."""
    for generation, update in updates:
        generation.deliver(update)


class WorkQueue:
    """Generations waiting for a slot, in arrival order, and the condition the scheduler
    sleeps on; shared by the requesters' event loops and the scheduler thread."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.waiting: deque[Generation] = deque()
        self.closing = False
        self.failure: EngineError | None = None

    def __len__(self) -> int:
        with self.lock:
            return len(self.waiting)

    def submit(self, generation: Generation) -> None:
        with self.lock:
            if self.failure is not None:
                raise self.failure
            if self.closing:
                raise EngineError("the backend is closed")
            self.waiting.append(generation)
            self.lock.notify()

    def wake(self) -> None:
        with self.lock:
            self.lock.notify()

    def close(self) -> bool:
        """Tell the scheduler to stop; False when it was told already."""
        with self.lock:
            if self.closing:
                return False
            self.closing = True
            self.lock.notify_all()
        return True

    def wait_for_work(self, running: Callable[[], bool]) -> bool:
        """Under ``lock``: sleep until a generation waits or one is ``running()``; False once
        the backend closes."""
        while not self.closing and not self.waiting and not running():
            self.lock.wait()
        return not self.closing

    def wait_parked(self) -> None:
        """Every running generation is parked: wait for a consumer to resume."""
        with self.lock:
            if not self.closing:
                self.lock.wait(PARKED_POLL_S)

    def fail(self, failure: EngineError) -> None:
        with self.lock:
            self.failure = failure

    def drain(self) -> list[Generation]:
        """Take every waiting generation out of the queue."""
        with self.lock:
            waiting = list(self.waiting)
            self.waiting.clear()
        return waiting
