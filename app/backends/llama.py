"""The llama-cpp-python adapter: the only module that imports ``llama_cpp``.

It wraps ``Llama.generate()``'s token iterator behind the backend protocol. ``generate()``
already keeps the KV cache of the previous request and decodes only the part of a new prompt
that differs from it (it compares the new prompt with the tokens it holds), so a multi-turn
chat re-decodes only its newest turn. We keep one ``Llama`` for the life of the process and
never call ``reset()`` ourselves for that reason.

Request fields reach the engine through ``SamplingParams`` only, argument by argument: nothing
from a client is splatted into an engine call.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp

from app.backends.base import GenerationResult, ModelInfo, OnToken, SamplingParams, Tokenizer

logger = logging.getLogger(__name__)


class LlamaTokenizer:
    """Tokenization over the model's own vocabulary (thread-safe: it only reads the vocab)."""

    def __init__(self, llm: llama_cpp.Llama, add_bos: bool) -> None:
        self._llm = llm
        self._add_bos = add_bos
        self._pieces: dict[int, bytes] = {}

    def tokenize(self, text: str) -> list[int]:
        tokens: list[int] = self._llm.tokenize(
            text.encode("utf-8"), add_bos=self._add_bos, special=True
        )
        return tokens

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = bytes(self._llm.detokenize([token_id], special=False))
            self._pieces[token_id] = piece
        return piece


class LlamaBackend:
    """One ``Llama`` context serving one generation at a time."""

    info: ModelInfo
    tokenizer: Tokenizer

    def __init__(
        self,
        model_path: Path,
        *,
        n_ctx: int,
        n_gpu_layers: int,
        n_threads: int | None,
        n_batch: int,
        flash_attn: bool,
        chat_template: str | None = None,
    ) -> None:
        gpu_offload = bool(llama_cpp.llama_supports_gpu_offload()) and n_gpu_layers != 0
        self._llm = llama_cpp.Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_gpu_layers=n_gpu_layers,
            n_threads=n_threads,
            n_batch=n_batch,
            n_ubatch=n_batch,
            flash_attn=flash_attn,
            verbose=False,
        )
        metadata: dict[str, Any] = self._llm.metadata
        vocab = self._llm._model.vocab  # the public API exposes no end-of-generation check
        self._vocab = vocab
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        bos_id = self._llm.token_bos()
        eos_id = self._llm.token_eos()
        self.info = ModelInfo(
            path=str(model_path),
            n_ctx=int(self._llm.n_ctx()),
            n_vocab=int(self._llm.n_vocab()),
            architecture=str(metadata.get("general.architecture", "unknown")),
            chat_template=chat_template or metadata.get("tokenizer.chat_template"),
            bos_token=self._token_text(bos_id),
            eos_token=self._token_text(eos_id),
            add_bos=add_bos,
            gpu_offload=gpu_offload,
        )
        self.tokenizer = LlamaTokenizer(self._llm, add_bos)
        logger.info(
            "loaded %s (%s, n_ctx=%d, vocab=%d, gpu_offload=%s)",
            model_path.name,
            self.info.architecture,
            self.info.n_ctx,
            self.info.n_vocab,
            gpu_offload,
        )

    def _token_text(self, token_id: int) -> str:
        if token_id < 0:
            return ""
        return bytes(self._llm.detokenize([token_id], special=True)).decode(
            "utf-8", errors="replace"
        )

    def _cached_prefix(self, prompt_tokens: Sequence[int]) -> int:
        """How many prompt tokens ``Llama.generate`` will reuse from the KV cache.

        It reuses the common prefix with what the context holds, minus one token when the
        whole prompt matches (that token is decoded again to refresh the logits).
        """
        held = self._llm.input_ids[: self._llm.n_tokens]
        common = 0
        for held_id, new_id in zip(held, prompt_tokens, strict=False):
            if int(held_id) != new_id:
                break
            common += 1
        if common == len(prompt_tokens) and common > 0 and self._llm.n_tokens != common:
            common -= 1
        return common

    def generate(
        self,
        prompt_tokens: Sequence[int],
        sampling: SamplingParams,
        max_tokens: int,
        on_token: OnToken,
    ) -> GenerationResult:
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
        self._llm.set_seed(seed)
        cached = self._cached_prefix(prompt_tokens)
        completion_tokens = 0
        finish: Any = "length"
        tokens = self._llm.generate(
            list(prompt_tokens),
            temp=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            repeat_penalty=sampling.repeat_penalty,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
        )
        try:
            for token_id in tokens:
                completion_tokens += 1
                if not on_token(token_id):
                    finish = "cancelled"
                    break
                if llama_cpp.llama_vocab_is_eog(self._vocab, token_id):
                    finish = "stop"
                    break
                if completion_tokens >= max_tokens:
                    finish = "length"
                    break
        finally:
            tokens.close()
        return GenerationResult(
            finish_reason=finish,
            prompt_tokens=len(prompt_tokens),
            completion_tokens=completion_tokens,
            cached_tokens=cached,
        )

    def close(self) -> None:
        self._llm.close()
