"""The floor: llama-cpp-python's token iterator in this process, no HTTP, no server.

Every server here drives the same llama.cpp, so the fastest any of them can stream is the
rate at which ``Llama.generate`` yields tokens with the same model, context, threads, prompt
and greedy sampling. A server's overhead is its figure over this one.

The floor keeps the prompt in its KV cache between runs, as the servers do (a warm prompt):
its time to first token is then one decode step plus sampling, which is what a server's time
to first token on a repeated prompt is made of, plus its own overhead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEXT = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly mix "
    "jam and fourteen bold zebras graze beside the river"
)


@dataclass(frozen=True)
class FloorRun:
    ttft: float
    """Seconds from the call to the first token."""
    token_times: list[float]
    """Seconds from the call to each token."""

    @property
    def per_token(self) -> float:
        times = self.token_times
        return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")


class Floor:
    """A ``Llama`` loaded with the servers' settings, generating greedily from token ids."""

    def __init__(
        self, model: Path, *, n_ctx: int, n_threads: int, n_batch: int, flash_attn: bool
    ) -> None:
        import llama_cpp  # the engine loads only when a floor is measured

        self._llm: Any = llama_cpp.Llama(
            model_path=str(model),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            n_batch=n_batch,
            n_ubatch=n_batch,
            n_gpu_layers=-1,
            flash_attn=flash_attn,
            verbose=False,
        )

    def tokenize(self, text: str) -> list[int]:
        tokens: list[int] = self._llm.tokenize(text.encode(), add_bos=True, special=True)
        return tokens

    def prompt(self, n_tokens: int) -> tuple[str, int]:
        """A deterministic English-like prompt of about ``n_tokens`` tokens, and its count.

        Words are added until the count would pass ``n_tokens``; servers tokenize the same
        text with the same vocabulary, so every one of them decodes the same prompt.
        """
        source = TEXT.split()
        words: list[str] = []
        count = 0
        for i in range(100 * n_tokens):
            word = source[i % len(source)]
            size = len(self.tokenize(" ".join([*words, word])))
            if size > n_tokens:
                break
            words.append(word)
            count = size
        return " ".join(words), count

    def run(self, tokens: list[int], max_tokens: int) -> FloorRun:
        """Greedy generation of ``max_tokens`` tokens (fewer if the model ends first)."""
        llm = self._llm
        times: list[float] = []
        started = time.perf_counter()
        iterator = llm.generate(
            tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0
        )
        try:
            for token in iterator:
                times.append(time.perf_counter() - started)
                if len(times) >= max_tokens or llm.token_eos() == token:
                    break
        finally:
            iterator.close()
        return FloorRun(ttft=times[0], token_times=times)

    def close(self) -> None:
        self._llm.close()
