"""Backends: the protocol in ``base`` and its adapters (``llama`` is the only engine import)."""

from __future__ import annotations

from app.backends.base import (
    Backend,
    FinishReason,
    GenerationResult,
    ModelInfo,
    OnToken,
    SamplingParams,
    Tokenizer,
)

__all__ = [
    "Backend",
    "FinishReason",
    "GenerationResult",
    "ModelInfo",
    "OnToken",
    "SamplingParams",
    "Tokenizer",
]
