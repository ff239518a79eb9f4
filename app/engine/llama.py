"""What both llama.cpp backends share: the load configuration, the model's facts, its
tokenizer and logprobs.

Both backends take an ``EngineConfig`` built once from the settings (threads and defaults are
decided here, not in each backend), read the same ``ModelInfo`` off the loaded model, tokenize
through the same ``LlamaTokenizer`` and compute logprobs with the same function, so the one
request-at-a-time backend and the batching one cannot drift apart.
"""

from __future__ import annotations

import logging
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp import _internals

from app.engine.protocol import ModelInfo, TokenLogprobs
from app.settings import FlashAttn, Settings

logger = logging.getLogger(__name__)

Logits = npt.NDArray[np.float32]

_FLASH_ATTN_TYPES = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


@dataclass(frozen=True)
class EngineConfig:
    """How to load the model and size its context, in llama.cpp's terms."""

    model_path: Path
    n_ctx: int
    """Tokens per generation (per slot when batching); 0: the model's training context."""
    n_gpu_layers: int
    n_threads: int
    """Threads for single-token decode steps."""
    n_threads_batch: int
    """Threads for steps of several tokens (prompts, and every batched step)."""
    n_batch: int
    flash_attn: FlashAttn
    kv_unified: bool = False
    """One KV buffer for every sequence (else one stream per sequence)."""
    chat_template: str | None = None
    """Replaces the GGUF's ``tokenizer.chat_template`` when set."""

    @classmethod
    def from_settings(cls, settings: Settings, model_path: Path) -> EngineConfig:
        cpus = multiprocessing.cpu_count()
        template = (
            settings.chat_template_file.read_text(encoding="utf-8")
            if settings.chat_template_file is not None
            else None
        )
        # An explicit thread count applies to both kinds of step; by default llama.cpp's
        # choice (as Llama's): half the cores for single tokens, all of them for batches.
        return cls(
            model_path=model_path,
            n_ctx=settings.n_ctx,
            n_gpu_layers=settings.n_gpu_layers,
            n_threads=settings.n_threads or max(cpus // 2, 1),
            n_threads_batch=settings.n_threads or cpus,
            n_batch=settings.n_batch,
            flash_attn=settings.flash_attn,
            kv_unified=settings.kv_unified,
            chat_template=template,
        )

    @property
    def gpu_offload(self) -> bool:
        """Layers go to a GPU (or RPC device): the build has one and they are not kept off it."""
        return bool(llama_cpp.llama_supports_gpu_offload()) and self.n_gpu_layers != 0

    def model_params(self) -> Any:
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0x7FFFFFFF if self.n_gpu_layers == -1 else self.n_gpu_layers
        return params

    def context_params(self, *, n_ctx: int, n_batch: int, n_seq_max: int) -> Any:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.kv_unified = self.kv_unified
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads_batch
        params.flash_attn_type = _FLASH_ATTN_TYPES[self.flash_attn]
        return params


def quiet_llama_log() -> None:
    """llama.cpp's own log stays quiet below errors (as ``Llama(verbose=False)`` makes it)."""
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


def load_model(config: EngineConfig) -> Any:
    """The model weights (``_internals.LlamaModel``), placed as ``config`` says."""
    quiet_llama_log()
    llama_cpp.llama_backend_init()
    return _internals.LlamaModel(
        path_model=str(config.model_path), params=config.model_params(), verbose=False
    )


def model_info(model: Any, config: EngineConfig, *, n_ctx: int) -> ModelInfo:
    """The facts the service needs about a loaded ``LlamaModel``."""
    metadata: dict[str, str] = model.metadata()
    return ModelInfo(
        path=str(config.model_path),
        n_ctx=n_ctx,
        n_vocab=int(model.n_vocab()),
        architecture=str(metadata.get("general.architecture", "unknown")),
        chat_template=config.chat_template or metadata.get("tokenizer.chat_template"),
        bos_token=token_text(model, int(model.token_bos())),
        eos_token=token_text(model, int(model.token_eos())),
        gpu_offload=config.gpu_offload,
    )


def token_text(model: Any, token_id: int) -> str:
    """A token's text with special tokens shown (for the chat template's bos/eos)."""
    if token_id < 0:
        return ""
    return bytes(model.detokenize([token_id], special=True)).decode("utf-8", errors="replace")


class LlamaTokenizer:
    """Tokenization over the model's own vocabulary (thread-safe: it only reads the vocab)."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(model.vocab))
        self._pieces: dict[int, bytes] = {}

    def tokenize(self, text: str) -> list[int]:
        tokens: list[int] = self._model.tokenize(
            text.encode("utf-8"), add_bos=self._add_bos, special=True
        )
        return tokens

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = bytes(self._model.detokenize([token_id], special=False))
            self._pieces[token_id] = piece
        return piece


def logprobs_of(logits: Logits, token_id: int, top: int) -> TokenLogprobs:
    """Log-softmax of the raw logits a token was sampled from, and its ``top`` best."""
    shifted = logits.astype(np.float64) - float(logits.max())
    logprobs = shifted - np.log(np.exp(shifted).sum())
    k = min(top, len(logprobs))
    best = np.argpartition(-logprobs, k - 1)[:k] if k > 0 else np.arange(0)
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return TokenLogprobs(
        token_id=token_id,
        logprob=float(logprobs[token_id]),
        top=tuple((int(i), float(logprobs[i])) for i in best),
    )
