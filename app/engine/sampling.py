"""Sampling for both engines: a request's sampler chain, and grammar-constrained sampling as
llama.cpp's own server does it, sample then check.

The chain is the one ``Llama._init_sampler`` builds (logit biases, penalties, then greedy or
top-k/top-p/min-p/temperature/``dist(seed)``) with the request's own seed, so one request's seed
decides only its own tokens. The grammar is kept beside the chain, not in it: a grammar sampler
inside the chain tests the whole vocabulary at every step, and the batching scheduler samples
its streams one after another. Here the chain draws, the grammar checks that one token, and
only a refused token costs the full pass: the logits are filtered by the grammar and the token
drawn again (``common_sampler_sample`` in llama.cpp's ``common/sampling.cpp``; what it saves:
docs/api.md, the grammar limit). Greedy takes the same token either way; a random sampler
draws from the same constrained distribution.
"""

from __future__ import annotations

import ctypes
import math
import random
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt

from app.engine.protocol import EngineError, SamplingParams

PENALTY_LAST_N = 64
"""Tokens the repetition penalties look back on: ``Llama``'s ``last_n_tokens_size`` default,
so both backends penalise alike."""


def request_seed(sampling: SamplingParams) -> int:
    """The request's seed, or a random one, as llama.cpp takes it (32 bits)."""
    seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
    return seed & 0xFFFFFFFF


def new_samplers(
    vocab: Any, n_vocab: int, sampling: SamplingParams, *, logit_bias: bool = True
) -> tuple[Any, Any]:
    """The request's sampler chain, without its grammar (``logit_bias``: with its logit biases
    first, as ``Llama`` runs its logits processors first), and the grammar's own sampler (None
    without one). A grammar llama.cpp cannot parse is an ``EngineError``."""
    grammar = None
    if sampling.grammar:
        grammar = llama_cpp.llama_sampler_init_grammar(
            vocab, sampling.grammar.encode("utf-8"), b"root"
        )
        if not grammar:  # NULL: a ctypes pointer that is falsy, never None
            raise EngineError("the grammar could not be parsed")
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    if logit_bias and sampling.logit_bias:
        biases = (llama_cpp.llama_logit_bias * len(sampling.logit_bias))()
        for entry, (token_id, bias) in zip(biases, sampling.logit_bias, strict=True):
            entry.token, entry.bias = token_id, bias
        add(
            chain,
            llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(sampling.logit_bias), biases),
        )
    add(
        chain,
        llama_cpp.llama_sampler_init_penalties(
            n_vocab,
            PENALTY_LAST_N,
            sampling.repeat_penalty,
            sampling.frequency_penalty,
            sampling.presence_penalty,
        ),
    )
    if sampling.greedy:
        add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain, grammar
    seed = request_seed(sampling)
    add(chain, llama_cpp.llama_sampler_init_top_k(sampling.top_k))
    add(chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
    add(chain, llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1))
    add(chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
    add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain, grammar


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
"""``llama_token_data``: the layout of one candidate."""


class ConstrainedSampler:
    """Sample-then-check over one vocabulary, with buffers reused from step to step (one
    thread only: the engine's, the batching scheduler or the one-slot engine thread)."""

    def __init__(self, n_vocab: int) -> None:
        self._n_vocab = n_vocab
        self._candidates = (llama_cpp.llama_token_data * n_vocab)()
        self._view = np.frombuffer(memoryview(self._candidates), dtype=_TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._one = (llama_cpp.llama_token_data * 1)()

    def sample(self, chain: Any, grammar: Any, logits: npt.NDArray[np.float32]) -> int:
        """The token for one row of logits: drawn by ``chain`` (which holds no grammar), kept
        when ``grammar`` allows it, else drawn again from what the grammar allows; accepted by
        both samplers. A grammar that allows no token at all fails the generation."""
        token, _ = self._draw(logits, chain)
        if not self._allows(grammar, token):
            token, logit = self._draw(logits, grammar, chain)
            if logit == -math.inf:
                raise EngineError("the grammar allows no token at this point")
        llama_cpp.llama_sampler_accept(grammar, token)
        llama_cpp.llama_sampler_accept(chain, token)
        return token

    def _draw(self, logits: npt.NDArray[np.float32], *samplers: Any) -> tuple[int, float]:
        """Every token as a candidate, through ``samplers`` in turn: the selected one and its
        logit after them."""
        view = self._view
        view["id"] = self._ids  # samplers sort and cut the array in place
        view["logit"] = logits
        view["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            data=self._candidates, size=self._n_vocab, selected=-1, sorted=False
        )
        for sampler in samplers:
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise EngineError("the sampler selected no token")
        chosen = array.data[array.selected]
        return int(chosen.id), float(chosen.logit)

    def _allows(self, grammar: Any, token: int) -> bool:
        one = self._one
        one[0] = llama_cpp.llama_token_data(token, 0.0, 0.0)
        array = llama_cpp.llama_token_data_array(data=one, size=1, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(array))
        return not math.isinf(one[0].logit)
