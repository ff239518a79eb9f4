"""Grammar-constrained sampling (``app.engine.sampling``) on the demo vocabulary: what is drawn
is what the grammar allows, and a grammar that allows nothing fails its generation cleanly."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt
import pytest

from app.engine import Backend, EngineError, SamplingParams
from app.engine.grammar import json_grammar
from app.engine.sampling import ConstrainedSampler

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


def _allowed(grammar: Any, logits: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    """Which tokens ``grammar`` allows next: its own pass over the whole vocabulary."""
    data = (llama_cpp.llama_token_data * len(logits))()
    view = np.frombuffer(memoryview(data), dtype=_TOKEN_DATA)
    view["id"], view["logit"], view["p"] = np.arange(len(logits)), logits, 0.0
    array = llama_cpp.llama_token_data_array(data=data, size=len(logits), selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(grammar, ctypes.byref(array))
    allowed = np.zeros(len(logits), dtype=bool)
    allowed[view["id"]] = ~np.isneginf(view["logit"])
    return allowed


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "seeded"])
def test_sample_then_check_draws_what_the_grammar_allows(
    demo_model_path: Path, greedy: bool
) -> None:
    """Both engines' grammar sampling (app.engine.sampling) against a second copy of
    the grammar that filters the whole vocabulary every step, along whole JSON objects on the
    demo vocabulary: every token is one the grammar allows; a greedy token is the best one it
    allows; a draw the grammar allows is kept as drawn, one it refuses is drawn again. Both
    cases occur."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(demo_model_path).encode(), params)
    assert model
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    text = json_grammar(None, allow_thinking=False).encode()
    sampler = ConstrainedSampler(n_vocab)
    rng = np.random.default_rng(7)
    kept = redrawn = 0
    try:
        for run in range(6):
            chain = llama_cpp.llama_sampler_chain_init(
                llama_cpp.llama_sampler_chain_default_params()
            )
            if greedy:
                llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            else:
                llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(run))
            grammar = llama_cpp.llama_sampler_init_grammar(vocab, text, b"root")
            reference = llama_cpp.llama_sampler_init_grammar(vocab, text, b"root")
            try:
                for _ in range(48):
                    logits = (rng.standard_normal(n_vocab) * 4).astype(np.float32)
                    allowed = _allowed(reference, logits)
                    if rng.random() < 0.5:  # now and then the best token is an allowed one
                        logits[rng.choice(np.flatnonzero(allowed))] = logits.max() + 10
                    best = int(np.argmax(logits))
                    token = sampler.sample(chain, grammar, logits)
                    assert allowed[token]
                    if greedy:
                        assert token == int(np.argmax(np.where(allowed, logits, -np.inf)))
                    if allowed[best]:
                        kept += token == best
                    else:
                        redrawn += 1
                    llama_cpp.llama_sampler_accept(reference, token)
                    if llama_cpp.llama_vocab_is_eog(vocab, token):
                        break
            finally:
                for s in (chain, grammar, reference):
                    llama_cpp.llama_sampler_free(s)
    finally:
        llama_cpp.llama_model_free(model)
    assert kept > 0 and redrawn > 0


class _NoTokenAllowed:
    """Fault injection: a grammar that allows no token at the first step."""

    def sample(self, chain: Any, grammar: Any, logits: Any) -> int:
        raise EngineError("the grammar allows no token at this point")


@pytest.mark.anyio
async def test_a_grammar_that_allows_no_token_fails_its_generation_without_a_token(
    demo_engine: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither engine falls back to an unconstrained token (the one-slot engine samples inside
    a llama.cpp callback, where an exception would be lost), and the engine serves on."""
    monkeypatch.setattr(demo_engine, "_constrained", _NoTokenAllowed())
    prompt = demo_engine.tokenizer.tokenize(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    shown: list[int] = []
    sampling = SamplingParams(temperature=0.0, grammar=json_grammar(None, allow_thinking=False))
    with pytest.raises(EngineError, match="allows no token"):
        await demo_engine.generate(prompt, sampling, 8, lambda t: shown.append(t) or True)
    assert shown == []
    monkeypatch.undo()
    result = await demo_engine.generate(prompt, sampling, 8, lambda t: shown.append(t) or True)
    assert result.completion_tokens == len(shown) > 0
