"""A step's sampling: one token for every row of the batch that produced logits.

Each generation samples with its own chain and grammar (``app.engine.sampling``, shared with
the one-slot engine); plain greedy needs no sampler, its token is one numpy argmax over the
whole step's logits (why: docs/performance.md, "Many streams"). A thinking budget's forced
token (``app.engine.thinking_limit``) is taken instead of a sampled one and accepted by the
samplers. Generations waiting for a leader with the same prompt copy its cells and sample
their first token from its logits: one prefill for all (llama-server's ``n_cmpl``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt

from app.engine.batched.queue import Generation, Updates
from app.engine.batched.slots import Slot, Slots
from app.engine.handoff import Ended, Sampled
from app.engine.llama_setup import finish_of, logits_row, logprobs_of
from app.engine.protocol import EngineError
from app.engine.sampling import ConstrainedSampler, new_samplers
from app.engine.thinking_limit import budget_tracker

Row = tuple[int, int, Slot]
"""A batch row with logits: its index in the batch, its index among the step's outputs, and
the slot it samples for."""


class BatchSampling:
    """The scheduler thread's sampling over one context's logits."""

    def __init__(
        self,
        ctx: Any,
        vocab: Any,
        n_vocab: int,
        slots: Slots,
        token_bytes: Callable[[int], bytes],
    ) -> None:
        self._ctx = ctx
        self._vocab = vocab
        self._n_vocab = n_vocab
        self._slots = slots
        self._token_bytes = token_bytes
        self.constrained = ConstrainedSampler(n_vocab)

    def start(self, generation: Generation) -> None:
        """Build the generation's samplers (a grammar llama.cpp cannot parse: EngineError)."""
        # Plain greedy needs no sampler: its token is an argmax over the step's logits.
        if not generation.sampling.argmax:
            generation.sampler, generation.grammar = new_samplers(
                self._vocab, self._n_vocab, generation.sampling
            )
        generation.budget = budget_tracker(generation.sampling.thinking_budget, self._token_bytes)

    def sample(self, outputs: list[tuple[int, Slot]]) -> Updates:
        """A token for every output row of the decoded batch, and for its leaders' followers."""
        rows = [(index, row, slot) for row, (index, slot) in enumerate(outputs)]
        rows += self._copy_to_followers(rows)
        greedy = self._greedy_tokens(rows, len(outputs))
        updates: Updates = []
        for index, row, slot in rows:
            updates += self._sample(slot, index, None if greedy is None else int(greedy[row]))
        return updates

    def _copy_to_followers(self, rows: list[Row]) -> list[Row]:
        """Generations waiting for a leader whose prompt this step finished get its cells
        (``llama_memory_seq_cp``; across KV streams llama.cpp copies the buffer) and sample
        from its logits row."""
        memory = self._slots.memory
        copied: list[Row] = []
        for index, row, slot in rows:
            leader = slot.generation
            if leader is None or leader.next_token is not None or leader.sampled:
                continue
            for other in self._slots.all:
                follower = other.generation
                if follower is None or follower.leader is not leader:
                    continue
                llama_cpp.llama_memory_seq_rm(memory, other.seq_id, -1, -1)
                llama_cpp.llama_memory_seq_cp(memory, slot.seq_id, other.seq_id, -1, -1)
                other.tokens[:] = slot.tokens
                follower.leader = None
                follower.cached = len(follower.prompt)  # none of it decoded for this one
                copied.append((index, row, other))
        return copied

    def _greedy_tokens(self, rows: list[Row], n_rows: int) -> npt.NDArray[np.intp] | None:
        """The most likely token of every output row, in one numpy pass over the step's
        logits, when any generation samples plain greedy (else None)."""
        if not any(
            slot.generation is not None and slot.generation.sampler is None for _, _, slot in rows
        ):
            return None
        logits = llama_cpp.llama_get_logits(self._ctx)
        scores = np.ctypeslib.as_array(logits, shape=(n_rows, self._n_vocab))
        best: npt.NDArray[np.intp] = np.argmax(scores, axis=1)
        return best

    def _sample(self, slot: Slot, index: int, most_likely: int | None) -> Updates:
        """Sample the generation's token from batch row ``index`` (``most_likely``: the row's
        argmax, which a generation without a sampler takes)."""
        generation = slot.generation
        assert generation is not None
        generation.next_token = None
        if generation.max_tokens == 0:  # a cache warm-up: the prompt is decoded, nothing sampled
            self._slots.release(slot)
            return [(generation, Ended("length"))]
        budget = generation.budget
        forced = budget.forced() if budget is not None else None
        if forced is not None:
            token = forced  # the thinking budget is spent: the engine closes the block
            for sampler in (generation.grammar, generation.sampler):
                if sampler is not None:
                    llama_cpp.llama_sampler_accept(sampler, token)
        elif generation.sampler is None:
            assert most_likely is not None
            token = most_likely
        elif generation.grammar is not None:
            logits = logits_row(self._ctx, index, self._n_vocab)
            try:
                token = self.constrained.sample(generation.sampler, generation.grammar, logits)
            except EngineError as exc:  # this generation's grammar, not the step, failed
                self._slots.release(slot)
                return [(generation, Ended(None, exc))]
        else:
            token = int(llama_cpp.llama_sampler_sample(generation.sampler, self._ctx, index))
        if budget is not None:
            budget.observe(token)
        top = generation.sampling.top_logprobs
        logprobs = None
        if top is not None and generation.on_logprobs is not None:
            logprobs = logprobs_of(logits_row(self._ctx, index, self._n_vocab), token, top)
        generation.sampled += 1
        updates: Updates = [(generation, Sampled(token, logprobs))]
        end = finish_of(self._vocab, token, generation.sampled, generation.max_tokens)
        if end is None:
            generation.next_token = token
        else:
            updates.append((generation, Ended(end)))
            self._slots.release(slot)
        return updates
