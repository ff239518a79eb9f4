"""Continuous batching: many requests decoded together in one llama.cpp context.

One scheduler thread owns the ``llama_context`` and runs a loop of *steps*. Each step drops
the sequences whose request was cancelled, places waiting requests into free slots, then
decodes one ``llama_batch`` holding the next token of every running sequence plus prompt
chunks of newly placed ones (at most ``n_batch`` tokens in all, so a long prompt is prefilled
over several steps while the running streams keep receiving a token per step), and samples
one token for every sequence that produced logits. This is ``llama-server``'s design (slots,
``update_slots``), written against llama-cpp-python's low-level API.

Slots and KV layout. ``parallel`` slots map to sequence ids ``0..parallel-1`` of one context
with a *unified* KV cache of ``parallel * n_ctx`` cells; ``info.n_ctx`` is ``n_ctx``, the
context one request may use (prompt plus completion), exactly as on the one-slot backend.
No slot can hold more than one request's cells, so the pool never runs out. The split layout
(``kv_unified=false``, one KV stream per sequence) was rejected: llama.cpp decodes a split
batch in micro-batches of *consecutive* sequence ids only, so once a stream in the middle
finishes, every step of the others would become several forward passes (on a GPU, about
twice the time per gap). (``llama-server``'s ``--kv-unified-per-slot`` is the same layout as
ours.) The price of unified: a step's attention spans every cell in use, the idle slots' prefix
caches included (masked out), so with long cached contexts a step costs more than it would
split. At chat lengths it does not show: on the bench model (CPU, 4 sequences of ~300 tokens)
both layouts decode a step in the same time, within run-to-run noise.

Prefix reuse. A slot keeps the KV cells of its last request after it ends (they stay counted
in its share of the pool, so they never crowd out a running request); a new request goes to
the free slot whose cells share the longest prefix with its prompt, and only the rest of the
prompt is decoded: a multi-turn chat re-decodes its newest turn. A match shorter than
``SLOT_PROMPT_SIMILARITY`` of the prompt (a chat template's common opening) does not count;
the least recently used slot is taken instead, as ``llama-server`` does. Cells past the shared
prefix are removed (``llama_memory_seq_rm``) when the slot is reused; a cancelled request's
slot keeps what it had decoded, so a retried prompt resumes its prefill.

Sampling mirrors ``Llama._init_sampler``: per request a ``llama_sampler`` chain of penalties,
grammar, then greedy or top-k/top-p/min-p/temperature/``dist(seed)``; each chain has its own
random state, so one request's seed decides only its own tokens. Logprobs come from a copy of
the raw logits taken before sampling, computed on the caller's thread.

Callbacks never run on the scheduler thread. ``generate()`` blocks its caller; the scheduler
hands each sampled token to that request's queue, and the *caller's* thread calls
``on_token``. A slow client (the service's ``on_token`` waits while its stream buffer is
full) therefore blocks only its own thread; once ``HANDOFF_TOKENS`` tokens of a request wait
unread, the scheduler stops decoding that sequence (it stays in its slot) until its reader
catches up, so nothing piles up and the other streams go on at full speed. The alternative
rejected: calling ``on_token`` from the scheduler, where one full buffer stalls every stream.

Cancellation. ``on_token`` returning False, or the optional ``cancelled()`` probe turning
true (polled by the caller every ``POLL_S`` while no token arrives: a request that is queued
or prefilling has no token to refuse), marks the request; the scheduler drops it at the start
of its next step, and ``generate()`` returns only once the slot is free again.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp import _internals

from app.backends.base import (
    FinishReason,
    FlashAttn,
    GenerationResult,
    ModelInfo,
    OnLogprobs,
    OnToken,
    SamplingParams,
    Tokenizer,
    TokenLogprobs,
)
from app.backends.grammar import check_grammar
from app.backends.llama import LlamaTokenizer

logger = logging.getLogger(__name__)

PENALTY_LAST_N = 64
"""Tokens the repetition penalties look back on: ``Llama``'s ``last_n_tokens_size`` default,
so both backends penalise alike."""

HANDOFF_TOKENS = 16
"""Sampled tokens a request may have waiting for its reader before its sequence is parked."""

SLOT_PROMPT_SIMILARITY = 0.1
"""Share of a prompt a slot's cached prefix must cover to be chosen for reuse (as
``llama-server``'s ``--slot-prompt-similarity``)."""

POLL_S = 0.02
"""How often a waiting caller checks its ``cancelled()`` probe, and an idle scheduler its
parked sequences."""


@dataclass
class BatchStats:
    """Counters of the scheduler's decode steps, for logs, benchmarks and tests."""

    steps: int = 0
    tokens: int = 0
    """Tokens decoded, prompt chunks included."""
    sequences: int = 0
    """Sum over steps of the sequences each step decoded (``sequences / steps``: mean width)."""
    peak_sequences: int = 0


class SchedulerError(RuntimeError):
    """The engine failed a request (a failed ``llama_decode``, or the backend closed)."""


_Logits = npt.NDArray[np.float32]


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    sampling: SamplingParams
    max_tokens: int
    # Scheduler thread only.
    sampler: Any = None
    next_token: int | None = None
    """Sampled and handed off, not yet decoded (its KV cell is written next step)."""
    sampled: int = 0
    cached: int = 0
    want_logits: bool = False
    # Shared with the caller's thread, under ``ready``.
    ready: threading.Condition = field(default_factory=threading.Condition)
    handed: deque[tuple[int, _Logits | None]] = field(default_factory=deque)
    end: FinishReason | None = None
    error: SchedulerError | None = None
    released: bool = False
    """The scheduler has let go of the request: ``end`` or ``error`` is final."""
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def parked(self) -> bool:
        return len(self.handed) >= HANDOFF_TOKENS


@dataclass(eq=False)
class _Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)
    """What the KV cache holds for ``seq_id``, position by position."""
    request: _Request | None = None
    last_used: int = 0


def default_parallel(n_gpu_layers: int) -> int:
    """Slots for ``--parallel 0``: 4 when layers run on a GPU, where a step of several
    sequences costs about as much as a step of one; 1 on a CPU build."""
    if llama_cpp.llama_supports_gpu_offload() and n_gpu_layers != 0:
        return 4
    return 1


def _choose_slot(free: list[_Slot], prompt: Sequence[int]) -> _Slot:
    """The free slot whose cells share the longest prefix with ``prompt``, if that covers
    more than ``SLOT_PROMPT_SIMILARITY`` of it; else the least recently used (an empty one
    first), so that a chat template's common opening does not evict another conversation."""
    best = max(free, key=lambda s: (_common_prefix(s.tokens, prompt), -s.last_used))
    if _common_prefix(best.tokens, prompt) > SLOT_PROMPT_SIMILARITY * len(prompt):
        return best
    return min(free, key=lambda s: s.last_used)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class BatchedLlamaBackend:
    """``parallel`` slots of one llama.cpp context, decoded together by a scheduler thread."""

    info: ModelInfo
    tokenizer: Tokenizer
    max_concurrency: int

    def __init__(
        self,
        model_path: Path,
        *,
        parallel: int,
        n_ctx: int,
        n_gpu_layers: int,
        n_threads: int | None,
        n_batch: int,
        flash_attn: FlashAttn,
        chat_template: str | None = None,
    ) -> None:
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # as Llama(verbose=False)
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers == -1 else n_gpu_layers
        self._model = _internals.LlamaModel(
            path_model=str(model_path), params=model_params, verbose=False
        )
        self._vocab = self._model.vocab
        per_slot = n_ctx or int(self._model.n_ctx_train())
        # Every running sequence needs one token of the batch each step.
        self._n_batch = max(n_batch, parallel)
        cpus = multiprocessing.cpu_count()
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = per_slot * parallel
        params.n_batch = self._n_batch
        params.n_ubatch = self._n_batch
        params.n_seq_max = parallel
        params.kv_unified = True
        # Nearly every step decodes several tokens, which llama.cpp runs on n_threads_batch:
        # an explicit thread count applies to both (Llama's own defaults otherwise).
        params.n_threads = n_threads or max(cpus // 2, 1)
        params.n_threads_batch = n_threads or cpus
        params.flash_attn_type = {
            "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
            "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[flash_attn]
        self._ctx = llama_cpp.llama_init_from_model(self._model.model, params)
        if self._ctx is None:
            self._model.close()  # type: ignore[no-untyped-call]
            raise RuntimeError(f"could not create a llama.cpp context for {model_path}")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))

        metadata: dict[str, str] = self._model.metadata()
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        gpu_offload = bool(llama_cpp.llama_supports_gpu_offload()) and n_gpu_layers != 0
        self.info = ModelInfo(
            path=str(model_path),
            n_ctx=per_slot,
            n_vocab=self._n_vocab,
            architecture=str(metadata.get("general.architecture", "unknown")),
            chat_template=chat_template or metadata.get("tokenizer.chat_template"),
            bos_token=self._token_text(int(self._model.token_bos())),
            eos_token=self._token_text(int(self._model.token_eos())),
            add_bos=add_bos,
            gpu_offload=gpu_offload,
        )
        self.tokenizer = LlamaTokenizer(self._model, add_bos)
        self.max_concurrency = parallel
        self.stats = BatchStats()

        self._slots = [_Slot(seq_id) for seq_id in range(parallel)]
        self._uses = count(1)
        self._work = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._closing = False
        self._failure: SchedulerError | None = None
        self._scheduler = threading.Thread(target=self._serve, name="batch-scheduler", daemon=True)
        self._scheduler.start()
        logger.info(
            "loaded %s (%s, %d slots x n_ctx=%d, unified KV of %d cells, n_batch=%d, "
            "vocab=%d, gpu_offload=%s)",
            model_path.name,
            self.info.architecture,
            parallel,
            per_slot,
            int(llama_cpp.llama_n_ctx(self._ctx)),
            self._n_batch,
            self._n_vocab,
            gpu_offload,
        )

    @property
    def running(self) -> int:
        """Requests holding a slot now (decoding, prefilling, or parked behind their reader)."""
        return sum(slot.request is not None for slot in self._slots)

    def kv_cache_usage(self) -> float:
        """Share of the KV pool's cells that hold tokens: running requests' and the prefix
        caches that idle slots keep."""
        held = sum(len(slot.tokens) for slot in self._slots)
        return held / (self.info.n_ctx * self.max_concurrency)

    def _token_text(self, token_id: int) -> str:
        if token_id < 0:
            return ""
        return self._model.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    # -- the caller's side ---------------------------------------------------------------

    def generate(
        self,
        prompt_tokens: Sequence[int],
        sampling: SamplingParams,
        max_tokens: int,
        on_token: OnToken,
        on_logprobs: OnLogprobs | None = None,
        *,
        cancelled: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Queue the request, then report its tokens on this thread until it ends.

        ``cancelled`` is polled while no token arrives; it lets a caller whose client left
        free the slot of a request that is still queued or prefilling. Logprobs are computed
        here too, from a copy of the logits the scheduler took before sampling.
        """
        if not prompt_tokens:
            raise ValueError("the prompt is empty")
        if len(prompt_tokens) + max_tokens > self.info.n_ctx:
            raise ValueError(f"prompt plus max_tokens exceed the slot context {self.info.n_ctx}")
        request = _Request(list(prompt_tokens), sampling, max_tokens)
        top_logprobs = sampling.top_logprobs
        request.want_logits = on_logprobs is not None and top_logprobs is not None
        with self._work:
            if self._failure is not None:
                raise self._failure
            if self._closing:
                raise SchedulerError("the backend is closed")
            self._waiting.append(request)
            self._work.notify()
        reported = 0
        finish: FinishReason | None = None
        try:
            while finish is None:
                token, logits, ended = self._next(request)
                if token is not None:
                    reported += 1
                    if logits is not None and on_logprobs is not None and top_logprobs is not None:
                        on_logprobs(_logprobs(logits, token, top_logprobs))
                    if not on_token(token):
                        finish = "cancelled"
                elif ended:
                    if request.error is not None:
                        raise request.error
                    finish = request.end or "cancelled"
                elif cancelled is not None and cancelled():
                    finish = "cancelled"
        finally:
            if not request.released:
                self._cancel(request)
        return GenerationResult(
            finish_reason=finish,
            prompt_tokens=len(request.prompt),
            completion_tokens=reported,
            cached_tokens=request.cached,
        )

    def _cancel(self, request: _Request) -> None:
        """Take a queued request out of the queue, or have the scheduler drop it at its next
        step; return once its slot is free."""
        with self._work:
            if request in self._waiting:
                self._waiting.remove(request)
                self._finish(request, "cancelled")
                return
            request.cancel.set()
            self._work.notify()
        with request.ready:
            request.ready.wait_for(lambda: request.released)

    def _next(self, request: _Request) -> tuple[int | None, _Logits | None, bool]:
        """The next handed-off token (with its logits if asked); else whether the scheduler
        has let go of the request (checked once every token is reported), after at most
        ``POLL_S``."""
        with request.ready:
            if not request.handed and not request.released:
                request.ready.wait(POLL_S)
            if request.handed:
                was_parked = request.parked
                token, logits = request.handed.popleft()
            else:
                return None, None, request.released
        if was_parked:
            with self._work:
                self._work.notify()
        return token, logits, False

    # -- the scheduler thread ------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while self._step():
                pass
        except Exception as exc:
            logger.exception("the batch scheduler failed")
            failure = SchedulerError("the inference engine failed")
            failure.__cause__ = exc
            with self._work:
                self._failure = failure
        finally:
            error = self._failure or SchedulerError("the backend is closed")
            with self._work:
                waiting = list(self._waiting)
                self._waiting.clear()
            for request in waiting:
                self._finish(request, None, error)
            for slot in self._slots:
                if slot.request is not None:
                    self._release(slot, None, error)

    def _step(self) -> bool:
        """One scheduling step; False once the backend closes."""
        with self._work:
            while not self._closing and not self._waiting and not self._has_running():
                self._work.wait()
            if self._closing:
                return False
            for slot in self._slots:
                if slot.request is not None and slot.request.cancel.is_set():
                    self._release(slot, "cancelled")
            placed = self._place_waiting()
        for slot, request in placed:
            try:
                self._start(slot, request)
            except SchedulerError as exc:
                self._release(slot, None, exc)
        running = [s for s in self._slots if s.request is not None]
        fed, outputs = self._fill_batch(running)
        if not outputs and not any(fed.values()):
            with self._work:  # every sequence is parked: wait for a reader
                if not self._closing:
                    self._work.wait(POLL_S)
            return True
        status = llama_cpp.llama_decode(self._ctx, self._batch)
        if status != 0:
            self._fail_batch(fed, status)
            return True
        stats = self.stats
        stats.steps += 1
        stats.tokens += self._batch.n_tokens
        stats.sequences += len(fed)
        stats.peak_sequences = max(stats.peak_sequences, len(fed))
        for slot, tokens in fed.items():
            slot.tokens.extend(tokens)
        for index, slot in outputs:
            self._sample(slot, index)
        return True

    def _has_running(self) -> bool:
        return any(slot.request is not None for slot in self._slots)

    def _place_waiting(self) -> list[tuple[_Slot, _Request]]:
        """Under ``_work``: give free slots to waiting requests, in arrival order."""
        placed = []
        while self._waiting:
            request = self._waiting[0]
            if request.cancel.is_set():
                self._waiting.popleft()
                self._finish(request, "cancelled")
                continue
            free = [slot for slot in self._slots if slot.request is None]
            if not free:
                break
            self._waiting.popleft()
            slot = _choose_slot(free, request.prompt)
            slot.request = request
            placed.append((slot, request))
        return placed

    def _start(self, slot: _Slot, request: _Request) -> None:
        """Keep the slot's cells that match the prompt, drop the rest, build the sampler."""
        reuse = _common_prefix(slot.tokens, request.prompt)
        if reuse == len(request.prompt):
            reuse -= 1  # the last prompt token is decoded again: its logits are the first sample
        if not llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, reuse, -1):
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            reuse = 0
        del slot.tokens[reuse:]
        slot.last_used = next(self._uses)
        request.cached = reuse
        request.sampler = self._new_sampler(request.sampling)

    def _new_sampler(self, sampling: SamplingParams) -> Any:
        """The chain ``Llama._init_sampler`` builds, with this request's own seed."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        add(
            chain,
            llama_cpp.llama_sampler_init_penalties(
                self._n_vocab,
                PENALTY_LAST_N,
                sampling.repeat_penalty,
                sampling.frequency_penalty,
                sampling.presence_penalty,
            ),
        )
        if sampling.grammar:
            grammar = llama_cpp.llama_sampler_init_grammar(
                self._vocab, sampling.grammar.encode("utf-8"), b"root"
            )
            if not grammar:  # NULL: a ctypes pointer that is falsy, never None
                llama_cpp.llama_sampler_free(chain)
                raise SchedulerError("the grammar could not be parsed")
            add(chain, grammar)
        if sampling.greedy:
            add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
        add(chain, llama_cpp.llama_sampler_init_top_k(sampling.top_k))
        add(chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
        add(chain, llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1))
        add(chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
        add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def _fill_batch(
        self, running: list[_Slot]
    ) -> tuple[dict[_Slot, list[int]], list[tuple[int, _Slot]]]:
        """Next tokens of decoding sequences first, then prompt chunks in placement order."""
        batch = self._batch
        fed: dict[_Slot, list[int]] = {}
        outputs: list[tuple[int, _Slot]] = []
        n = 0

        def add(slot: _Slot, token: int, logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = len(slot.tokens) + len(fed.setdefault(slot, []))
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = slot.seq_id
            batch.logits[n] = logits
            fed[slot].append(token)
            if logits:
                outputs.append((n, slot))
            n += 1

        prefilling = []
        for slot in running:
            request = slot.request
            assert request is not None
            if request.next_token is None:
                prefilling.append(slot)
            elif not request.parked:
                add(slot, request.next_token, logits=True)
        prefilling.sort(key=lambda s: s.last_used)
        for slot in prefilling:
            request = slot.request
            assert request is not None
            start = len(slot.tokens)
            chunk = request.prompt[start : start + self._n_batch - n]
            for offset, token in enumerate(chunk):
                add(slot, token, logits=start + offset == len(request.prompt) - 1)
            if n == self._n_batch:
                break
        batch.n_tokens = n
        return fed, outputs

    def _sample(self, slot: _Slot, index: int) -> None:
        request = slot.request
        assert request is not None
        request.next_token = None
        logits = None
        if request.want_logits:
            row = llama_cpp.llama_get_logits_ith(self._ctx, index)
            logits = np.ctypeslib.as_array(row, shape=(self._n_vocab,)).copy()
        token = int(llama_cpp.llama_sampler_sample(request.sampler, self._ctx, index))
        request.sampled += 1
        with request.ready:
            request.handed.append((token, logits))
            request.ready.notify()
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._release(slot, "stop")
        elif request.sampled >= request.max_tokens:
            self._release(slot, "length")
        else:
            request.next_token = token

    def _fail_batch(self, fed: dict[_Slot, list[int]], status: int) -> None:
        """A failed decode fails the requests it carried; their slots start over empty."""
        logger.error("llama_decode failed with status %d for %d sequences", status, len(fed))
        error = SchedulerError(f"the inference engine failed (llama_decode status {status})")
        for slot in fed:
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            slot.tokens.clear()
            if slot.request is not None:
                self._release(slot, None, error)

    def _release(
        self, slot: _Slot, end: FinishReason | None, error: SchedulerError | None = None
    ) -> None:
        """The request leaves its slot; the slot keeps its cells as a prefix cache."""
        request = slot.request
        assert request is not None
        slot.request = None
        if request.sampler is not None:
            llama_cpp.llama_sampler_free(request.sampler)
            request.sampler = None
        self._finish(request, end, error)

    @staticmethod
    def _finish(
        request: _Request, end: FinishReason | None, error: SchedulerError | None = None
    ) -> None:
        with request.ready:
            request.end = end
            request.error = error
            request.released = True
            request.ready.notify_all()

    def check_grammar(self, grammar: str) -> None:
        check_grammar(self._vocab, grammar)

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Fail what is queued or running, stop the scheduler, free the context and model."""
        with self._work:
            if self._closing:
                return
            self._closing = True
            self._work.notify_all()
        self._scheduler.join()
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        self._model.close()  # type: ignore[no-untyped-call]


def _logprobs(logits: _Logits, token_id: int, top: int) -> TokenLogprobs:
    """Log-softmax of the raw logits a token was sampled from, and its ``top`` best."""
    shifted = logits.astype(np.float64) - float(logits.max())
    logprobs = shifted - np.log(np.exp(shifted).sum())
    k = min(top, len(logprobs))
    best = np.argpartition(-logprobs, k - 1)[:k] if k > 0 else np.arange(0)
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return TokenLogprobs(
        token_id=token_id,
        logprob=float(logprobs[token_id]),
        top=tuple((int(i), float(logprobs[i])) for i in best),
    )
