"""Slots: which slot a generation takes, and what of the slot's cells its prompt keeps.

``parallel`` slots are sequence ids ``0..parallel-1`` of one context. A slot keeps the KV
cells of its last generation after it ends (a prefix cache, counted in its own share of the
pool); a new generation goes to the free slot whose cells share the longest prefix with its
prompt, so a multi-turn chat decodes only its newest turn. With ``--cache-reuse`` a slot's
later runs of cells are moved into place too (``app.engine.chunk_reuse``). A match shorter
than ``SLOT_PROMPT_SIMILARITY`` of the prompt (a chat template's common opening) does not
count: the least recently used slot is taken instead, an empty one first, as llama-server
does; the lowest-numbered empty slot keeps a split KV cache's runs of consecutive sequence
ids few (why: docs/performance.md, "Many streams"). A cancelled generation's slot keeps what
it had decoded, so a retried prompt resumes its prefill.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import llama_cpp

from app.engine.batched.queue import Generation
from app.engine.batched.slot_state import consult_prompt_cache, restore_slot, save_slot
from app.engine.chunk_reuse import ReusePlan, plan_reuse
from app.engine.prompt_cache import PromptCache, common_prefix

SLOT_PROMPT_SIMILARITY = 0.1
"""Share of a prompt a slot's cached prefix must cover to be chosen for reuse (as
``llama-server``'s ``--slot-prompt-similarity``)."""


@dataclass(eq=False)
class Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)
    """What the KV cache holds for ``seq_id``, position by position."""
    generation: Generation | None = None
    last_used: int = 0
    prompt_len: int = 0
    """Length of the prompt of the generation that last ran here."""

    @property
    def held_prompt(self) -> int:
        """How much of that prompt the slot's cells still hold (less after a cancelled
        prefill): a new prompt that holds all of it continues that conversation; one that
        leaves the slot before it is another."""
        return min(self.prompt_len, len(self.tokens))


def default_parallel(n_gpu_layers: int) -> int:
    """Slots for ``--parallel 0``: 4 when layers run on a GPU, where a step of several
    sequences costs about as much as a step of one; 1 on a CPU build."""
    if llama_cpp.llama_supports_gpu_offload() and n_gpu_layers != 0:
        return 4
    return 1


def choose_slot(free: Sequence[Slot], prompt: Sequence[int], *, min_chunk: int = 0) -> Slot:
    """The free slot whose cells share the longest prefix with ``prompt``, if that covers
    more than ``SLOT_PROMPT_SIMILARITY`` of it; else (with chunk reuse) the one whose cells
    the prompt can keep the most of, moved; else the least recently used (an empty one
    first), so that a chat template's common opening does not evict another conversation."""
    enough = SLOT_PROMPT_SIMILARITY * len(prompt)
    best = max(free, key=lambda s: (common_prefix(s.tokens, prompt), -s.last_used))
    if common_prefix(best.tokens, prompt) > enough:
        return best
    if min_chunk > 0:
        kept = {slot.seq_id: reuse_plan(slot, prompt, min_chunk).kept for slot in free}
        best = max(free, key=lambda s: (kept[s.seq_id], -s.last_used))
        if kept[best.seq_id] > enough:
            return best
    return min(free, key=lambda s: s.last_used)


def reuse_plan(slot: Slot, prompt: Sequence[int], min_chunk: int) -> ReusePlan:
    """What of the slot's cells ``prompt`` keeps: the common prefix, and (``min_chunk`` > 0)
    the runs chunk reuse moves (``app.engine.chunk_reuse``)."""
    prefix = common_prefix(slot.tokens, prompt)
    return plan_reuse(slot.tokens, prompt, prefix=prefix, min_chunk=min_chunk)


class Slots:
    """The context's slots, as the scheduler thread places generations into them and takes
    them out."""

    def __init__(
        self,
        ctx: Any,
        memory: Any,
        parallel: int,
        *,
        cache_reuse: int,
        prompt_cache: PromptCache | None,
    ) -> None:
        self.ctx = ctx
        self.memory = memory
        self.all = [Slot(seq_id) for seq_id in range(parallel)]
        self.cache_reuse = cache_reuse
        self.prompt_cache = prompt_cache
        self._uses = count(1)

    def running(self) -> list[Slot]:
        """The slots holding a generation (decoding, prefilling, or parked)."""
        return [slot for slot in self.all if slot.generation is not None]

    def any_running(self) -> bool:
        return any(slot.generation is not None for slot in self.all)

    def drop_cancelled(self) -> None:
        for slot in self.all:
            if slot.generation is not None and slot.generation.cancelled:
                self.release(slot)

    def place(self, waiting: deque[Generation]) -> list[Slot]:
        """Under the queue's lock: give free slots to waiting generations, in arrival order."""
        placed = []
        while waiting:
            generation = waiting[0]
            if generation.cancelled:
                waiting.popleft()
                continue
            free = [slot for slot in self.all if slot.generation is None]
            if not free:
                break
            waiting.popleft()
            generation.leader = self._prefilling_alike(generation)
            if generation.leader is not None:  # its cells will be the leader's: the emptiest slot
                slot = min(free, key=lambda s: s.last_used)
            else:
                slot = choose_slot(free, generation.prompt, min_chunk=self.cache_reuse)
                generation.plan = reuse_plan(slot, generation.prompt, self.cache_reuse)
                if self.prompt_cache is not None:
                    slot = consult_prompt_cache(
                        self.prompt_cache, generation, slot, free, SLOT_PROMPT_SIMILARITY
                    )
            slot.generation = generation
            placed.append(slot)
        return placed

    def _prefilling_alike(self, generation: Generation) -> Generation | None:
        """A placed generation still prefilling the very same prompt, if there is one."""
        prompt = generation.prompt
        for slot in self.all:
            other = slot.generation
            if (
                other is not None
                and other.leader is None
                and other.next_token is None
                and other.sampled == 0
                and not other.cancelled
                and len(other.prompt) == len(prompt)
                and other.prompt == prompt
            ):
                return other
        return None

    def start(self, slot: Slot) -> None:
        """Keep the slot's cells that match the prompt and drop the rest (saving or restoring
        a conversation through the prompt cache first)."""
        generation = slot.generation
        assert generation is not None
        generation.started = time.perf_counter()
        cache = self.prompt_cache
        prompt = generation.prompt
        restore, generation.restore = generation.restore, None
        plan, generation.plan = generation.plan, None
        if plan is None:  # a follower's slot, or one a restore goes to
            plan = reuse_plan(slot, prompt, self.cache_reuse)
        displaced = _displaces(slot, plan, revision=generation.sampling.revision)
        if cache is not None and (restore is not None or displaced):
            save_slot(self.ctx, slot, cache)  # the cells of the conversation this one displaces
        if generation.leader is not None:
            plan = ReusePlan(0)  # the leader's cells replace these once its prompt is decoded
        elif cache is not None and restore is not None:
            restore_slot(self.ctx, self.memory, slot, cache, *restore)
            plan = reuse_plan(slot, prompt, self.cache_reuse)
        reuse = self._keep(slot, plan)
        if reuse == len(prompt):
            reuse -= 1  # the last prompt token is decoded again: its logits are the first sample
        if not llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, reuse, -1):
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
            reuse = 0
        del slot.tokens[reuse:]
        slot.last_used = next(self._uses)
        slot.prompt_len = len(generation.prompt)
        generation.cached = reuse

    def _keep(self, slot: Slot, plan: ReusePlan) -> int:
        """Make the plan's moves in the slot's cells and tokens; the tokens now kept."""
        seq_id = slot.seq_id
        for move in plan.moves:
            end = move.cache_at + move.length
            llama_cpp.llama_memory_seq_rm(self.memory, seq_id, move.prompt_at, move.cache_at)
            llama_cpp.llama_memory_seq_add(
                self.memory, seq_id, move.cache_at, end, move.prompt_at - move.cache_at
            )
            slot.tokens[move.prompt_at : move.prompt_at + move.length] = slot.tokens[
                move.cache_at : end
            ]
        return plan.kept

    def clear(self, slot: Slot) -> None:
        """Empty the slot's cells."""
        llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
        slot.tokens.clear()

    def release(self, slot: Slot) -> None:
        """The generation leaves its slot, which keeps its cells as a prefix cache; its
        samplers are freed and its followers prefill for themselves."""
        generation = slot.generation
        assert generation is not None
        slot.generation = None
        for sampler in (generation.sampler, generation.grammar):
            if sampler is not None:
                llama_cpp.llama_sampler_free(sampler)
        generation.sampler = generation.grammar = None
        for other in self.all:
            if other.generation is not None and other.generation.leader is generation:
                other.generation.leader = None


def _displaces(slot: Slot, plan: ReusePlan, *, revision: bool) -> bool:
    """The new prompt leaves the slot's conversation before its end, so that conversation is
    gone once the prompt is decoded. A prompt that keeps half of it or more and either moves
    chunks (a chat whose oldest turns were dropped) or revises a document (an editor's next
    keystroke: the suffix after the cursor changed) is the same work going on: saving the old
    cells would copy the whole state per request for a version never asked for again."""
    if plan.kept >= slot.held_prompt:
        return False
    if plan.kept < slot.held_prompt // 2:
        return True
    return not (plan.moves or revision)
