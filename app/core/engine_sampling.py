"""A request's sampling in engine terms: each field mapped, unset ones llama.cpp's defaults.

Nothing from a client is splatted into an engine call; a ``logit_bias`` naming a token
outside the vocabulary is a 400.
"""

from __future__ import annotations

from app.core.requests import Sampling
from app.engine import SamplingParams
from app.errors import InvalidRequest

DEFAULTS = SamplingParams()


def sampling_params(
    asked: Sampling,
    *,
    n_vocab: int,
    grammar: str | None = None,
    top_logprobs: int | None = None,
) -> SamplingParams:
    d = DEFAULTS
    return SamplingParams(
        temperature=d.temperature if asked.temperature is None else asked.temperature,
        top_p=d.top_p if asked.top_p is None else asked.top_p,
        top_k=d.top_k if asked.top_k is None else asked.top_k,
        min_p=d.min_p if asked.min_p is None else asked.min_p,
        repeat_penalty=d.repeat_penalty if asked.repeat_penalty is None else asked.repeat_penalty,
        presence_penalty=(
            d.presence_penalty if asked.presence_penalty is None else asked.presence_penalty
        ),
        frequency_penalty=(
            d.frequency_penalty if asked.frequency_penalty is None else asked.frequency_penalty
        ),
        seed=asked.seed,
        grammar=grammar,
        top_logprobs=top_logprobs,
        logit_bias=checked_logit_bias(asked.logit_bias, n_vocab),
    )


def checked_logit_bias(
    pairs: tuple[tuple[int, float], ...], n_vocab: int
) -> tuple[tuple[int, float], ...]:
    """The pairs, every token id in the vocabulary."""
    for token_id, _ in pairs:
        if token_id >= n_vocab:
            raise InvalidRequest(
                f"logit_bias names token {token_id}; token ids are in [0, {n_vocab}).",
                param=f"logit_bias.{token_id}",
                code="invalid_value",
            )
    return pairs
