"""``BatchedLlamaBackend``: the context's lifetime and the requester's side (queue a
generation, await its result); the scheduler thread does the rest (``scheduler``).

``parallel`` slots map to sequence ids ``0..parallel-1`` of one context of ``parallel *
n_ctx`` cells; ``info.n_ctx`` is ``n_ctx``, the context one generation may use, as on the
one-slot backend. By default every slot has its own KV stream (``kv_unified=False``,
llama-server's ``-np N``), so a sequence attends only over its own cells; ``--kv-unified``
makes one buffer for all (the measurements that chose the default: docs/performance.md,
"Many streams"). No slot can hold more than its own ``n_ctx`` cells, so the pool never runs
out.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import Any

import llama_cpp

from app.engine.batched.queue import Generation, WorkQueue, deliver
from app.engine.batched.sampling import BatchSampling
from app.engine.batched.scheduler import Scheduler
from app.engine.batched.slot_state import keep_prompt_cache, open_prompt_cache
from app.engine.batched.slots import Slots
from app.engine.grammar import check_grammar
from app.engine.handoff import Handoff
from app.engine.llama_setup import EngineConfig, load_model, model_info
from app.engine.protocol import (
    Flow,
    GenerationResult,
    ModelInfo,
    OnLogprobs,
    OnToken,
    PromptCacheStats,
    SamplingParams,
    Tokenizer,
)
from app.engine.sampling import ConstrainedSampler
from app.engine.tokenizer import LlamaTokenizer

logger = logging.getLogger(__name__)


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
        memory = llama_cpp.llama_get_memory(self._ctx)
        cache_reuse = config.cache_reuse
        if cache_reuse and not llama_cpp.llama_memory_can_shift(memory):
            logger.warning("--cache-reuse is off: this model's KV cache cannot shift positions")
            cache_reuse = 0
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self.info = model_info(self._model, config, n_ctx=per_slot)
        self.tokenizer = LlamaTokenizer(self._model)
        self.max_concurrency = parallel
        self._prompt_cache, self._store, mib = open_prompt_cache(config, self.info)
        self._slots = Slots(
            self._ctx,
            memory,
            parallel,
            cache_reuse=cache_reuse,
            prompt_cache=self._prompt_cache,
        )
        self._sampling = BatchSampling(
            self._ctx, self._vocab, self.info.n_vocab, self._slots, self.tokenizer.token_bytes
        )
        self._queue = WorkQueue()
        self._handoffs: dict[asyncio.AbstractEventLoop, Handoff[Any]] = {}
        scheduler = Scheduler(
            self._ctx, self._batch, self._n_batch, self._queue, self._slots, self._sampling
        )
        self._scheduler = threading.Thread(
            target=scheduler.serve, name="batch-scheduler", daemon=True
        )
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
            self.info.n_vocab,
            "off" if mib == 0 else ("unlimited" if mib < 0 else f"{mib} MiB"),
            self.info.gpu_offload,
        )

    @property
    def _constrained(self) -> ConstrainedSampler:
        """The scheduler's grammar sampler (a test replaces it to inject a failure)."""
        return self._sampling.constrained

    @_constrained.setter
    def _constrained(self, sampler: ConstrainedSampler) -> None:
        self._sampling.constrained = sampler

    @property
    def running(self) -> int:
        """Generations holding a slot now (decoding, prefilling, or parked)."""
        return len(self._slots.running())

    @property
    def queued(self) -> int:
        """Generations waiting for a slot."""
        return len(self._queue)

    def kv_cache_usage(self) -> float:
        """Share of the KV pool's cells that hold tokens: running generations' and the prefix
        caches that idle slots keep."""
        held = sum(len(slot.tokens) for slot in self._slots.all)
        return held / (self.info.n_ctx * self.max_concurrency)

    def prompt_cache_stats(self) -> PromptCacheStats | None:
        cache = self._prompt_cache
        return cache.stats() if cache is not None else None

    def check_grammar(self, grammar: str) -> None:
        check_grammar(self._vocab, grammar)

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
        generation = Generation(
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
            flow.on_resume(self._queue.wake)
        self._queue.submit(generation)
        try:
            result = await generation.result
        except asyncio.CancelledError:
            generation.cancelled = True  # the scheduler drops it at its next step
            self._queue.wake()
            raise
        if generation.cancelled:  # on_token said False: free the slot now, not after a poll
            self._queue.wake()
        return result

    def _handoff(self, loop: asyncio.AbstractEventLoop) -> Handoff[Any]:
        """The loop's one hand-off, shared by its generations."""
        handoff = self._handoffs.get(loop)
        if handoff is None or handoff.closed:
            handoff = self._handoffs[loop] = Handoff(loop, deliver)
        return handoff

    def close(self) -> None:
        """Fail what is queued or running, stop the scheduler, free the context and model."""
        if not self._queue.close():
            return
        self._scheduler.join()
        if self._prompt_cache is not None and self._store is not None:
            keep_prompt_cache(self._ctx, self._slots.all, self._prompt_cache, self._store)
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        self._model.close()
