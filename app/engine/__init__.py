"""Backends: the protocol in ``base`` and its adapters (``llama`` is the only engine import)."""

from __future__ import annotations

from app.backends.base import (
    Backend,
    FinishReason,
    FlashAttn,
    GenerationResult,
    ModelInfo,
    OnLogprobs,
    OnToken,
    SamplingParams,
    Tokenizer,
    TokenLogprobs,
)

__all__ = [
    "Backend",
    "FinishReason",
    "FlashAttn",
    "GenerationResult",
    "ModelInfo",
    "OnLogprobs",
    "OnToken",
    "SamplingParams",
    "TokenLogprobs",
    "Tokenizer",
]
