"""The engine: the backend protocol (``protocol``) and its llama.cpp adapters.

``llama_backend`` serves one generation at a time through llama-cpp-python's ``Llama``; ``batched``
decodes ``--parallel`` generations together in one context. This package is the only one that
imports ``llama_cpp``, and importing it does not: ``load_backend`` imports the adapter it needs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from app.engine.protocol import (
    Backend,
    EngineError,
    EngineFinish,
    FimTokens,
    Flow,
    GenerationResult,
    GrammarError,
    ModelInfo,
    OnLogprobs,
    OnToken,
    PromptCacheStats,
    PromptPart,
    SamplingParams,
    ThinkingBudget,
    Tokenizer,
    TokenLogprobs,
)
from app.settings import Settings

__all__ = [
    "Backend",
    "EngineError",
    "EngineFinish",
    "FimTokens",
    "Flow",
    "GenerationResult",
    "GrammarError",
    "ModelInfo",
    "OnLogprobs",
    "OnToken",
    "PromptCacheStats",
    "PromptPart",
    "SamplingParams",
    "ThinkingBudget",
    "TokenLogprobs",
    "Tokenizer",
    "check_settings",
    "load_backend",
]

logger = logging.getLogger(__name__)


def load_backend(settings: Settings, model_path: Path) -> Backend:
    """The backend the settings ask for, with the model loaded (blocking: seconds to minutes)."""
    from app.engine.batched import BatchedLlamaBackend, default_parallel
    from app.engine.llama_backend import LlamaBackend
    from app.engine.llama_setup import EngineConfig, check_kv_cache_types_of_file
    from app.engine.rpc import register_rpc_servers

    if settings.rpc_servers:
        register_rpc_servers(settings.rpc_servers.split(","))
    config = EngineConfig.from_settings(settings, model_path)
    parallel = settings.parallel or default_parallel(settings.n_gpu_layers)
    if parallel > 1:
        return BatchedLlamaBackend(config, parallel=parallel)
    if config.needs_batching_engine:
        # Llama takes no tensor overrides and has no slots to cache prompts for: one slot of
        # the batching engine serves --parallel 1 instead (as fast for a single stream).
        logger.info(
            "--parallel 1 runs on the batching engine with one slot "
            "(--cpu-moe, --n-cpu-moe, --override-tensor and --cache-ram need it)"
        )
        return BatchedLlamaBackend(config, parallel=1)
    check_kv_cache_types_of_file(config)
    return LlamaBackend(config)


def check_settings(settings: Settings) -> None:
    """What the settings ask of this llama.cpp build, checked before anything loads: a
    ValueError that names the flag (``--override-tensor`` buffer types that do not exist)."""
    from app.engine.placement import check_buffer_types, override_rules

    check_buffer_types(
        override_rules(
            override_tensor=settings.override_tensor,
            cpu_moe=settings.cpu_moe,
            n_cpu_moe=settings.n_cpu_moe,
        )
    )
