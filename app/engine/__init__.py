"""The engine: the backend protocol (``protocol``) and its llama.cpp adapters.

``single`` serves one generation at a time through llama-cpp-python's ``Llama``; ``batched``
decodes ``--parallel`` generations together in one context. This package is the only one that
imports ``llama_cpp``, and importing it does not: ``load_backend`` imports the adapter it needs.
"""

from __future__ import annotations

from pathlib import Path

from app.engine.protocol import (
    Backend,
    EngineError,
    EngineFinish,
    Flow,
    GenerationResult,
    GrammarError,
    ModelInfo,
    OnLogprobs,
    OnToken,
    PromptPart,
    SamplingParams,
    Tokenizer,
    TokenLogprobs,
)
from app.settings import Settings

__all__ = [
    "Backend",
    "EngineError",
    "EngineFinish",
    "Flow",
    "GenerationResult",
    "GrammarError",
    "ModelInfo",
    "OnLogprobs",
    "OnToken",
    "PromptPart",
    "SamplingParams",
    "TokenLogprobs",
    "Tokenizer",
    "load_backend",
]


def load_backend(settings: Settings, model_path: Path) -> Backend:
    """The backend the settings ask for, with the model loaded (blocking: seconds to minutes)."""
    from app.engine.batched import BatchedLlamaBackend, default_parallel
    from app.engine.llama import EngineConfig
    from app.engine.rpc import register_rpc_servers
    from app.engine.single import LlamaBackend

    if settings.rpc_servers:
        register_rpc_servers(settings.rpc_servers.split(","))
    config = EngineConfig.from_settings(settings, model_path)
    parallel = settings.parallel or default_parallel(settings.n_gpu_layers)
    if parallel > 1:
        return BatchedLlamaBackend(config, parallel=parallel)
    return LlamaBackend(config)
