"""What both llama.cpp backends share: the load configuration, the model's facts and logprobs
(and their tokenizer, ``app.engine.tokenizer``).

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
from typing import Any, NamedTuple

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp import _internals

from app.engine.placement import OverrideRule, Placement, captured_llama_log, override_rules
from app.engine.protocol import EngineFinish, ModelInfo, TokenLogprobs
from app.settings import UNQUANTIZED_KV_TYPES, FlashAttn, KvCacheType, Settings

logger = logging.getLogger(__name__)

Logits = npt.NDArray[np.float32]

_FLASH_ATTN_TYPES = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


class KvType(NamedTuple):
    """A KV cache data type: ggml's id, and its storage (``block`` values in ``block_bytes``)."""

    ggml_type: int
    block: int
    block_bytes: int


KV_TYPES: dict[KvCacheType, KvType] = {
    "f32": KvType(llama_cpp.GGML_TYPE_F32, 1, 4),
    "f16": KvType(llama_cpp.GGML_TYPE_F16, 1, 2),
    "bf16": KvType(30, 1, 2),  # GGML_TYPE_BF16, which llama_cpp does not export
    "q8_0": KvType(llama_cpp.GGML_TYPE_Q8_0, 32, 34),
    "q4_0": KvType(llama_cpp.GGML_TYPE_Q4_0, 32, 18),
    "q4_1": KvType(llama_cpp.GGML_TYPE_Q4_1, 32, 20),
    "iq4_nl": KvType(llama_cpp.GGML_TYPE_IQ4_NL, 32, 18),
    "q5_0": KvType(llama_cpp.GGML_TYPE_Q5_0, 32, 22),
    "q5_1": KvType(llama_cpp.GGML_TYPE_Q5_1, 32, 24),
}
"""ggml's sizes (``ggml_blck_size``, ``ggml_type_size``) of the types --cache-type-k/-v take."""


def kv_cache_bytes(
    *,
    n_layer: int,
    n_head_kv: int,
    head_dim: int,
    cells: int,
    type_k: KvCacheType = "f16",
    type_v: KvCacheType = "f16",
) -> int:
    """Bytes of a KV cache of ``cells`` tokens: K and V, one row of ``n_head_kv * head_dim``
    values per token and layer, each row stored in the type's blocks."""
    row = n_head_kv * head_dim
    per_token = sum(
        row // KV_TYPES[name].block * KV_TYPES[name].block_bytes for name in (type_k, type_v)
    )
    return n_layer * cells * per_token


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
    n_ubatch: int | None = None
    """The physical micro-batch; None: ``n_batch``."""
    kv_unified: bool = False
    """One KV buffer for every sequence (else one stream per sequence)."""
    chat_template: str | None = None
    """Replaces the GGUF's ``tokenizer.chat_template`` when set."""
    tensor_overrides: tuple[OverrideRule, ...] = ()
    """Buffer types for the tensors whose names match (``app.engine.placement``)."""
    cache_type_k: KvCacheType = "f16"
    cache_type_v: KvCacheType = "f16"
    prompt_cache_mib: int | None = 0
    """Host-RAM prompt cache (``--cache-ram``): MiB, -1 unlimited, 0 off, None: sized from
    the host memory available once the model has loaded (``app.engine.host_memory``)."""

    prompt_cache_dir: Path | None = None
    """Where the prompt cache is written on close and read back at start (None: not kept)."""
    cache_reuse: int = 0
    """Shortest run of tokens moved to a new position instead of decoded again; 0: off."""

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
            n_ubatch=settings.n_ubatch,
            flash_attn=settings.flash_attn,
            kv_unified=settings.kv_unified,
            chat_template=template,
            tensor_overrides=override_rules(
                override_tensor=settings.override_tensor,
                cpu_moe=settings.cpu_moe,
                n_cpu_moe=settings.n_cpu_moe,
            ),
            cache_type_k=settings.cache_type_k,
            cache_type_v=settings.cache_type_v,
            prompt_cache_mib=None if settings.cache_ram == "auto" else settings.cache_ram,
            prompt_cache_dir=settings.prompt_cache_dir,
            cache_reuse=settings.cache_reuse,
        )

    @property
    def needs_batching_engine(self) -> bool:
        """Knobs only the batching engine has: model parameters ``Llama`` cannot take
        (tensor overrides), and the host-RAM prompt cache, which lives in its slot placement."""
        return bool(self.tensor_overrides) or self.prompt_cache_mib != 0

    @property
    def gpu_offload(self) -> bool:
        """Layers go to a GPU (or RPC device): the build has one and they are not kept off it."""
        return bool(llama_cpp.llama_supports_gpu_offload()) and self.n_gpu_layers != 0

    def model_params(self, placement: Placement | None = None) -> Any:
        """The one place model parameters are built; ``placement`` (which the caller keeps
        alive for the model's life) adds the tensor overrides."""
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0x7FFFFFFF if self.n_gpu_layers == -1 else self.n_gpu_layers
        return placement.apply(params) if placement is not None else params

    def micro_batch(self, n_batch: int) -> int:
        """The physical micro-batch for a logical batch of ``n_batch``: ``n_ubatch``, at most
        ``n_batch``."""
        return min(self.n_ubatch or n_batch, n_batch)

    def context_params(self, *, n_ctx: int, n_batch: int, n_seq_max: int) -> Any:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = self.micro_batch(n_batch)
        params.n_seq_max = n_seq_max
        params.kv_unified = self.kv_unified
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads_batch
        params.flash_attn_type = _FLASH_ATTN_TYPES[self.flash_attn]
        params.type_k = KV_TYPES[self.cache_type_k].ggml_type
        params.type_v = KV_TYPES[self.cache_type_v].ggml_type
        return params


def quiet_llama_log() -> None:
    """llama.cpp's own log stays quiet below errors (as ``Llama(verbose=False)`` makes it)."""
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


def load_model(config: EngineConfig) -> tuple[Any, Placement]:
    """The model weights (``_internals.LlamaModel``), placed as ``config`` says, and the
    ``Placement`` to keep with it (what llama.cpp reported doing with the tensor overrides)."""
    quiet_llama_log()
    llama_cpp.llama_backend_init()
    placement = Placement(config.tensor_overrides)
    with captured_llama_log() as log:
        try:
            model = _internals.LlamaModel(
                path_model=str(config.model_path),
                params=config.model_params(placement),
                verbose=False,
            )
        except ValueError as exc:
            if not config.tensor_overrides:
                raise
            # A rule llama.cpp could not apply (a regex its std::regex rejects, say): say so.
            said = " ".join(line.strip() for line in log if "error" in line.lower())
            raise ValueError(
                f"{config.model_path.name} did not load with the tensor overrides "
                f"(--override-tensor, --cpu-moe, --n-cpu-moe) {list(config.tensor_overrides)}; "
                f"llama.cpp said: {said or 'nothing'}"
            ) from exc
    placement.record(log)
    check_kv_cache_types(model, config)
    return model, placement


def head_dims(model: Any) -> tuple[int, int]:
    """The model's K and V head sizes, from its GGUF metadata (``attention.key_length`` and
    ``value_length``, else ``embedding_length / attention.head_count``, as llama.cpp defaults
    them): readable from a model loaded with ``vocab_only``, whose hyperparameters are not."""
    metadata: dict[str, str] = model.metadata()
    arch = metadata.get("general.architecture", "")
    n_head = max(int(metadata.get(f"{arch}.attention.head_count", 1)), 1)
    default = int(metadata.get(f"{arch}.embedding_length", 0)) // n_head
    k = int(metadata.get(f"{arch}.attention.key_length", default))
    v = int(metadata.get(f"{arch}.attention.value_length", default))
    return k, v


def check_kv_cache_types(model: Any, config: EngineConfig) -> None:
    """A quantized KV type stores a head's values in blocks that must divide the head size;
    llama.cpp would refuse the context without saying which flag to change."""
    for flag, name, dim in zip(
        ("--cache-type-k", "--cache-type-v"),
        (config.cache_type_k, config.cache_type_v),
        head_dims(model),
        strict=True,
    ):
        block = KV_TYPES[name].block
        if dim % block:
            raise ValueError(
                f"{flag} {name}: its blocks of {block} values do not divide this model's "
                f"head size {dim}; use f16, bf16 or f32"
            )


def check_kv_cache_types_of_file(config: EngineConfig) -> None:
    """``check_kv_cache_types`` from the GGUF's vocabulary and hyperparameters alone (no
    tensors read), for the engine that loads the model through ``Llama``."""
    if {config.cache_type_k, config.cache_type_v} <= set(UNQUANTIZED_KV_TYPES):
        return
    quiet_llama_log()
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    probe: Any = _internals.LlamaModel(
        path_model=str(config.model_path), params=params, verbose=False
    )
    try:
        check_kv_cache_types(probe, config)
    finally:
        probe.close()


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


def logits_row(ctx: Any, index: int, n_vocab: int) -> Logits:
    """Batch row ``index``'s logits in ``ctx`` (-1: the last row), as a view."""
    row = llama_cpp.llama_get_logits_ith(ctx, index)
    return np.ctypeslib.as_array(row, shape=(n_vocab,))


def finish_of(vocab: Any, token_id: int, sampled: int, max_tokens: int) -> EngineFinish | None:
    """Why a generation ends at the token it just sampled (its ``sampled``-th), if it does."""
    if llama_cpp.llama_vocab_is_eog(vocab, token_id):
        return "stop"
    if sampled >= max_tokens:
        return "length"
    return None


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
