"""The scheduler thread: it owns the ``llama_context`` and runs one step at a time, as
``llama-server``'s ``update_slots`` does.

A step drops the cancelled generations, places waiting ones into free slots, fills one
``llama_batch`` with the next token of every decoding generation and then prompt chunks (at
most ``n_batch`` tokens, so a long prompt is prefilled over several steps while the running
streams keep receiving a token per step), decodes it, samples, and posts the step's tokens to
their requesters' event loops: one ``Handoff.post`` (one wake-up) per loop per step
(``app.engine.handoff``). It decodes the next step while a loop delivers the last one, and
waits only for a loop more than a step behind. A parked generation (its consumer paused its
``Flow``) keeps its slot but is left out of the batch until it resumes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import llama_cpp

from app.engine.batched.queue import Updates, WorkQueue
from app.engine.batched.sampling import BatchSampling
from app.engine.batched.slots import Slot, Slots
from app.engine.handoff import Ended, Handoff, LoopClosed
from app.engine.protocol import EngineError

logger = logging.getLogger(__name__)

LOOP_LAG_S = 1.0
"""Longest the scheduler waits for a loop that is more than a step behind before it goes on."""


@dataclass(eq=False)
class Scheduler:
    """The step loop over one context's slots."""

    ctx: Any
    batch: Any
    n_batch: int
    queue: WorkQueue
    slots: Slots
    sampling: BatchSampling

    def serve(self) -> None:
        """Run steps until the backend closes or a step fails; then fail what is left."""
        try:
            while self.step():
                pass
        except Exception as exc:
            logger.exception("the batch scheduler failed")
            failure = EngineError("the inference engine failed")
            failure.__cause__ = exc
            self.queue.fail(failure)
        finally:
            error = self.queue.failure or EngineError("the backend is closed")
            ended: Updates = [(waiting, Ended(None, error)) for waiting in self.queue.drain()]
            for slot in self.slots.running():
                assert slot.generation is not None
                ended.append((slot.generation, Ended(None, error)))
                self.slots.release(slot)
            self._post(ended)

    def step(self) -> bool:
        """One step: drop, place, fill the batch, decode, sample, post. False once closing."""
        with self.queue.lock:
            if not self.queue.wait_for_work(self.slots.any_running):
                return False
            self.slots.drop_cancelled()
            placed = self.slots.place(self.queue.waiting)
        ended = self._start(placed)
        fed, outputs = self._fill_batch(self.slots.running())
        if not outputs and not any(fed.values()):
            self._post(ended)
            self.queue.wait_parked()
            return True
        status = llama_cpp.llama_decode(self.ctx, self.batch)
        if status != 0:
            self._post(ended + self._fail_batch(fed, status))
            return True
        for slot, tokens in fed.items():
            slot.tokens.extend(tokens)
        self._post(ended + self.sampling.sample(outputs))
        return True

    def _start(self, placed: list[Slot]) -> Updates:
        """Prepare the placed generations' slots and samplers; those that cannot start end."""
        ended: Updates = []
        for slot in placed:
            try:
                self.slots.start(slot)
                assert slot.generation is not None
                self.sampling.start(slot.generation)
            except EngineError as exc:
                assert slot.generation is not None
                ended.append((slot.generation, Ended(None, exc)))
                self.slots.release(slot)
        return ended

    def _fill_batch(
        self, running: list[Slot]
    ) -> tuple[dict[Slot, list[int]], list[tuple[int, Slot]]]:
        """The step's tokens: the next token of every decoding generation first, then prompt
        chunks in placement order, up to ``n_batch`` in all; written in sequence-id order
        (each sequence's tokens together), so that a split KV cache decodes one micro-batch
        per run of consecutive ids and no more."""
        fed: dict[Slot, list[int]] = {}
        budget = self.n_batch
        prefilling = []
        for slot in running:
            generation = slot.generation
            assert generation is not None
            if generation.next_token is None:
                if generation.leader is None:  # a follower waits for its leader's cells
                    prefilling.append(slot)
            elif not generation.parked:
                fed[slot] = [generation.next_token]
                budget -= 1
        prefilling.sort(key=lambda s: s.last_used)
        for slot in prefilling:
            if budget == 0:
                break
            assert slot.generation is not None
            start = len(slot.tokens)
            fed[slot] = slot.generation.prompt[start : start + budget]
            budget -= len(fed[slot])

        batch = self.batch
        outputs: list[tuple[int, Slot]] = []
        n = 0
        for slot in sorted(fed, key=lambda s: s.seq_id):
            generation = slot.generation
            assert generation is not None
            position = len(slot.tokens)
            prompt_end = len(generation.prompt) if generation.next_token is None else -1
            for token in fed[slot]:
                logits = generation.next_token is not None or position == prompt_end - 1
                batch.token[n] = token
                batch.pos[n] = position
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq_id
                batch.logits[n] = logits
                if logits:
                    outputs.append((n, slot))
                position += 1
                n += 1
        batch.n_tokens = n
        return fed, outputs

    def _post(self, updates: Updates) -> None:
        """Hand a step's updates to their loops: one post (one wake-up) per loop; then wait
        while a loop is more than this step behind."""
        by_handoff: dict[Handoff[Any], Updates] = {}
        for update in updates:
            handoff = update[0].handoff
            assert handoff is not None
            by_handoff.setdefault(handoff, []).append(update)
        for handoff, items in by_handoff.items():
            try:
                handoff.post(items)
            except LoopClosed:
                for generation, _ in items:
                    generation.cancelled = True  # its consumer's loop is gone
                continue
            handoff.wait_for_room(len(items), LOOP_LAG_S)

    def _fail_batch(self, fed: dict[Slot, list[int]], status: int) -> Updates:
        """A failed decode fails the generations it carried; their slots start over empty."""
        logger.error("llama_decode failed with status %d for %d sequences", status, len(fed))
        error = EngineError(f"the inference engine failed (llama_decode status {status})")
        ended: Updates = []
        for slot in fed:
            self.slots.clear(slot)
            if slot.generation is not None:
                ended.append((slot.generation, Ended(None, error)))
                self.slots.release(slot)
        return ended
