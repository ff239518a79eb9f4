"""Continuous batching: many generations decoded together in one llama.cpp context.

One scheduler thread owns the ``llama_context`` and runs a loop of *steps*. Each step drops
the sequences whose generation was cancelled, places waiting generations into free slots,
then decodes one ``llama_batch`` holding the next token of every running sequence plus prompt
chunks of newly placed ones (at most ``n_batch`` tokens in all, so a long prompt is prefilled
over several steps while the running streams keep receiving a token per step), and samples
one token for every sequence that produced logits. This is ``llama-server``'s design (slots,
``update_slots``), written against llama-cpp-python's low-level API.

Hand-off. The tokens a step sampled go to their requesters' event loop together: one
``Handoff.post`` per loop per step, one wake-up of the loop, where each stream's ``on_token``
runs (``app.engine.handoff``). No thread per request: the scheduler and the event loop are the
only two threads with Python work per token. The scheduler decodes the next step while the
loop delivers the last one, and waits only when the loop falls more than a step behind. (What
was measured against llama-server, and the designs measured and set aside:
docs/performance.md, "Many streams".)

Slots and KV layout. ``parallel`` slots map to sequence ids ``0..parallel-1`` of one context
of ``parallel * n_ctx`` cells; ``info.n_ctx`` is ``n_ctx``, the context one generation may use
(prompt plus completion), exactly as on the one-slot backend. By default every sequence has
its own KV stream of ``n_ctx`` cells (``kv_unified=False``, llama-server's ``-np N``): a
sequence's attention spans only its own cells. The unified layout (``--kv-unified``: one
buffer for all) makes every sequence's attention span every cell in use, idle slots' cached
prefixes included; measured on the tiny model, 64 streams decode a step in 3.5 ms split and
11.5 ms unified, and 16 streams beside 48 idle 500-token caches in 3.5 ms against 8.8 ms. The
price of the split layout: llama.cpp decodes a batch in one micro-batch per run of
*consecutive* sequence ids (``split_equal``, sequential), so the scheduler keeps those runs
few: a step's tokens go into the batch in sequence-id order (a batch in another order is one
micro-batch per sequence), and a new generation with no cached prefix to reuse takes the
lowest-numbered empty slot. Each further run costs about 0.1 ms on the tiny model (16
streams in 16 runs: 2.3 ms against 0.8 ms in one). No slot can hold more than its own
``n_ctx`` cells, so the pool never runs out.

Prefix reuse. A slot keeps the KV cells of its last generation after it ends (they stay
counted in its share of the pool, so they never crowd out a running one); a new generation
goes to the free slot whose cells share the longest prefix with its prompt, and only the rest
of the prompt is decoded: a multi-turn chat re-decodes its newest turn. A match shorter than
``SLOT_PROMPT_SIMILARITY`` of the prompt (a chat template's common opening) does not count;
the least recently used slot is taken instead, as ``llama-server`` does. Cells past the shared
prefix are removed (``llama_memory_seq_rm``) when the slot is reused; a cancelled generation's
slot keeps what it had decoded, so a retried prompt resumes its prefill.

Host-RAM prompt cache (``--cache-ram``, ``app.engine.prompt_cache``). When a new conversation
takes a slot that holds another one's cells, the slot's KV state is first copied to host
memory (``llama_state_seq_get_data``) with the exact tokens it holds; when no free slot holds a
good prefix of a prompt and a saved state holds a longer one, the state is copied into the least
recently used free slot (``llama_state_seq_set_data``) and only the rest of the prompt is
decoded. The restored cells are kept only up to the first token where the saved list and the
prompt differ, as for a slot's own cells, and a restore whose cells are not exactly positions
``0..n-1`` of the slot is thrown away: the saved tokens and the cells cannot disagree. Both
copies run on the scheduler thread between steps (a copy of host memory, against a prefill of
the same tokens).

Thinking budget (``app.engine.thinking_limit``): a generation with one has a ``BudgetTracker``; a
token it forces is taken instead of a sampled one and accepted by the sampler chain.

Sampling mirrors ``Llama._init_sampler``: per generation a ``llama_sampler`` chain of the
request's logit biases, penalties, then greedy or top-k/top-p/min-p/temperature/``dist(seed)``;
each chain has its own random state, so one request's seed decides only its own tokens. A
grammar is kept beside the chain, not in it: the chain samples, the grammar checks that one
token, and only a token it refuses costs a pass of the grammar over the whole vocabulary
(``app.engine.sampling``, as llama-server samples).

Backpressure and cancellation. A consumer that falls behind pauses its ``Flow``; the scheduler
then leaves that sequence out of the batch (it stays in its slot, parked) until the consumer
resumes it, and the other streams go on at full speed. ``on_token`` returning False, or the
awaiting task being cancelled (a client that left while its request was queued, prefilling or
decoding), marks the sequence; the scheduler drops it at the start of its next step.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt

from app.engine import prompt_store
from app.engine.chunk_reuse import ReusePlan, plan_reuse
from app.engine.grammar import check_grammar
from app.engine.handoff import Ended, Handoff, LoopClosed, Requester, Sampled, Update
from app.engine.host_memory import auto_prompt_cache_mib, available_bytes
from app.engine.llama_setup import EngineConfig, load_model, logprobs_of, model_info
from app.engine.prompt_cache import PromptCache, SavedPrompt, StateBuffer, common_prefix
from app.engine.protocol import (
    EngineError,
    EngineFinish,
    Flow,
    GenerationResult,
    ModelInfo,
    OnLogprobs,
    OnToken,
    PromptCacheStats,
    SamplingParams,
    Tokenizer,
)
from app.engine.sampling import ConstrainedSampler, new_samplers
from app.engine.thinking_limit import BudgetTracker
from app.engine.tokenizer import LlamaTokenizer

logger = logging.getLogger(__name__)

SLOT_PROMPT_SIMILARITY = 0.1
"""Share of a prompt a slot's cached prefix must cover to be chosen for reuse (as
``llama-server``'s ``--slot-prompt-similarity``)."""

POLL_S = 0.02
"""Longest an idle scheduler sleeps before it looks again (it is woken for new work)."""

LOOP_LAG_S = 1.0
"""Longest the scheduler waits for a loop that is more than a step behind before it goes on."""


@dataclass(eq=False)
class _Sequence(Requester):
    """One generation in the scheduler, from its arrival to its end."""

    prompt: list[int] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 0
    handoff: Handoff[tuple[_Sequence, Update]] | None = None
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
    leader: _Sequence | None = None
    """A generation with the same prompt placed before this one (``n_cmpl``, or two clients
    asking alike) whose prefill this one waits for, then copies, instead of decoding its own."""

    @property
    def parked(self) -> bool:
        return self.flow is not None and self.flow.paused


def _deliver(updates: list[tuple[_Sequence, Update]]) -> None:
    for sequence, update in updates:
        sequence.deliver(update)


@dataclass(eq=False)
class _Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)
    """What the KV cache holds for ``seq_id``, position by position."""
    sequence: _Sequence | None = None
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


def choose_slot(free: Sequence[_Slot], prompt: Sequence[int], *, min_chunk: int = 0) -> _Slot:
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


def reuse_plan(slot: _Slot, prompt: Sequence[int], min_chunk: int) -> ReusePlan:
    """What of the slot's cells ``prompt`` keeps: the common prefix, and (``min_chunk`` > 0)
    the runs chunk reuse moves (``app.engine.chunk_reuse``)."""
    prefix = common_prefix(slot.tokens, prompt)
    return plan_reuse(slot.tokens, prompt, prefix=prefix, min_chunk=min_chunk)


class BatchedLlamaBackend:
    """``parallel`` slots of one llama.cpp context, decoded together by a scheduler thread."""

    info: ModelInfo
    tokenizer: Tokenizer
    max_concurrency: int

    def __init__(self, config: EngineConfig, *, parallel: int) -> None:
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        self._model, self.placement = load_model(config)
        self._vocab = self._model.vocab
        per_slot = config.n_ctx or int(self._model.n_ctx_train())
        # Every running sequence needs one token of the batch each step.
        self._n_batch = max(config.n_batch, parallel)
        params = config.context_params(
            n_ctx=per_slot * parallel, n_batch=self._n_batch, n_seq_max=parallel
        )
        self._ctx = llama_cpp.llama_init_from_model(self._model.model, params)
        if not self._ctx:
            self._model.close()
            raise RuntimeError(f"could not create a llama.cpp context for {config.model_path}")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._cache_reuse = config.cache_reuse
        if self._cache_reuse and not llama_cpp.llama_memory_can_shift(self._memory):
            logger.warning("--cache-reuse is off: this model's KV cache cannot shift positions")
            self._cache_reuse = 0
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self.info = model_info(self._model, config, n_ctx=per_slot)
        self._n_vocab = self.info.n_vocab
        self._constrained = ConstrainedSampler(self._n_vocab)
        self.tokenizer = LlamaTokenizer(self._model)
        self.max_concurrency = parallel
        mib = config.prompt_cache_mib
        if mib is None:
            offloaded = self.info.gpu_offload and not config.tensor_overrides
            weights = 0 if offloaded else config.model_path.stat().st_size
            mib = auto_prompt_cache_mib(weights, available_bytes())
        self._prompt_cache = (
            PromptCache(None if mib < 0 else mib * 1024 * 1024) if mib != 0 else None
        )
        self._store: tuple[Path, dict[str, Any]] | None = None
        if self._prompt_cache is not None and config.prompt_cache_dir is not None:
            who = prompt_store.identity(
                config.model_path,
                llama_cpp_python=llama_cpp.__version__,
                cache_type_k=config.cache_type_k,
                cache_type_v=config.cache_type_v,
                flash_attn=config.flash_attn,
                kv_unified=config.kv_unified,
            )
            self._store = (config.prompt_cache_dir, who)
            if config.prompt_cache_dir.is_dir():
                prompt_store.read(config.prompt_cache_dir, who, self._prompt_cache)

        self._slots = [_Slot(seq_id) for seq_id in range(parallel)]
        self._uses = count(1)
        self._work = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._handoffs: dict[asyncio.AbstractEventLoop, Handoff[Any]] = {}
        self._closing = False
        self._failure: EngineError | None = None
        self._scheduler = threading.Thread(target=self._serve, name="batch-scheduler", daemon=True)
        self._scheduler.start()
        logger.info(
            "loaded %s (%s, %d slots x n_ctx=%d, %s KV of %d cells (K %s, V %s), "
            "n_batch=%d, vocab=%d, prompt cache %s, gpu_offload=%s)",
            config.model_path.name,
            self.info.architecture,
            parallel,
            per_slot,
            "unified" if config.kv_unified else "per-slot",
            int(llama_cpp.llama_n_ctx(self._ctx)),
            config.cache_type_k,
            config.cache_type_v,
            self._n_batch,
            self._n_vocab,
            "off" if mib == 0 else ("unlimited" if mib < 0 else f"{mib} MiB"),
            self.info.gpu_offload,
        )

    @property
    def running(self) -> int:
        """Generations holding a slot now (decoding, prefilling, or parked)."""
        return sum(slot.sequence is not None for slot in self._slots)

    @property
    def queued(self) -> int:
        """Generations waiting for a slot."""
        with self._work:
            return len(self._waiting)

    def kv_cache_usage(self) -> float:
        """Share of the KV pool's cells that hold tokens: running generations' and the prefix
        caches that idle slots keep."""
        held = sum(len(slot.tokens) for slot in self._slots)
        return held / (self.info.n_ctx * self.max_concurrency)

    def prompt_cache_stats(self) -> PromptCacheStats | None:
        cache = self._prompt_cache
        return cache.stats() if cache is not None else None

    def check_grammar(self, grammar: str) -> None:
        check_grammar(self._vocab, grammar)

    # -- the requester's side (its event loop) ------------------------------------------

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
        if not prompt_tokens:
            raise ValueError("the prompt is empty")
        if len(prompt_tokens) + max_tokens > self.info.n_ctx:
            raise ValueError(f"prompt plus max_tokens exceed the slot context {self.info.n_ctx}")
        loop = asyncio.get_running_loop()
        sequence = _Sequence(
            prompt_tokens=len(prompt_tokens),
            on_token=on_token,
            on_logprobs=on_logprobs if sampling.top_logprobs is not None else None,
            flow=flow,
            result=loop.create_future(),
            prompt=list(prompt_tokens),
            sampling=sampling,
            max_tokens=max_tokens,
            handoff=self._handoff(loop),
        )
        if flow is not None:
            flow.on_resume(self._wake)
        with self._work:
            if self._failure is not None:
                raise self._failure
            if self._closing:
                raise EngineError("the backend is closed")
            self._waiting.append(sequence)
            self._work.notify()
        try:
            result = await sequence.result
        except asyncio.CancelledError:
            sequence.cancelled = True  # the scheduler drops it at its next step
            self._wake()
            raise
        if sequence.cancelled:  # on_token said False: free the slot now, not after a poll
            self._wake()
        return result

    def _handoff(self, loop: asyncio.AbstractEventLoop) -> Handoff[Any]:
        handoff = self._handoffs.get(loop)
        if handoff is None or handoff.closed:
            handoff = self._handoffs[loop] = Handoff(loop, _deliver)
        return handoff

    def _wake(self) -> None:
        with self._work:
            self._work.notify()

    # -- the scheduler thread ------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while self._step():
                pass
        except Exception as exc:
            logger.exception("the batch scheduler failed")
            failure = EngineError("the inference engine failed")
            failure.__cause__ = exc
            with self._work:
                self._failure = failure
        finally:
            error = self._failure or EngineError("the backend is closed")
            with self._work:
                waiting = list(self._waiting)
                self._waiting.clear()
            ended: list[tuple[_Sequence, Update]] = [
                (sequence, Ended(None, error)) for sequence in waiting
            ]
            for slot in self._slots:
                if slot.sequence is not None:
                    ended.append((slot.sequence, Ended(None, error)))
                    self._release(slot)
            self._post(ended)

    def _step(self) -> bool:
        """One scheduling step; False once the backend closes."""
        ended: list[tuple[_Sequence, Update]] = []
        with self._work:
            while not self._closing and not self._waiting and not self._has_running():
                self._work.wait()
            if self._closing:
                return False
            for slot in self._slots:
                if slot.sequence is not None and slot.sequence.cancelled:
                    self._release(slot)
            placed = self._place_waiting()
        for slot in placed:
            try:
                self._start(slot)
            except EngineError as exc:
                assert slot.sequence is not None
                ended.append((slot.sequence, Ended(None, exc)))
                self._release(slot)
        running = [s for s in self._slots if s.sequence is not None]
        fed, outputs = self._fill_batch(running)
        if not outputs and not any(fed.values()):
            self._post(ended)
            with self._work:  # every sequence is parked: wait for a consumer to resume
                if not self._closing:
                    self._work.wait(POLL_S)
            return True
        status = llama_cpp.llama_decode(self._ctx, self._batch)
        if status != 0:
            ended += self._fail_batch(fed, status)
            self._post(ended)
            return True
        for slot, tokens in fed.items():
            slot.tokens.extend(tokens)
        updates = ended
        rows = [(index, row, slot) for row, (index, slot) in enumerate(outputs)]
        rows += self._copy_to_followers(rows)
        greedy = self._greedy_tokens(rows, len(outputs))
        for index, row, slot in rows:
            updates += self._sample(slot, index, None if greedy is None else int(greedy[row]))
        self._post(updates)
        return True

    def _copy_to_followers(
        self, rows: list[tuple[int, int, _Slot]]
    ) -> list[tuple[int, int, _Slot]]:
        """Generations waiting for a leader whose prompt this step finished get its cells
        (``llama_memory_seq_cp``; across KV streams llama.cpp copies the buffer) and sample
        their first token from its logits: one prefill for all (llama-server's ``n_cmpl``)."""
        copied: list[tuple[int, int, _Slot]] = []
        for index, row, slot in rows:
            leader = slot.sequence
            if leader is None or leader.next_token is not None or leader.sampled:
                continue
            for other in self._slots:
                follower = other.sequence
                if follower is None or follower.leader is not leader:
                    continue
                llama_cpp.llama_memory_seq_rm(self._memory, other.seq_id, -1, -1)
                llama_cpp.llama_memory_seq_cp(self._memory, slot.seq_id, other.seq_id, -1, -1)
                other.tokens[:] = slot.tokens
                follower.leader = None
                follower.cached = len(follower.prompt)  # none of it decoded for this one
                copied.append((index, row, other))
        return copied

    def _greedy_tokens(
        self, rows: list[tuple[int, int, _Slot]], n_rows: int
    ) -> npt.NDArray[np.intp] | None:
        """The most likely token of every output row, in one numpy pass over the step's logits,
        when any sequence samples plain greedy (else None). llama.cpp's own greedy sampler
        builds a candidate array of the whole vocabulary per sequence: ~0.3 ms each for Qwen's
        151,936 tokens, 20 ms a step at 64 streams, against ~5 ms for one argmax over all."""
        if not any(
            slot.sequence is not None and slot.sequence.sampler is None for _, _, slot in rows
        ):
            return None
        logits = llama_cpp.llama_get_logits(self._ctx)
        scores = np.ctypeslib.as_array(logits, shape=(n_rows, self._n_vocab))
        best: npt.NDArray[np.intp] = np.argmax(scores, axis=1)
        return best

    def _has_running(self) -> bool:
        return any(slot.sequence is not None for slot in self._slots)

    def _place_waiting(self) -> list[_Slot]:
        """Under ``_work``: give free slots to waiting generations, in arrival order."""
        placed = []
        while self._waiting:
            sequence = self._waiting[0]
            if sequence.cancelled:
                self._waiting.popleft()
                continue
            free = [slot for slot in self._slots if slot.sequence is None]
            if not free:
                break
            self._waiting.popleft()
            sequence.leader = self._prefilling_alike(sequence)
            if sequence.leader is not None:  # its cells will be the leader's: the emptiest slot
                slot = min(free, key=lambda s: s.last_used)
            else:
                slot = choose_slot(free, sequence.prompt, min_chunk=self._cache_reuse)
                sequence.plan = reuse_plan(slot, sequence.prompt, self._cache_reuse)
                if self._prompt_cache is not None:
                    slot = self._consult_prompt_cache(sequence, slot, free)
            slot.sequence = sequence
            placed.append(slot)
        return placed

    def _prefilling_alike(self, sequence: _Sequence) -> _Sequence | None:
        """A placed generation still prefilling the very same prompt, if there is one."""
        prompt = sequence.prompt
        for slot in self._slots:
            other = slot.sequence
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

    def _consult_prompt_cache(self, sequence: _Sequence, slot: _Slot, free: list[_Slot]) -> _Slot:
        """The slot for ``sequence`` once the prompt cache is asked: the least recently used
        free one, marked for a restore, when a saved state holds more of the prompt than
        ``slot`` (the best free slot) does; else ``slot``."""
        cache = self._prompt_cache
        assert cache is not None
        prompt = sequence.prompt
        assert sequence.plan is not None
        held = sequence.plan.kept
        found = cache.find(prompt, better_than=held, min_share=SLOT_PROMPT_SIMILARITY)
        if found is None:
            if held <= SLOT_PROMPT_SIMILARITY * len(prompt):
                cache.missed()  # no slot and no saved state holds this conversation
            return slot
        cache.take(found[0])  # no other placement, and no save's eviction, can have it now
        sequence.restore = found
        sequence.plan = None  # it was for the slot not taken
        return min(free, key=lambda s: s.last_used)

    def _start(self, slot: _Slot) -> None:
        """Keep the slot's cells that match the prompt, drop the rest, build the sampler."""
        sequence = slot.sequence
        assert sequence is not None
        sequence.started = time.perf_counter()
        cache = self._prompt_cache
        prompt = sequence.prompt
        restore, sequence.restore = sequence.restore, None
        plan, sequence.plan = sequence.plan, None
        if plan is None:  # a follower's slot, or one a restore goes to
            plan = reuse_plan(slot, prompt, self._cache_reuse)
        displaced = self._displaces(slot, plan, revision=sequence.sampling.revision)
        if cache is not None and (restore is not None or displaced):
            self._save_slot(slot, cache)  # the cells of the conversation this one displaces
        if sequence.leader is not None:
            plan = ReusePlan(0)  # the leader's cells replace these once its prompt is decoded
        elif cache is not None and restore is not None:
            self._restore_slot(slot, cache, *restore)
            plan = reuse_plan(slot, prompt, self._cache_reuse)
        reuse = self._keep(slot, plan)
        if reuse == len(prompt):
            reuse -= 1  # the last prompt token is decoded again: its logits are the first sample
        if not llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, reuse, -1):
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            reuse = 0
        del slot.tokens[reuse:]
        slot.last_used = next(self._uses)
        slot.prompt_len = len(sequence.prompt)
        sequence.cached = reuse
        # Plain greedy needs no sampler: its token is an argmax over the step's logits.
        if not sequence.sampling.argmax:
            sequence.sampler, sequence.grammar = new_samplers(
                self._vocab, self._n_vocab, sequence.sampling
            )
        budget = sequence.sampling.thinking_budget
        if budget is not None:
            sequence.budget = BudgetTracker(budget, self.tokenizer.token_bytes)

    @staticmethod
    def _displaces(slot: _Slot, plan: ReusePlan, *, revision: bool) -> bool:
        """The new prompt leaves the slot's conversation before its end, so that conversation
        is gone once the prompt is decoded. A prompt that keeps half of it or more and either
        moves chunks (a chat whose oldest turns were dropped) or revises a document (an
        editor's next keystroke: the suffix after the cursor changed) is the same work going
        on: saving the old cells would copy the whole state per request for a version never
        asked for again."""
        if plan.kept >= slot.held_prompt:
            return False
        if plan.kept < slot.held_prompt // 2:
            return True
        return not (plan.moves or revision)

    def _keep(self, slot: _Slot, plan: ReusePlan) -> int:
        """Make the plan's moves in the slot's cells and tokens; the tokens now kept."""
        seq_id = slot.seq_id
        for move in plan.moves:
            end = move.cache_at + move.length
            llama_cpp.llama_memory_seq_rm(self._memory, seq_id, move.prompt_at, move.cache_at)
            llama_cpp.llama_memory_seq_add(
                self._memory, seq_id, move.cache_at, end, move.prompt_at - move.cache_at
            )
            slot.tokens[move.prompt_at : move.prompt_at + move.length] = slot.tokens[
                move.cache_at : end
            ]
        return plan.kept

    def _save_slot(self, slot: _Slot, cache: PromptCache) -> None:
        """Copy the slot's KV state, with the tokens it holds, into the prompt cache."""
        if not slot.tokens or cache.covers(slot.tokens):
            return
        size = int(llama_cpp.llama_state_seq_get_size(self._ctx, slot.seq_id))
        if not cache.fits(size):
            return
        state: StateBuffer = np.empty(size, dtype=np.uint8)
        pointer = state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        written = int(llama_cpp.llama_state_seq_get_data(self._ctx, pointer, size, slot.seq_id))
        if written != size:
            logger.warning(
                "prompt cache: slot %d state not saved (%d of %d bytes)", slot.seq_id, written, size
            )
            return
        cache.save(slot.tokens, state, slot.held_prompt)

    def _restore_slot(
        self, slot: _Slot, cache: PromptCache, entry: SavedPrompt, shared: int
    ) -> None:
        """Replace the slot's cells with ``entry``'s; on any mismatch the slot starts empty."""
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.tokens.clear()
        pointer = entry.state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        read = int(llama_cpp.llama_state_seq_set_data(self._ctx, pointer, entry.size, slot.seq_id))
        first = llama_cpp.llama_memory_seq_pos_min(self._memory, slot.seq_id)
        last = llama_cpp.llama_memory_seq_pos_max(self._memory, slot.seq_id)
        if read != entry.size or (first, last) != (0, len(entry.tokens) - 1):
            logger.error(
                "prompt cache: a saved state of %d tokens restored as positions %d..%d "
                "(%d of %d bytes read); not used",
                len(entry.tokens),
                first,
                last,
                read,
                entry.size,
            )
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            cache.missed()
            return
        slot.tokens.extend(entry.tokens.tolist())
        cache.hit(entry, shared)

    def _fill_batch(
        self, running: list[_Slot]
    ) -> tuple[dict[_Slot, list[int]], list[tuple[int, _Slot]]]:
        """The step's tokens: the next token of every decoding sequence first, then prompt
        chunks in placement order, up to ``n_batch`` in all; written in sequence-id order
        (each sequence's tokens together), so that a split KV cache decodes one micro-batch
        per run of consecutive ids and no more."""
        fed: dict[_Slot, list[int]] = {}
        budget = self._n_batch
        prefilling = []
        for slot in running:
            sequence = slot.sequence
            assert sequence is not None
            if sequence.next_token is None:
                if sequence.leader is None:  # a follower waits for its leader's cells
                    prefilling.append(slot)
            elif not sequence.parked:
                fed[slot] = [sequence.next_token]
                budget -= 1
        prefilling.sort(key=lambda s: s.last_used)
        for slot in prefilling:
            if budget == 0:
                break
            sequence = slot.sequence
            assert sequence is not None
            start = len(slot.tokens)
            fed[slot] = sequence.prompt[start : start + budget]
            budget -= len(fed[slot])

        batch = self._batch
        outputs: list[tuple[int, _Slot]] = []
        n = 0
        for slot in sorted(fed, key=lambda s: s.seq_id):
            sequence = slot.sequence
            assert sequence is not None
            position = len(slot.tokens)
            prompt_end = len(sequence.prompt) if sequence.next_token is None else -1
            for token in fed[slot]:
                logits = sequence.next_token is not None or position == prompt_end - 1
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

    def _sample(
        self, slot: _Slot, index: int, most_likely: int | None
    ) -> list[tuple[_Sequence, Update]]:
        """Sample the sequence's token from batch row ``index`` (``most_likely``: the row's
        argmax, which a sequence without a sampler takes)."""
        sequence = slot.sequence
        assert sequence is not None
        sequence.next_token = None
        if sequence.max_tokens == 0:  # a cache warm-up: the prompt is decoded, nothing sampled
            self._release(slot)
            return [(sequence, Ended("length"))]
        budget = sequence.budget
        forced = budget.forced() if budget is not None else None
        if forced is not None:
            token = forced  # the thinking budget is spent: the engine closes the block
            for sampler in (sequence.grammar, sequence.sampler):
                if sampler is not None:
                    llama_cpp.llama_sampler_accept(sampler, token)
        elif sequence.sampler is None:
            assert most_likely is not None
            token = most_likely
        elif sequence.grammar is not None:
            row = llama_cpp.llama_get_logits_ith(self._ctx, index)
            logits = np.ctypeslib.as_array(row, shape=(self._n_vocab,))
            try:
                token = self._constrained.sample(sequence.sampler, sequence.grammar, logits)
            except EngineError as exc:  # this generation's grammar, not the step, failed
                self._release(slot)
                return [(sequence, Ended(None, exc))]
        else:
            token = int(llama_cpp.llama_sampler_sample(sequence.sampler, self._ctx, index))
        if budget is not None:
            budget.observe(token)
        top = sequence.sampling.top_logprobs
        logprobs = None
        if top is not None and sequence.on_logprobs is not None:
            row = llama_cpp.llama_get_logits_ith(self._ctx, index)
            logprobs = logprobs_of(np.ctypeslib.as_array(row, shape=(self._n_vocab,)), token, top)
        sequence.sampled += 1
        updates: list[tuple[_Sequence, Update]] = [(sequence, Sampled(token, logprobs))]
        end: EngineFinish | None = None
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            end = "stop"
        elif sequence.sampled >= sequence.max_tokens:
            end = "length"
        if end is None:
            sequence.next_token = token
        else:
            updates.append((sequence, Ended(end)))
            self._release(slot)
        return updates

    def _post(self, updates: list[tuple[_Sequence, Update]]) -> None:
        """Hand a step's updates to their loops: one post (one wake-up) per loop; then wait
        while a loop is more than this step behind."""
        by_handoff: dict[Handoff[Any], list[tuple[_Sequence, Update]]] = {}
        for update in updates:
            handoff = update[0].handoff
            assert handoff is not None
            by_handoff.setdefault(handoff, []).append(update)
        for handoff, items in by_handoff.items():
            try:
                handoff.post(items)
            except LoopClosed:
                for sequence, _ in items:
                    sequence.cancelled = True  # its consumer's loop is gone
                continue
            handoff.wait_for_room(len(items), LOOP_LAG_S)

    def _fail_batch(
        self, fed: dict[_Slot, list[int]], status: int
    ) -> list[tuple[_Sequence, Update]]:
        """A failed decode fails the generations it carried; their slots start over empty."""
        logger.error("llama_decode failed with status %d for %d sequences", status, len(fed))
        error = EngineError(f"the inference engine failed (llama_decode status {status})")
        ended: list[tuple[_Sequence, Update]] = []
        for slot in fed:
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            slot.tokens.clear()
            if slot.sequence is not None:
                ended.append((slot.sequence, Ended(None, error)))
                self._release(slot)
        return ended

    def _release(self, slot: _Slot) -> None:
        """The generation leaves its slot; the slot keeps its cells as a prefix cache."""
        sequence = slot.sequence
        assert sequence is not None
        slot.sequence = None
        for sampler in (sequence.sampler, sequence.grammar):
            if sampler is not None:
                llama_cpp.llama_sampler_free(sampler)
        sequence.sampler = sequence.grammar = None
        for other in self._slots:  # its followers prefill for themselves now
            if other.sequence is not None and other.sequence.leader is sequence:
                other.sequence.leader = None

    # -- lifecycle -----------------------------------------------------------------------

    def _keep_prompt_cache(self, folder: Path, who: dict[str, Any]) -> None:
        """On close: the slots' conversations join the cache, which goes to ``folder``."""
        cache = self._prompt_cache
        assert cache is not None
        started = time.perf_counter()
        for slot in sorted(self._slots, key=lambda s: s.last_used):
            self._save_slot(slot, cache)
        written, size = prompt_store.write(cache, folder, who)
        logger.info(
            "prompt cache: %d saved state(s), %.1f MiB, written to %s in %.2fs",
            written,
            size / 2**20,
            folder,
            time.perf_counter() - started,
        )

    def close(self) -> None:
        """Fail what is queued or running, stop the scheduler, free the context and model."""
        with self._work:
            if self._closing:
                return
            self._closing = True
            self._work.notify_all()
        self._scheduler.join()
        if self._store is not None:
            self._keep_prompt_cache(*self._store)
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        self._model.close()
