"""One ``qwen3moe`` GGUF file: its shape, header, metadata, tokenizer, chat template, tensors.

The one GGUF writer of the project: the scripted demo model and the random bench models
(``bench.model``) both write through ``write_gguf``, so they share one set of architecture
keys, one tokenizer and the packaged chat templates byte for byte. A second writer beside the
bench would let the two drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import gguf
import numpy as np
import numpy.typing as npt

from app.demo.vocab import BOS_TEXT, EOS_TEXT, PAD_TEXT, Vocab

__all__ = [
    "ARCHITECTURE",
    "TEMPLATE_PATHS",
    "ChatTemplateName",
    "FloatArray",
    "Shape",
    "chat_template",
    "write_gguf",
]

ARCHITECTURE: Final = "qwen3moe"

ChatTemplateName = Literal["qwen3", "qwen3_coder"]
"""The chat templates packaged in ``app/``: Qwen3's and Qwen3-Coder's, byte for byte."""
_APP_DIR: Final = Path(__file__).resolve().parents[1]
TEMPLATE_PATHS: Final[dict[ChatTemplateName, Path]] = {
    "qwen3": _APP_DIR / "qwen3_chat_template.jinja",
    "qwen3_coder": _APP_DIR / "qwen3_coder_chat_template.jinja",
}

FloatArray = npt.NDArray[np.float32]
Tensor = npt.NDArray[np.float32] | npt.NDArray[np.float16]

# Part of the file's bytes, so part of every cache key (app.demo.cache): it keeps the text it
# was written with, since changing it would rename every cached model.
_DESCRIPTION: Final = (
    "Synthetic model built by app.demo_model for tests and benchmarks; not a trained model."
)


@dataclass(frozen=True)
class Shape:
    """Hyperparameters shared by both kinds of model (the qwen3moe GGUF keys)."""

    n_layer: int
    n_embd: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int

    def check(self) -> None:
        """Reject shapes llama.cpp would refuse to load, with a message naming the field."""
        for field in dataclasses.fields(self):
            if getattr(self, field.name) <= 0:
                raise ValueError(f"{field.name} must be positive")
        if self.n_head % self.n_head_kv:
            raise ValueError("n_head must be a multiple of n_head_kv")
        if self.n_expert_used > self.n_expert:
            raise ValueError("n_expert_used must not exceed n_expert")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even (rope rotates pairs)")


def chat_template(template: ChatTemplateName = "qwen3") -> str:
    """The packaged chat template's text, exactly as the file holds it."""
    # Bytes, not read_text(): universal newlines would change the template the GGUF carries.
    return TEMPLATE_PATHS[template].read_bytes().decode("utf-8")


def write_gguf(
    path: Path,
    *,
    name: str,
    shape: Shape,
    vocab: Vocab,
    tensors: Sequence[tuple[str, Tensor]],
    file_type: gguf.LlamaFileType,
    template: ChatTemplateName = "qwen3",
) -> Path:
    """Write the header, metadata and tensors of one qwen3moe GGUF file; returns ``path``."""
    shape.check()
    writer = gguf.GGUFWriter(path, ARCHITECTURE)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_description(_DESCRIPTION)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_context_length(shape.n_ctx)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff_exp * shape.n_expert_used)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_expert_count(shape.n_expert)
    writer.add_expert_used_count(shape.n_expert_used)
    writer.add_expert_feed_forward_length(shape.n_ff_exp)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_types(list(vocab.token_types))
    writer.add_token_merges(list(vocab.merges))
    writer.add_eos_token_id(vocab.ids[EOS_TEXT])
    writer.add_bos_token_id(vocab.ids[BOS_TEXT])
    writer.add_pad_token_id(vocab.ids[PAD_TEXT])
    writer.add_add_bos_token(False)
    writer.add_chat_template(chat_template(template))

    for tensor_name, array in tensors:
        writer.add_tensor(tensor_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
