"""This server's batching engine alone: a point's streams as in-process generations, no HTTP.

Between the llama.cpp floor (``bench.engine_floor``) and the server: the same N streams go
through ``app.engine.batched.BatchedLlamaBackend`` (its scheduler thread, its sampling, the
hand-off of every step to an event loop) with an ``on_token`` that only notes the time. Its
figures over the floor's are what the scheduler costs; the server's figures over these are
what HTTP, JSON and SSE cost beside it on the same cores. They are also the most that an
engine in a process of its own (vLLM's engine core) could deliver at the point: the HTTP work
gone from its cores and its GIL, nothing else changed.

Rounds as the floor runs them: every sequence of a round starts at once, each with a fresh
random prompt, greedy, ``max_tokens`` out; the next round starts when all have ended. Time to
first token is from the round's start to a sequence's first ``on_token``; inter-token latency
is the gap between a sequence's ``on_token`` calls (on the event loop, after the hand-off).
CPU time is that process's over the rounds (every thread: llama.cpp's, the scheduler, the
loop).

It runs in a process of its own (``python -m bench.engine_only``, JSON on stdout), as a server
does: llama.cpp's CPU backend runs its threads through OpenMP, and once one thread of a
process has decoded (the floor, in the bench's main thread), a decode from another thread
(the scheduler's) took 20 times as long here (2.9 ms against 0.14 ms a step).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.engine_floor import FloorSettings, quantiles_ms
from bench.model import random_prompt
from bench.servers import OtherLoad


async def _rounds(
    backend: Any,
    rng: random.Random,
    sequences: int,
    prompt_tokens: int,
    max_tokens: int,
    rounds: int,
) -> tuple[float, float, list[float], list[float], int]:
    """A warm-up, then the timed rounds: window and CPU seconds, first tokens, gaps, tokens."""
    from app.engine.protocol import SamplingParams

    greedy = SamplingParams(temperature=0.0)
    window = 0.0
    ttfts: list[float] = []
    gaps: list[float] = []
    tokens = 0

    async def one(prompt: list[int], started: float) -> int:
        times: list[float] = []

        def on_token(_: int) -> bool:
            times.append(time.perf_counter())
            return True

        await backend.generate(prompt, greedy, max_tokens, on_token)
        ttfts.append(times[0] - started)
        gaps.extend(b - a for a, b in itertools.pairwise(times))
        return len(times)

    await backend.generate(random_prompt(rng, prompt_tokens), greedy, 2, lambda _: True)  # warm
    cpu_started = time.process_time()
    for _ in range(rounds):
        prompts = [random_prompt(rng, prompt_tokens) for _ in range(sequences)]
        started = time.perf_counter()
        counts = await asyncio.gather(*(one(prompt, started) for prompt in prompts))
        window += time.perf_counter() - started
        tokens += sum(counts)
    return window, time.process_time() - cpu_started, ttfts, gaps, tokens


_ROOT = Path(__file__).resolve().parent.parent


def measure(
    settings: FloorSettings,
    *,
    sequences: int,
    prompt_tokens: int,
    max_tokens: int,
    rounds: int,
    seed: int | str | None = None,
) -> dict[str, Any]:
    """The engine's figures for ``sequences`` streams, in the floor's terms, measured in a
    process of its own."""
    job = {
        "settings": {**dataclasses.asdict(settings), "model": str(settings.model)},
        "sequences": sequences,
        "prompt_tokens": prompt_tokens,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "seed": seed,
    }
    done = subprocess.run(
        [sys.executable, "-m", "bench.engine_only", json.dumps(job)],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench.engine_only failed: {done.stderr[-2000:]}")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def _measure_here(
    settings: FloorSettings,
    *,
    sequences: int,
    prompt_tokens: int,
    max_tokens: int,
    rounds: int,
    seed: int | str | None = None,
) -> dict[str, Any]:
    from app.engine.batched import BatchedLlamaBackend  # the engine loads only when measured
    from app.engine.llama_setup import EngineConfig

    config = EngineConfig(
        model_path=settings.model,
        n_ctx=settings.n_ctx,
        n_gpu_layers=-1,  # all of them, as every server is started
        n_threads=settings.n_threads,
        n_threads_batch=settings.n_threads,
        n_batch=settings.n_batch,
        flash_attn=settings.flash_attn,
        kv_unified=settings.layout == "unified",
    )
    backend = BatchedLlamaBackend(config, parallel=settings.parallel)
    other = OtherLoad(os.getppid())  # neither this process nor the bench's is another's
    try:
        window, cpu_s, ttfts, gaps, tokens = asyncio.run(
            _rounds(backend, random.Random(seed), sequences, prompt_tokens, max_tokens, rounds)
        )
    finally:
        backend.close()
    return {
        "layout": settings.layout,
        "streams": sequences,
        "tokens": tokens,
        "window_s": round(window, 4),
        "tokens_per_s": round(tokens / window, 2) if window > 0 else None,
        "ttft_ms": quantiles_ms(ttfts),
        "itl_ms": quantiles_ms(gaps),
        "cpu_s": round(cpu_s, 4),
        "cpu_s_per_1k_tokens": round(1000 * cpu_s / tokens, 4) if tokens else None,
        "other_processes_cpus": other.cores(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.engine_only", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("job", help="the measurement as JSON (what measure() passes)")
    job = json.loads(parser.parse_args(argv).job)
    fields = job.pop("settings")
    settings = FloorSettings(**{**fields, "model": Path(fields["model"])})
    print(json.dumps(_measure_here(settings, **job)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
