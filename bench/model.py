"""The random-weight *bench* models: realistic per-token cost, output that never ends.

``python -m bench.model --out PATH [--n-layer N ...]`` writes one; ``ensure_bench_model``
builds one into a cache directory once, keyed by its parameters. The weights are random F16 in
realistic ``qwen3moe`` shapes. The output rows are zero for special and non-printable tokens
and come in ``+r``/``-r`` pairs for printable ASCII tokens, so the largest logit is always
positive and greedy decoding never produces a special token or ends the generation: a
benchmark decides how many tokens to generate, not the model.

Decision: this lives in ``bench/``, beside what measures with it, and the scripted *demo*
model stays in ``app.demo`` (``make serve`` builds it). Both write through the same
GGUF helpers of ``app.demo`` (vocabulary, header and metadata, the atomic cache), so a
bench model has exactly the demo model's tokenizer, template and architecture keys. The
alternative rejected: a second GGUF writer here, which would let the two drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import gguf
import numpy as np
import numpy.typing as npt

from app.demo.cache import build_once, cache_name
from app.demo.vocab import Vocab, build_vocab, byte_table
from app.demo.writer import FloatArray, Shape, write_gguf

__all__ = [
    "PRINTABLE_BYTE_TOKENS",
    "BenchParams",
    "ensure_bench_model",
    "main",
    "random_prompt",
    "write_bench_model",
]

logger = logging.getLogger(__name__)

# One shared pool of N(0, WEIGHT_STD) values, sliced at random offsets; logits of std LOGIT_STD.
WEIGHT_STD: Final = 0.02
LOGIT_STD: Final = 10.0

PRINTABLE_BYTE_TOKENS: Final = 94
"""Token ids 0..93 of a bench model's vocabulary are the bytes ``!``..``~`` (GPT-2 order)."""


def random_prompt(rng: random.Random, n_tokens: int) -> list[int]:
    """``n_tokens`` random printable-byte token ids: a prompt that shares no cacheable prefix
    with another one (two agree on their first three tokens once in 94**3)."""
    return [rng.randrange(PRINTABLE_BYTE_TOKENS) for _ in range(n_tokens)]


@dataclass(frozen=True)
class BenchParams:
    """The keyword arguments of ``write_bench_model``, as one hashable value for cache keys."""

    n_layer: int = 12
    n_embd: int = 1024
    n_expert: int = 32
    n_expert_used: int = 8
    n_ff_exp: int = 512
    n_head: int = 16
    n_head_kv: int = 4
    head_dim: int = 64
    n_ctx: int = 4096
    seed: int = 0

    def shape(self) -> Shape:
        return Shape(
            n_layer=self.n_layer,
            n_embd=self.n_embd,
            n_expert=self.n_expert,
            n_expert_used=self.n_expert_used,
            n_ff_exp=self.n_ff_exp,
            n_head=self.n_head,
            n_head_kv=self.n_head_kv,
            head_dim=self.head_dim,
            n_ctx=self.n_ctx,
        )


def _bench_tensors(
    vocab: Vocab, shape: Shape, seed: int
) -> list[tuple[str, npt.NDArray[np.float16] | FloatArray]]:
    """Random F16 weights; output rows chosen so greedy decoding stays on printable ASCII."""
    rng = np.random.default_rng(seed)
    n_vocab, n_embd = len(vocab.tokens), shape.n_embd
    q_dim, kv_dim = shape.n_head * shape.head_dim, shape.n_head_kv * shape.head_dim
    largest = max(shape.n_expert * shape.n_ff_exp * n_embd, q_dim * n_embd)
    # Drawing a billion normals would take minutes; views of one shared pool at random offsets
    # cost nothing and keep the matrices of a layer unrelated to each other.
    pool = (rng.standard_normal(2 * largest, dtype=np.float32) * WEIGHT_STD).astype(np.float16)

    def random(*dims: int) -> npt.NDArray[np.float16]:
        size = math.prod(dims)
        start = int(rng.integers(0, pool.size - size + 1))
        return pool[start : start + size].reshape(dims)

    table = byte_table()
    printable_chars = {table[byte] for byte in range(0x20, 0x7F)}
    printable = [
        index
        for index, (text, token_type) in enumerate(
            zip(vocab.tokens, vocab.token_types, strict=True)
        )
        if token_type == gguf.TokenType.NORMAL and set(text) <= printable_chars
    ]
    rng.shuffle(printable)
    output = np.zeros((n_vocab, n_embd), dtype=np.float16)
    pairs = len(printable) // 2
    rows = rng.standard_normal((pairs, n_embd)) * (LOGIT_STD / math.sqrt(n_embd))
    output[printable[:pairs]] = rows.astype(np.float16)
    output[printable[pairs : 2 * pairs]] = -rows.astype(np.float16)

    def ones(size: int) -> FloatArray:
        return np.ones(size, dtype=np.float32)

    token_embd = rng.standard_normal((n_vocab, n_embd), dtype=np.float32).astype(np.float16)
    tensors: list[tuple[str, npt.NDArray[np.float16] | FloatArray]] = [
        ("token_embd.weight", token_embd),
        ("output_norm.weight", ones(n_embd)),
        ("output.weight", output),
    ]
    for layer in range(shape.n_layer):
        prefix = f"blk.{layer}."
        tensors += [
            (prefix + "attn_norm.weight", ones(n_embd)),
            (prefix + "attn_q.weight", random(q_dim, n_embd)),
            (prefix + "attn_k.weight", random(kv_dim, n_embd)),
            (prefix + "attn_v.weight", random(kv_dim, n_embd)),
            (prefix + "attn_output.weight", random(n_embd, q_dim)),
            (prefix + "attn_q_norm.weight", ones(shape.head_dim)),
            (prefix + "attn_k_norm.weight", ones(shape.head_dim)),
            (prefix + "ffn_norm.weight", ones(n_embd)),
            (prefix + "ffn_gate_inp.weight", random(shape.n_expert, n_embd)),
            (prefix + "ffn_gate_exps.weight", random(shape.n_expert, shape.n_ff_exp, n_embd)),
            (prefix + "ffn_up_exps.weight", random(shape.n_expert, shape.n_ff_exp, n_embd)),
            (prefix + "ffn_down_exps.weight", random(shape.n_expert, n_embd, shape.n_ff_exp)),
        ]
    return tensors


def write_bench_model(
    path: Path,
    *,
    n_layer: int = 12,
    n_embd: int = 1024,
    n_expert: int = 32,
    n_expert_used: int = 8,
    n_ff_exp: int = 512,
    n_head: int = 16,
    n_head_kv: int = 4,
    head_dim: int = 64,
    n_ctx: int = 4096,
    seed: int = 0,
) -> Path:
    """Write a random-weight model for timing: realistic per-token cost, printable output.

    Greedy decoding emits printable ASCII forever (no EOS, no special token), so a benchmark
    decides how many tokens to generate, not the model. Returns ``path``.
    """
    shape = BenchParams(
        n_layer=n_layer,
        n_embd=n_embd,
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        n_ff_exp=n_ff_exp,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ctx=n_ctx,
        seed=seed,
    ).shape()
    shape.check()
    vocab = build_vocab(())
    return write_gguf(
        path,
        name="Qwen3-MoE bench (random)",
        shape=shape,
        vocab=vocab,
        tensors=_bench_tensors(vocab, shape, seed),
        file_type=gguf.LlamaFileType.MOSTLY_F16,
    )


def ensure_bench_model(cache_dir: Path, **params: int) -> Path:
    """Return the bench model for ``params`` (``write_bench_model``'s keywords), cached."""
    bench = dataclasses.replace(BenchParams(), **params)
    bench.shape().check()
    name = cache_name("bench", dataclasses.asdict(bench))
    return build_once(
        cache_dir / name, lambda path: write_bench_model(path, **dataclasses.asdict(bench))
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.model --out PATH [--n-layer N ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.model", description="Write a random-weight bench model."
    )
    parser.add_argument("--out", type=Path, required=True, help="GGUF file to write")
    defaults = BenchParams()
    for field in dataclasses.fields(BenchParams):
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=int,
            default=getattr(defaults, field.name),
            help=f"{field.name} (default %(default)s)",
        )
    args = parser.parse_args(argv)
    params = {field.name: getattr(args, field.name) for field in dataclasses.fields(BenchParams)}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    path = write_bench_model(args.out, **params)
    logger.info(
        "wrote %s (%.1f MB) in %.2f s",
        path,
        path.stat().st_size / 1e6,
        time.perf_counter() - started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
