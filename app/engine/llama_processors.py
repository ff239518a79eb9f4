"""``Llama``'s logits processors for what both engines do: the request's logit biases, a
thinking budget's forced token, and grammar-constrained sampling.

The batching engine puts these in its own sampler chain (``app.engine.sampling``); ``Llama``
builds its chain itself, so the one-slot engine reaches it through the logits it is given. A
forced token or the grammar's choice leaves every other token at -inf, so ``Llama``'s chain
(penalties included) takes and accepts it as if sampled.
"""

from __future__ import annotations

import logging
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp.llama import LogitsProcessorList

from app.engine.protocol import EngineError
from app.engine.sampling import ConstrainedSampler
from app.engine.thinking_limit import BudgetTracker

logger = logging.getLogger(__name__)


def logits_processors(
    logit_bias: tuple[tuple[int, float], ...],
    budget: BudgetTracker | None,
    grammar: GrammarProcessor | None,
) -> LogitsProcessorList | None:
    """What ``Llama`` runs on the logits before its sampler chain: the request's logit biases
    (the batching backend puts llama.cpp's logit-bias sampler first in its chain), then a
    thinking budget's forced token, then the grammar's choice."""
    processors: list[Any] = []
    if logit_bias:
        processors.append(BiasProcessor(logit_bias))
    if budget is not None:
        processors.append(ForcingProcessor(budget))
    if grammar is not None:
        processors.append(grammar)
    return LogitsProcessorList(processors) if processors else None


class GrammarProcessor:
    """A logits processor that samples the token itself, grammar-constrained, and leaves only
    that token to ``Llama``'s chain. It runs inside a llama.cpp callback, where an exception
    would be printed and lost, so a failure is kept in ``error`` for the engine thread."""

    def __init__(self, sampler: ConstrainedSampler, chain: Any, grammar: Any) -> None:
        self._sampler = sampler
        self._chain = chain
        self._grammar = grammar
        self.error: EngineError | None = None

    def __call__(
        self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]
    ) -> npt.NDArray[np.single]:
        if self.error is not None:
            return scores
        try:
            token = self._sampler.sample(self._chain, self._grammar, scores)
        except EngineError as exc:
            self.error = exc
            return scores
        except Exception as exc:  # a bug: still never an unconstrained token
            logger.exception("grammar sampling failed")
            self.error = EngineError("the inference engine failed")
            self.error.__cause__ = exc
            return scores
        only = np.full_like(scores, -np.inf)
        only[token] = 0.0
        return only

    def free(self) -> None:
        llama_cpp.llama_sampler_free(self._chain)
        llama_cpp.llama_sampler_free(self._grammar)


class BiasProcessor:
    """A logits processor that adds the request's logit biases."""

    def __init__(self, logit_bias: tuple[tuple[int, float], ...]) -> None:
        self._ids = np.array([token_id for token_id, _ in logit_bias], dtype=np.intp)
        self._biases = np.array([bias for _, bias in logit_bias], dtype=np.float32)

    def __call__(
        self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]
    ) -> npt.NDArray[np.single]:
        scores[self._ids] += self._biases
        return scores


class ForcingProcessor:
    """A logits processor that leaves only the budget's forced token, when it has one."""

    def __init__(self, budget: BudgetTracker) -> None:
        self._budget = budget

    def __call__(
        self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]
    ) -> npt.NDArray[np.single]:
        forced = self._budget.forced()
        if forced is None:
            return scores
        only = np.full_like(scores, -np.inf)
        only[forced] = 0.0
        return only
