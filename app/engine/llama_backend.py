"""One generation at a time: llama-cpp-python's ``Llama`` and its token iterator.

``Llama.generate()`` keeps the KV cache of the previous request and decodes only the part of a
new prompt that differs from it, so a multi-turn chat re-decodes only its newest turn (one
``Llama`` for the life of the process; ``reset()`` is never called). Generations run on one
engine thread in arrival order, a running one never interrupted by a newer request; each
sampled token is handed to the requester's event loop (``app.engine.handoff``), where
``on_token`` runs. Request fields reach ``Llama`` argument by argument from ``SamplingParams``;
logit biases, a thinking budget and a grammar reach it as logits processors
(``app.engine.llama_processors``).

``Llama`` takes no tensor overrides and has no slots: ``app.engine.load_backend`` sends models
that need either (``--cpu-moe``, ``--n-cpu-moe``, ``--override-tensor``, ``--cache-ram``) to
the batching engine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any

import llama_cpp
import numpy as np

from app.engine.grammar import check_grammar
from app.engine.handoff import Ended, Handoff, LoopClosed, Requester, Sampled, Update
from app.engine.llama_processors import GrammarProcessor, logits_processors
from app.engine.llama_setup import (
    KV_TYPES,
    EngineConfig,
    finish_of,
    logits_row,
    logprobs_of,
    model_info,
    quiet_llama_log,
)
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
    TokenLogprobs,
)
from app.engine.sampling import ConstrainedSampler, new_samplers, request_seed
from app.engine.thinking_limit import budget_tracker
from app.engine.tokenizer import LlamaTokenizer

logger = logging.getLogger(__name__)

HANDOFF_AHEAD = 1
"""Tokens the engine thread may have handed over and the loop not yet delivered: the engine
decodes the next token while the loop delivers this one, and waits for a loop that is behind
by more (so a paused consumer stops it within a token)."""

PAUSED_POLL_S = 0.05
"""Longest the engine thread waits for a loop that is behind, or for a paused consumer, before
it checks again whether the generation was cancelled."""


@dataclass(eq=False)
class _Run(Requester):
    """One generation, shared by the engine thread and the requester's event loop."""

    handoff: Handoff[Update] = field(init=False)
    resumed: threading.Event = field(default_factory=threading.Event)
    """Set when the consumer resumes a paused generation (wakes the engine thread)."""

    def deliver_all(self, updates: list[Update]) -> None:
        for update in updates:
            self.deliver(update)


class LlamaBackend:
    """One ``Llama`` context serving one generation at a time."""

    info: ModelInfo
    tokenizer: Tokenizer
    max_concurrency = 1

    def __init__(self, config: EngineConfig) -> None:
        quiet_llama_log()
        self._llm = llama_cpp.Llama(
            model_path=str(config.model_path),
            n_ctx=config.n_ctx,
            n_gpu_layers=config.n_gpu_layers,
            n_threads=config.n_threads,
            n_threads_batch=config.n_threads_batch,
            n_batch=config.n_batch,
            n_ubatch=config.micro_batch(config.n_batch),
            # Llama takes on/off only: auto is on, which is what llama.cpp's auto resolves to
            # on CPU and CUDA devices.
            flash_attn=config.flash_attn != "off",
            type_k=KV_TYPES[config.cache_type_k].ggml_type,
            type_v=KV_TYPES[config.cache_type_v].ggml_type,
            verbose=False,
        )
        model = self._llm._model  # the LlamaModel inside, as the batching backend loads it
        self._vocab = model.vocab
        self.info = model_info(model, config, n_ctx=int(self._llm.n_ctx()))
        self.tokenizer = LlamaTokenizer(model)
        self._constrained = ConstrainedSampler(self.info.n_vocab)  # the engine thread's
        self._engine = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._closing = False
        logger.info(
            "loaded %s (%s, n_ctx=%d, vocab=%d, gpu_offload=%s)",
            config.model_path.name,
            self.info.architecture,
            self.info.n_ctx,
            self.info.n_vocab,
            self.info.gpu_offload,
        )

    def kv_cache_usage(self) -> float:
        return int(self._llm.n_tokens) / self.info.n_ctx

    def prompt_cache_stats(self) -> PromptCacheStats | None:
        return None

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
        loop = asyncio.get_running_loop()
        run = _Run(len(prompt_tokens), on_token, on_logprobs, flow, loop.create_future())
        run.handoff = Handoff(loop, run.deliver_all)
        if flow is not None:
            flow.on_resume(run.resumed.set)
        tokens = list(prompt_tokens)
        try:
            job = self._engine.submit(self._decode, run, tokens, sampling, max_tokens)
        except RuntimeError as exc:  # the executor is shut down
            raise EngineError("the backend is closed") from exc
        job.add_done_callback(lambda done: _never_ran(done, run))
        try:
            return await run.result
        except asyncio.CancelledError:
            run.cancelled = True  # left early: a queued job never starts, a running one stops
            run.resumed.set()
            job.cancel()
            raise

    def _decode(
        self, run: _Run, prompt: list[int], sampling: SamplingParams, max_tokens: int
    ) -> None:
        """Engine thread: one generation, every outcome handed to the requester's loop."""
        run.started = time.perf_counter()
        if run.cancelled:
            return
        try:
            end = Ended(self._tokens(run, prompt, sampling, max_tokens))
        except LoopClosed:
            return  # nobody is listening any more
        except EngineError as exc:
            end = Ended(None, exc)
        except Exception as exc:
            logger.exception("llama.cpp failed a generation")
            failure = EngineError("the inference engine failed")
            failure.__cause__ = exc
            end = Ended(None, failure)
        with suppress(LoopClosed):  # nobody is listening any more
            run.handoff.post((end,))

    def _tokens(
        self, run: _Run, prompt: list[int], sampling: SamplingParams, max_tokens: int
    ) -> EngineFinish:
        seed = request_seed(sampling)
        top_logprobs = sampling.top_logprobs if run.on_logprobs is not None else None
        self._llm.set_seed(seed)
        run.cached = self._cached_prefix(prompt)
        if max_tokens == 0:  # a cache warm-up: decode the prompt, sample nothing
            self._llm.n_tokens = run.cached
            self._llm.eval(prompt[run.cached :])
            return "length"
        sampled = 0
        budget = budget_tracker(sampling.thinking_budget, self.tokenizer.token_bytes)
        grammar = (
            GrammarProcessor(
                self._constrained,
                *new_samplers(
                    self._vocab,
                    self.info.n_vocab,
                    replace(sampling, seed=seed),
                    logit_bias=False,  # the _Biases processor runs before it
                ),
            )
            if sampling.grammar
            else None
        )
        tokens = self._llm.generate(
            prompt,
            temp=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            repeat_penalty=sampling.repeat_penalty,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            logits_processor=logits_processors(sampling.logit_bias, budget, grammar),
        )
        try:
            for token_id in tokens:
                if grammar is not None and grammar.error is not None:
                    raise grammar.error  # before the token it could not constrain is shown
                if budget is not None:
                    budget.observe(token_id)
                sampled += 1
                logprobs = None if top_logprobs is None else self._logprobs(token_id, top_logprobs)
                run.handoff.post((Sampled(token_id, logprobs),))
                end = finish_of(self._vocab, token_id, sampled, max_tokens)
                if end is not None:
                    return end
                self._hold(run)
                if run.cancelled:
                    return "cancelled"
                if self._closing:
                    raise EngineError("the backend is closed")
        finally:
            tokens.close()
            if grammar is not None:
                grammar.free()
        return "length"

    @staticmethod
    def _hold(run: _Run) -> None:
        """Wait while the loop has too much undelivered, then while the consumer is paused
        (in that order: a pause decided on a token the loop is still delivering counts)."""
        run.handoff.wait_for_room(HANDOFF_AHEAD, PAUSED_POLL_S)
        while run.flow is not None and run.flow.paused and not run.cancelled:
            run.resumed.wait(PAUSED_POLL_S)
            run.resumed.clear()

    def _cached_prefix(self, prompt_tokens: Sequence[int]) -> int:
        """How many prompt tokens ``Llama.generate`` will reuse from the KV cache.

        It reuses the common prefix with what the context holds, minus one token when the
        whole prompt matches (that token is decoded again to refresh the logits).
        """
        n = min(int(self._llm.n_tokens), len(prompt_tokens))
        differ = np.flatnonzero(self._llm.input_ids[:n] != np.asarray(prompt_tokens[:n]))
        common = int(differ[0]) if differ.size else n
        if common == len(prompt_tokens) and common > 0 and self._llm.n_tokens != common:
            common -= 1
        return common

    def _logprobs(self, token_id: int, top: int) -> TokenLogprobs:
        """Logprobs from the logits the token was sampled from (still the last ones decoded)."""
        logits = logits_row(self._llm._ctx.ctx, -1, self.info.n_vocab)
        return logprobs_of(logits, token_id, top)

    def close(self) -> None:
        """Fail the running generation at its next token and every queued one, then free the
        model."""
        self._closing = True
        self._engine.shutdown(wait=True, cancel_futures=True)
        self._llm.close()


def _never_ran(job: Any, run: _Run) -> None:
    """A job the executor dropped (the backend closed while it waited) fails its request."""
    if job.cancelled() and not run.cancelled:
        loop = run.result.get_loop()

        def fail() -> None:
            if not run.result.done():
                run.result.set_exception(EngineError("the backend is closed"))

        with suppress(RuntimeError):  # the loop is closed: nobody waits for the result
            loop.call_soon_threadsafe(fail)
