"""The batched engine floor: N sequences decoded together by llama.cpp, no HTTP, no server.

Every server of the many-streams scenario decodes its streams the same way: one
``llama_decode`` per step carrying the next token of every running sequence, then one
sampling per sequence. The fastest any of them can serve N streams is therefore this loop on
its own, in this process, with the servers' model, threads, batch size, flash attention and
KV layout:

1. prefill: the N prompts go into ``llama_batch``es of ``n_batch`` tokens, prompt after
   prompt, logits on each prompt's last token only; each sequence samples its first token as
   soon as the batch that ends its prompt is decoded (its time to first token);
2. decode: ``max_tokens - 1`` steps, each one ``llama_decode`` of N tokens (one per sequence,
   all with logits) and N samplings (the step time is every stream's inter-token latency);
3. ``rounds`` times, each on an empty KV cache (``llama_memory_clear``) with fresh prompts,
   as each client of the scenario sends ``rounds`` requests.

Sampling is llama.cpp's own greedy sampler, one per sequence (``llama_sampler_sample``), as
the servers sample a ``temperature: 0`` request. The KV cache is either *unified* (one
buffer of ``parallel x n_ctx`` cells that every sequence's attention spans: this server's
layout, ``llama-server --kv-unified``) or *split* (``kv_unified=false``: one stream of
``n_ctx`` cells per sequence, ``llama-server``'s default for an explicit ``-np``), sized for
``parallel`` slots of which the first N are used, as in a server started with
``--parallel``.

CPU time is this process's (``time.process_time``: every thread, llama.cpp's included) over
the rounds. The alternative rejected: ``llama-batched-bench``, which needs a llama.cpp build
beside the Python package, reports no per-sequence first tokens, and samples nothing.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bench import report
from bench.model import random_prompt

KvLayout = Literal["unified", "split"]


@dataclass(frozen=True)
class FloorSettings:
    model: Path
    parallel: int
    """Slots the context is sized for (``n_seq_max``)."""
    n_ctx: int
    """Context per slot."""
    n_threads: int
    n_batch: int
    flash_attn: Literal["auto", "on", "off"]
    layout: KvLayout


@dataclass(frozen=True)
class Round:
    """One round of the floor, timed with ``time.perf_counter``."""

    seconds: float
    ttfts: list[float]
    """Seconds from the round's start to each sequence's first token."""
    steps: list[float]
    """Seconds of each decode step (one ``llama_decode`` and N samplings)."""
    tokens: list[list[int]]
    """The tokens each sequence generated."""


class EngineFloor:
    """One llama.cpp context with the servers' settings, driven by the low-level API."""

    def __init__(self, settings: FloorSettings) -> None:
        import llama_cpp  # the engine loads only when a floor is measured
        from llama_cpp import _internals
        from llama_cpp._utils import suppress_stdout_stderr

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        self._llama: Any = llama_cpp
        self.settings = s = settings
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0x7FFFFFFF  # all of them, as every server is started
        # As the servers load it (app.engine.batched): llama.cpp's load log silenced.
        self._model_handle: Any = _internals.LlamaModel(
            path_model=str(s.model), params=model_params, verbose=False
        )
        self._model = self._model_handle.model
        # Every running sequence needs one token of the batch each step (as the servers size it).
        self.n_batch = max(s.n_batch, s.parallel)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = s.n_ctx * s.parallel
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = s.parallel
        params.kv_unified = s.layout == "unified"
        params.n_threads = params.n_threads_batch = s.n_threads
        params.flash_attn_type = {
            "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
            "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[s.flash_attn]
        with suppress_stdout_stderr(disable=False):
            self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            self._model_handle.close()  # type: ignore[no-untyped-call]
            raise RuntimeError(f"llama.cpp could not create a context for {s.model}")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    def _decode(self, n_tokens: int) -> None:
        self._batch.n_tokens = n_tokens
        status = self._llama.llama_decode(self._ctx, self._batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")

    def run_round(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> Round:
        """Prefill ``prompts`` (one sequence each), then decode until each has ``max_tokens``."""
        llama, batch = self._llama, self._batch
        if len(prompts) > self.settings.parallel:
            raise ValueError("more prompts than slots")
        if any(len(p) + max_tokens > self.settings.n_ctx for p in prompts):
            raise ValueError("a prompt plus max_tokens exceeds the context per slot")
        llama.llama_memory_clear(self._memory, True)
        samplers = [llama.llama_sampler_init_greedy() for _ in prompts]
        generated: list[list[int]] = [[] for _ in prompts]
        ttfts: list[float] = [0.0] * len(prompts)
        steps: list[float] = []
        try:
            started = time.perf_counter()
            n = 0
            ending: list[tuple[int, int]] = []  # (sequence, batch index) of prompts' last tokens

            def flush() -> None:
                nonlocal n
                self._decode(n)
                for seq, index in ending:
                    token = llama.llama_sampler_sample(samplers[seq], self._ctx, index)
                    generated[seq].append(token)
                    ttfts[seq] = time.perf_counter() - started
                ending.clear()
                n = 0

            for seq, prompt in enumerate(prompts):
                for pos, token in enumerate(prompt):
                    is_last = pos == len(prompt) - 1
                    batch.token[n] = token
                    batch.pos[n] = pos
                    batch.n_seq_id[n] = 1
                    batch.seq_id[n][0] = seq
                    batch.logits[n] = is_last
                    if is_last:
                        ending.append((seq, n))
                    n += 1
                    if n == self.n_batch:
                        flush()
            if n:
                flush()
            for step in range(max_tokens - 1):
                step_started = time.perf_counter()
                for seq, prompt in enumerate(prompts):
                    batch.token[seq] = generated[seq][-1]
                    batch.pos[seq] = len(prompt) + step
                    batch.n_seq_id[seq] = 1
                    batch.seq_id[seq][0] = seq
                    batch.logits[seq] = True
                self._decode(len(prompts))
                for seq in range(len(prompts)):
                    token = llama.llama_sampler_sample(samplers[seq], self._ctx, seq)
                    generated[seq].append(token)
                steps.append(time.perf_counter() - step_started)
            return Round(time.perf_counter() - started, ttfts, steps, generated)
        finally:
            for sampler in samplers:
                llama.llama_sampler_free(sampler)

    def close(self) -> None:
        llama = self._llama
        llama.llama_batch_free(self._batch)
        llama.llama_free(self._ctx)
        self._model_handle.close()


def measure(
    settings: FloorSettings,
    *,
    sequences: int,
    prompt_tokens: int,
    max_tokens: int,
    rounds: int,
    seed: int | str | None = None,
) -> dict[str, Any]:
    """The floor for ``sequences`` streams: a warm-up round, then ``rounds`` timed ones."""
    rng = random.Random(seed)
    floor = EngineFloor(settings)
    try:
        floor.run_round([random_prompt(rng, prompt_tokens)], 2)  # the first decode allocates
        cpu_started = time.process_time()
        window = 0.0
        ttfts: list[float] = []
        steps: list[float] = []
        for _ in range(rounds):
            prompts = [random_prompt(rng, prompt_tokens) for _ in range(sequences)]
            timed = floor.run_round(prompts, max_tokens)
            window += timed.seconds
            ttfts += timed.ttfts
            steps += timed.steps
        cpu_s = time.process_time() - cpu_started
    finally:
        floor.close()
    tokens = sequences * max_tokens * rounds
    return {
        "layout": settings.layout,
        "streams": sequences,
        "prompt_tokens": prompt_tokens,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "parallel": settings.parallel,
        "n_ctx_per_slot": settings.n_ctx,
        "tokens": tokens,
        "window_s": round(window, 4),
        "tokens_per_s": round(tokens / window, 2) if window > 0 else None,
        "ttft_ms": quantiles_ms(ttfts),
        "itl_ms": quantiles_ms(steps),
        "steps": len(steps),
        "cpu_s": round(cpu_s, 4),
        "cpu_s_per_1k_tokens": round(1000 * cpu_s / tokens, 4) if tokens else None,
    }


def quantiles_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50, p95, min and max of ``seconds``, in milliseconds."""

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 3)

    return {
        "p50": ms(report.percentile(seconds, 0.5)),
        "p95": ms(report.percentile(seconds, 0.95)),
        "min": ms(min(seconds, default=None)),
        "max": ms(max(seconds, default=None)),
    }
