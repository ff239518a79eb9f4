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

import ctypes
import logging
import random
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import llama_cpp
import numpy as np
from llama_cpp.llama_grammar import LlamaGrammar

from app.backends.base import (
    FlashAttn,
    GenerationResult,
    ModelInfo,
    OnLogprobs,
    OnToken,
    SamplingParams,
    Tokenizer,
    TokenLogprobs,
)
from app.backends.grammar import check_grammar

logger = logging.getLogger(__name__)


class _Vocabulary(Protocol):
    """What ``LlamaTokenizer`` reads: a ``Llama``, or the bare ``LlamaModel`` that the batching
    backend (``app.backends.batched``) loads without a ``Llama`` around it."""

    def tokenize(self, text: bytes, add_bos: bool, special: bool) -> list[int]: ...
    def detokenize(self, tokens: list[int], *, special: bool) -> bytes: ...


class LlamaTokenizer:
    """Tokenization over the model's own vocabulary (thread-safe: it only reads the vocab)."""

    def __init__(self, llm: _Vocabulary, add_bos: bool) -> None:
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
        flash_attn: FlashAttn,
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
            # Llama takes on/off only: auto is on, which is what llama.cpp's auto resolves to
            # on CPU and CUDA devices.
            flash_attn=flash_attn != "off",
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
        n = min(int(self._llm.n_tokens), len(prompt_tokens))
        differ = np.flatnonzero(self._llm.input_ids[:n] != np.asarray(prompt_tokens[:n]))
        common = int(differ[0]) if differ.size else n
        if common == len(prompt_tokens) and common > 0 and self._llm.n_tokens != common:
            common -= 1
        return common

    def generate(
        self,
        prompt_tokens: Sequence[int],
        sampling: SamplingParams,
        max_tokens: int,
        on_token: OnToken,
        on_logprobs: OnLogprobs | None = None,
    ) -> GenerationResult:
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
        want_logprobs = on_logprobs is not None and sampling.top_logprobs is not None
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
            grammar=(
                LlamaGrammar.from_string(sampling.grammar, verbose=False)
                if sampling.grammar
                else None
            ),
        )
        try:
            for token_id in tokens:
                completion_tokens += 1
                if want_logprobs:
                    assert on_logprobs is not None and sampling.top_logprobs is not None
                    on_logprobs(self._logprobs(token_id, sampling.top_logprobs))
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

    def _logprobs(self, token_id: int, top: int) -> TokenLogprobs:
        """Log-softmax of the logits the token was sampled from (still the last ones decoded)."""
        n_vocab = self.info.n_vocab
        logits = np.ctypeslib.as_array(self._llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
        shifted = logits.astype(np.float64) - float(logits.max())
        logprobs = shifted - np.log(np.exp(shifted).sum())
        k = min(top, n_vocab)
        best = np.argpartition(-logprobs, k - 1)[:k] if k > 0 else np.arange(0)
        best = best[np.argsort(-logprobs[best], kind="stable")]
        return TokenLogprobs(
            token_id=token_id,
            logprob=float(logprobs[token_id]),
            top=tuple((int(i), float(logprobs[i])) for i in best),
        )

    def check_grammar(self, grammar: str) -> None:
        check_grammar(self._vocab, grammar)

    def close(self) -> None:
        self._llm.close()


# -- RPC: model layers on other machines ---------------------------------------------------
#
# llama-cpp-python 0.3.36 has no ``rpc_servers`` argument any more: llama.cpp turned RPC servers
# from a model parameter into ggml backend devices. Like llama.cpp's own ``--rpc`` flag, we
# register each server once per process; every model loaded afterwards with ``n_gpu_layers``
# offloads to the RPC devices first. The RPC entry point is looked up through ggml's registry
# by name, which works whether the RPC backend is linked in or loaded as a module.

_RPC_CONNECT_TIMEOUT_S = 5.0
_RpcAddServer = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)


def register_rpc_servers(endpoints: Sequence[str]) -> None:
    """Make each ``host:port`` llama.cpp RPC server a device for the models loaded after this.

    ggml aborts the whole process when it cannot connect to a server, so each one is first
    reached with a plain TCP connection and an unreachable one is an exception here instead.
    Registering a server twice is a no-op.
    """
    if not endpoints:
        return
    if not llama_cpp.llama_supports_rpc():
        raise RuntimeError("rpc_servers needs llama-cpp-python built with -DGGML_RPC=on")
    # ggml's registry through libllama's own handle: symbols looked up there resolve in the
    # libggml that libllama uses. (The wheel holds libggml.so and libggml.so.0 as two files, so
    # opening libggml by path, as llama_cpp._ggml does, loads a second copy with an empty
    # registry that model loading never sees.)
    ggml = llama_cpp.llama_cpp._lib
    ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_count.argtypes = []
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    ggml.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_reg_get.restype = ctypes.c_void_p
    ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_register.restype = None

    rpc = ggml.ggml_backend_reg_by_name(b"RPC")
    address = ggml.ggml_backend_reg_get_proc_address(rpc, b"ggml_backend_rpc_add_server")
    if not address:
        raise RuntimeError("this llama.cpp build has no ggml_backend_rpc_add_server")
    add_server = _RpcAddServer(address)
    registered = {ggml.ggml_backend_reg_get(i) for i in range(ggml.ggml_backend_reg_count())}
    for endpoint in endpoints:
        host, _, port = endpoint.partition(":")
        try:
            socket.create_connection((host, int(port)), timeout=_RPC_CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as exc:
            raise ConnectionError(f"RPC server {endpoint} is not reachable: {exc}") from exc
        server = add_server(endpoint.encode())
        if not server:
            raise RuntimeError(f"RPC server {endpoint} offers no devices")
        if server not in registered:
            ggml.ggml_backend_register(server)
            registered.add(server)
        logger.info("RPC server %s registered: model layers can go to its devices", endpoint)
