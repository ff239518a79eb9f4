"""Build tiny but real ``qwen3moe`` GGUF files that llama.cpp loads and runs.

Decision: the project is tested on the real llama.cpp engine running models that this module
constructs weight by weight, not on a downloaded Qwen3 checkpoint (gigabytes, a network
dependency, and text nobody can predict) and not on a fake engine (which would prove nothing
about tokenization, byte-level detokenization, end-of-generation handling or partial UTF-8).
Every file written here has the real architecture (attention with q/k norms and rope, a
softmax router over experts) and the real Qwen3 tokenizer family: byte-level BPE in GPT-2
``bytes_to_unicode`` form, pre-tokenizer ``qwen2``, Qwen's added tokens with Qwen's types, no
BOS, ``<|im_end|>`` as EOS and the Qwen3 chat template (or, for Qwen3-Coder variants, the
Qwen3-Coder one: ``template="qwen3_coder"``).

The *demo* model answers every chat prompt with a known script. The weights are set by
construction rather than trained: each script token, and the ``"\\n"`` byte token that every
prompt rendered with ``add_generation_prompt`` ends in, owns one of a set of orthonormal
directions of the residual stream; every embedding also carries a shared "default" direction
and every other token a random direction orthogonal to all of those. The output row of a
script piece is the direction of its predecessor, and the first piece's row also reads the
default direction, so a script token predicts its successor and any other token (the prompt's
final ``"\\n"`` included) predicts the first piece. The transformer layers have small random
weights, so they run for real but leave the residual stream dominated by the current token;
the logit margins are about 25, so even temperature-1 sampling follows the script.

The random-weight *bench* models (``bench.model``) are written through the same helpers
(vocabulary, GGUF header and metadata, the atomic cache), so both kinds share one tokenizer,
one template and one set of architecture keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.metadata
import itertools
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import gguf
import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_SCRIPT",
    "GENERATOR_VERSION",
    "ChatTemplateName",
    "ensure_demo_model",
    "main",
    "script_text",
    "write_demo_model",
]

logger = logging.getLogger(__name__)

# Part of every cache key: bump it whenever the bytes this module writes change.
GENERATOR_VERSION: Final = 1

ARCHITECTURE: Final = "qwen3moe"

# Qwen3's added tokens in Qwen3's order, with the ``special`` flag of its tokenizer config. The
# GGUF converter stores ``special`` tokens as CONTROL (hidden when detokenized, parsed in a
# prompt only on request) and the others as USER_DEFINED (plain text both ways), which is why
# ``<think>`` and ``<tool_call>`` reach clients as text.
_QWEN3_ADDED_TOKENS: Final[tuple[tuple[str, bool], ...]] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
_EOS_TEXT: Final = "<|im_end|>"
# What llama.cpp ends a generation at in Qwen's vocabulary: the chat turn's end, and the
# fill-in-the-middle answer's (``<|endoftext|>``, or a token that would open the next file).
_SCRIPT_ENDS: Final = (
    _EOS_TEXT.encode(),
    b"<|endoftext|>",
    b"<|fim_pad|>",
    b"<|file_sep|>",
    b"<|repo_name|>",
)
_BOS_TEXT: Final = "<|endoftext|>"
_PAD_TEXT: Final = "<|endoftext|>"

# A few of the first byte-level merges of a GPT-2 style vocabulary, in ``bytes_to_unicode``
# form ("Ġ" is the space byte). They make the merge table real without letting any merge touch
# the newline byte, so every prompt still ends in the single "\n" byte token.
_MERGES: Final[tuple[tuple[str, str], ...]] = (
    ("Ġ", "Ġ"),
    ("i", "n"),
    ("Ġ", "t"),
    ("e", "r"),
    ("o", "n"),
    ("Ġ", "a"),
    ("r", "e"),
    ("a", "t"),
    ("s", "t"),
    ("e", "n"),
    ("o", "r"),
    ("Ġt", "h"),
    ("Ġth", "e"),
)

# The token every prompt rendered with ``add_generation_prompt`` ends in.
_PROMPT_END: Final = b"\n"
_MAX_PIECE_BYTES: Final = 32

DEFAULT_SCRIPT: Final[tuple[bytes, ...]] = (
    b"<think>",
    b"\nOkay",
    b",",
    b" the",
    b" user",
    b" wants",
    b" a",
    b" short",
    b" demo",
    b" reply",
    b".",
    b" I",
    b" should",
    b" greet",
    b" them",
    b" warmly",
    b".\n",
    b"</think>",
    b"\n\n",
    b"Hello",
    b"!",
    b" This",
    b" is",
    b" an",
    b" offline",
    b" test",
    b" model",
    b" running",
    b" on",
    b" llama",
    b".cpp",
    b":",
    b" caf",
    b"\xc3",  # "é" arrives as two byte tokens: a stream must not split the character.
    b"\xa9",
    b" for",
    b" everyone",
    b" ",
    b"\xf0",  # U+1F600 "😀" arrives as four byte tokens.
    b"\x9f",
    b"\x98",
    b"\x80",
    b"<|im_end|>",
)

# Demo model weights. The logit targets set the margins: the default (first piece) scores
# _DEFAULT_LOGIT and a successor _SUCCESSOR_LOGIT, every other token about zero.
_DEMO_SEED: Final = 20250501
_DEMO_MIN_EMBD: Final = 128
_DEMO_FREE_DIMS: Final = 32  # directions left for the non-script tokens
_DEMO_LAYER_STD: Final = 0.02
_DEMO_ROUTER_STD: Final = 0.1
_DEMO_TOKEN_WEIGHT: Final = 0.95
_DEMO_DEFAULT_WEIGHT: Final = 0.3
_DEFAULT_LOGIT: Final = 25.0
_SUCCESSOR_LOGIT: Final = 50.0
# The tool-result branch (``after_tool_script``): the first piece of the second script scores
# _BRANCH_LOGIT once a ``<tool_response>`` token is in the context, the first piece of the
# main script loses as much, and a script token's successor (_SUCCESSOR_LOGIT) still wins.
_BRANCH_LOGIT: Final = 40.0
_BRANCH_ATTENTION: Final = 20.0
"""Attention score of the branch head on a ``<tool_response>`` token (0 on every other)."""
_TOOL_RESPONSE_TEXT: Final = "<tool_response>"

ChatTemplateName = Literal["qwen3", "qwen3_coder"]
"""The chat templates packaged in ``app/``: Qwen3's and Qwen3-Coder's, byte for byte."""
_TEMPLATE_PATHS: Final[dict[ChatTemplateName, Path]] = {
    "qwen3": Path(__file__).with_name("qwen3_chat_template.jinja"),
    "qwen3_coder": Path(__file__).with_name("qwen3_coder_chat_template.jinja"),
}

_FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class _Shape:
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


@dataclass(frozen=True)
class _Vocab:
    """A Qwen-style byte-level vocabulary: 256 byte tokens, merges, extra pieces, added tokens."""

    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]
    ids: dict[str, int]

    def id_of(self, piece: bytes) -> int:
        return self.ids[_token_text(piece)]


# Bytes that GPT-2's ``bytes_to_unicode`` keeps as themselves (printable Latin-1, no space).
_VISIBLE_BYTES: Final = (*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100))


@functools.cache
def _byte_table() -> tuple[str, ...]:
    """GPT-2's ``bytes_to_unicode``: byte value -> the printable character that stands for it.

    Byte-level vocabularies store tokens as text; bytes that are not printable Latin-1 are
    shifted to U+0100 and up so that every token is a visible, whitespace-free string.
    """
    table = [""] * 256
    shifted = 0
    for byte in range(256):
        if byte in _VISIBLE_BYTES:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(0x100 + shifted)
            shifted += 1
    return tuple(table)


def _byte_token_order() -> list[int]:
    """Byte values in GPT-2's and Qwen's vocabulary order: visible bytes first ("\\n" is 198)."""
    return [*_VISIBLE_BYTES, *(byte for byte in range(256) if byte not in _VISIBLE_BYTES)]


def _added_token_texts() -> dict[str, bool]:
    return dict(_QWEN3_ADDED_TOKENS)


def _token_text(piece: bytes) -> str:
    """The vocabulary string of a script piece: an added token's own text, else byte-level form."""
    added = _added_token_texts()
    try:
        text = piece.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text in added:
        return text
    table = _byte_table()
    return "".join(table[byte] for byte in piece)


_FIM_TEXTS: Final = frozenset(
    (
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    )
)


def _build_vocab(extra_pieces: Sequence[bytes], *, fim: bool = True) -> _Vocab:
    """Lay out the vocabulary like Qwen's: bytes, merged tokens, then the added tokens last
    (without ``fim``, the fill-in-the-middle ones left out: a model that cannot infill)."""
    table = _byte_table()
    tokens: list[str] = [table[byte] for byte in _byte_token_order()]
    token_types: list[int] = [int(gguf.TokenType.NORMAL)] * len(tokens)
    ids = {text: index for index, text in enumerate(tokens)}

    def add(text: str, token_type: gguf.TokenType) -> None:
        if text not in ids:
            ids[text] = len(tokens)
            tokens.append(text)
            token_types.append(int(token_type))

    for left, right in _MERGES:
        add(left + right, gguf.TokenType.NORMAL)
    added = _added_token_texts()
    for piece in extra_pieces:
        text = _token_text(piece)
        if text not in added:
            add(text, gguf.TokenType.NORMAL)
    for text, special in _QWEN3_ADDED_TOKENS:
        if not fim and text in _FIM_TEXTS:
            continue
        add(text, gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    merges = tuple(f"{left} {right}" for left, right in _MERGES)
    return _Vocab(tuple(tokens), tuple(token_types), merges, ids)


def _check_script(script: Sequence[bytes]) -> tuple[bytes, ...]:
    """Validate a script, returning it as a tuple; every rule protects the construction."""
    pieces = tuple(script)
    if not pieces or pieces[-1] not in _SCRIPT_ENDS:
        raise ValueError(f"a script must end with {_EOS_TEXT} (or another end: {_SCRIPT_ENDS})")
    for piece in pieces:
        if not isinstance(piece, bytes) or not piece:
            raise ValueError(f"script pieces must be non-empty bytes, got {piece!r}")
        if len(piece) > _MAX_PIECE_BYTES:
            # llama-cpp-python detokenizes through a fixed 32-byte buffer and silently returns
            # nothing for a longer token.
            raise ValueError(f"script pieces must be at most {_MAX_PIECE_BYTES} bytes: {piece!r}")
    duplicates = sorted({piece for piece in pieces if pieces.count(piece) > 1})
    if duplicates:
        # One token, one successor: a repeated piece would have to predict two different tokens.
        raise ValueError(f"script pieces must be unique, repeated: {duplicates!r}")
    if _PROMPT_END in pieces:
        # Every prompt ends in this token, which must predict the first piece and nothing else.
        raise ValueError(
            f"the script must not contain the {_PROMPT_END!r} byte token that every prompt "
            'ends in; use a longer piece such as b".\\n" or b"\\n\\n"'
        )
    added = _added_token_texts()
    for piece in pieces[:-1]:
        if piece in _SCRIPT_ENDS or added.get(piece.decode("utf-8", errors="replace"), False):
            # Control tokens end the generation or vanish from the text.
            raise ValueError(f"control token {piece!r} may only end the script")
    try:
        b"".join(pieces[:-1]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError("the script's pieces must concatenate to valid UTF-8") from exc
    return pieces


def script_text(script: Sequence[bytes] = DEFAULT_SCRIPT) -> str:
    """The text greedy decoding of the demo model yields: every piece but the final EOS.

    This is what a client sees, ``<think>`` blocks included, since Qwen's ``<think>`` and
    ``<tool_call>`` tokens detokenize as plain text.
    """
    pieces = _check_script(script)
    return b"".join(pieces[:-1]).decode("utf-8")


def _chat_template(template: ChatTemplateName = "qwen3") -> str:
    # Bytes, not read_text(): universal newlines would change the template the GGUF carries.
    return _TEMPLATE_PATHS[template].read_bytes().decode("utf-8")


def _write_gguf(
    path: Path,
    *,
    name: str,
    shape: _Shape,
    vocab: _Vocab,
    tensors: Sequence[tuple[str, npt.NDArray[np.float32] | npt.NDArray[np.float16]]],
    file_type: gguf.LlamaFileType,
    template: ChatTemplateName = "qwen3",
) -> Path:
    """Write the header, metadata and tensors of one qwen3moe GGUF file."""
    shape.check()
    writer = gguf.GGUFWriter(path, ARCHITECTURE)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_description(
        "Synthetic model built by app.demo_model for tests and benchmarks; not a trained model."
    )
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
    writer.add_eos_token_id(vocab.ids[_EOS_TEXT])
    writer.add_bos_token_id(vocab.ids[_BOS_TEXT])
    writer.add_pad_token_id(vocab.ids[_PAD_TEXT])
    writer.add_add_bos_token(False)
    writer.add_chat_template(_chat_template(template))

    for tensor_name, array in tensors:
        writer.add_tensor(tensor_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _demo_shape(n_distinguished: int, n_ctx: int) -> _Shape:
    """Small shapes, but a residual stream wide enough for one direction per script token."""
    needed = n_distinguished + 1 + _DEMO_FREE_DIMS
    n_embd = max(_DEMO_MIN_EMBD, -(-needed // 64) * 64)
    return _Shape(
        n_layer=2,
        n_embd=n_embd,
        n_expert=4,
        n_expert_used=2,
        n_ff_exp=64,
        n_head=4,
        n_head_kv=2,
        head_dim=32,
        n_ctx=n_ctx,
    )


def _orthonormal_rows(n: int, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """An n-by-n matrix with orthonormal rows: the DCT-II basis, rows shuffled, signs flipped.

    Built elementwise on purpose: a LAPACK QR of a random matrix is the obvious choice, but on a
    busy two-core machine BLAS thread start-up alone took most of a second.
    """
    frequency = np.arange(n)[:, None]
    sample = np.arange(n)[None, :]
    basis = np.cos(np.pi * (sample + 0.5) * frequency / n) * math.sqrt(2.0 / n)
    basis[0] /= math.sqrt(2.0)
    # Permuting rows and flipping the sign of whole columns keeps the rows orthonormal.
    signs = rng.choice(np.array([-1.0, 1.0]), size=n)
    return np.asarray(basis[rng.permutation(n)] * signs)


def _demo_tensors(
    vocab: _Vocab,
    script: tuple[bytes, ...],
    shape: _Shape,
    after_tool: tuple[bytes, ...] | None = None,
) -> list[tuple[str, _FloatArray]]:
    """Embeddings and output rows that encode the script; small random layers in between.

    With ``after_tool``, one attention head of the first layer is built rather than random:
    its query is the same for every token (read off the direction all embeddings share), its
    key is zero for every token but ``<tool_response>``, and its value carries that token's
    direction into a *branch* direction of the residual stream. So every position after a
    tool result holds the branch direction, and the output rows let it choose the second
    script's first piece over the main script's. The query and key live in the slowest pair
    of rope frequencies, so positions barely rotate them.
    """
    rng = np.random.default_rng(_DEMO_SEED)
    n_vocab, n_embd = len(vocab.tokens), shape.n_embd
    script_ids = [vocab.id_of(piece) for piece in script]
    branch_ids = [vocab.id_of(piece) for piece in after_tool] if after_tool else []
    distinguished = [*script_ids, vocab.id_of(_PROMPT_END)]
    if after_tool:
        distinguished += [i for i in branch_ids if i not in distinguished]
        distinguished.append(vocab.ids[_TOOL_RESPONSE_TEXT])

    basis = _orthonormal_rows(n_embd, rng)
    directions = np.zeros((n_vocab, n_embd))
    directions[distinguished] = basis[: len(distinguished)]
    default_direction = basis[len(distinguished)]
    free = len(distinguished) + 1
    branch_direction = basis[free] if after_tool else np.zeros(n_embd)
    complement = basis[free + (1 if after_tool else 0) :]
    others = np.setdiff1d(np.arange(n_vocab), distinguished)
    mix = rng.standard_normal((len(others), len(complement)))
    mix /= np.sqrt(np.einsum("ij,ij->i", mix, mix))[:, None]
    directions[others] = np.einsum("ij,jk->ik", mix, complement)

    # RMS exactly 1, so the final RMSNorm leaves an embedding as it is.
    scale = math.sqrt(n_embd / (_DEMO_TOKEN_WEIGHT**2 + _DEMO_DEFAULT_WEIGHT**2))
    token_embd = scale * (
        _DEMO_TOKEN_WEIGHT * directions + _DEMO_DEFAULT_WEIGHT * default_direction
    )
    output = np.zeros((n_vocab, n_embd))
    successor_gain = _SUCCESSOR_LOGIT / (scale * _DEMO_TOKEN_WEIGHT)
    for ids in (script_ids, branch_ids):
        for current, successor in itertools.pairwise(ids):
            output[successor] += successor_gain * directions[current]
    output[script_ids[0]] += _DEFAULT_LOGIT / (scale * _DEMO_DEFAULT_WEIGHT) * default_direction
    # The branch head writes the branch direction with the default component's size.
    branch_size = scale * _DEMO_DEFAULT_WEIGHT
    if after_tool:
        branch_gain = _BRANCH_LOGIT / branch_size
        output[branch_ids[0]] += branch_gain * branch_direction
        output[script_ids[0]] -= branch_gain * branch_direction

    def small(*dims: int, std: float = _DEMO_LAYER_STD) -> _FloatArray:
        return (rng.standard_normal(dims) * std).astype(np.float32)

    tensors: list[tuple[str, _FloatArray]] = [
        ("token_embd.weight", token_embd.astype(np.float32)),
        ("output_norm.weight", np.ones(n_embd, dtype=np.float32)),
        ("output.weight", output.astype(np.float32)),
    ]
    q_dim, kv_dim = shape.n_head * shape.head_dim, shape.n_head_kv * shape.head_dim
    for layer in range(shape.n_layer):
        prefix = f"blk.{layer}."
        attn_q, attn_k = small(q_dim, n_embd), small(kv_dim, n_embd)
        attn_v, attn_output = small(kv_dim, n_embd), small(n_embd, q_dim)
        q_norm = np.ones(shape.head_dim, dtype=np.float32)
        k_norm = np.ones(shape.head_dim, dtype=np.float32)
        if after_tool and layer == 0:
            # Head 0 (and its key/value head 0), in the slowest rope pair (NeoX layout: the
            # pair of dimension head_dim/2 - 1 and head_dim - 1).
            slow = shape.head_dim // 2 - 1
            tool = directions[vocab.ids[_TOOL_RESPONSE_TEXT]]
            attn_q[: shape.head_dim] = 0.0
            attn_k[: shape.head_dim] = 0.0
            attn_v[: shape.head_dim] = 0.0
            attn_output[:, : shape.head_dim] = 0.0
            attn_q[slow] = default_direction
            attn_k[slow] = tool
            # After q/k norm each holds sqrt(head_dim) times its norm weight in that dimension;
            # llama.cpp scales their product by 1/sqrt(head_dim).
            q_norm[slow] = k_norm[slow] = math.sqrt(_BRANCH_ATTENTION / math.sqrt(shape.head_dim))
            attn_v[0] = tool / (scale * _DEMO_TOKEN_WEIGHT)
            attn_output[:, 0] = branch_size * branch_direction
        tensors += [
            (prefix + "attn_norm.weight", np.ones(n_embd, dtype=np.float32)),
            (prefix + "attn_q.weight", attn_q.astype(np.float32)),
            (prefix + "attn_k.weight", attn_k.astype(np.float32)),
            (prefix + "attn_v.weight", attn_v.astype(np.float32)),
            (prefix + "attn_output.weight", attn_output.astype(np.float32)),
            (prefix + "attn_q_norm.weight", q_norm),
            (prefix + "attn_k_norm.weight", k_norm),
            (prefix + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32)),
            (prefix + "ffn_gate_inp.weight", small(shape.n_expert, n_embd, std=_DEMO_ROUTER_STD)),
            (prefix + "ffn_gate_exps.weight", small(shape.n_expert, shape.n_ff_exp, n_embd)),
            (prefix + "ffn_up_exps.weight", small(shape.n_expert, shape.n_ff_exp, n_embd)),
            (prefix + "ffn_down_exps.weight", small(shape.n_expert, n_embd, shape.n_ff_exp)),
        ]
    return tensors


def _check_scripts(
    script: Sequence[bytes], after_tool_script: Sequence[bytes] | None
) -> tuple[tuple[bytes, ...], tuple[bytes, ...] | None]:
    pieces = _check_script(script)
    if after_tool_script is None:
        return pieces, None
    second = _check_script(after_tool_script)
    shared = sorted(set(pieces[:-1]) & set(second[:-1]))
    if shared:
        raise ValueError(f"the two scripts must not share pieces: {shared!r}")
    return pieces, second


def write_demo_model(
    path: Path,
    script: Sequence[bytes] = DEFAULT_SCRIPT,
    *,
    n_ctx: int = 4096,
    template: ChatTemplateName = "qwen3",
    after_tool_script: Sequence[bytes] | None = None,
    fim: bool = True,
) -> Path:
    """Write a demo model whose greedy answer to any chat prompt is ``script``.

    Every piece of the script is one generated token: a single byte is that byte token (so
    multi-byte characters arrive split across tokens), an added token's text is that token,
    and any longer piece becomes a token of its own. ``template`` names the chat template the
    GGUF carries (``qwen3_coder``: a Qwen3-Coder variant). With ``after_tool_script`` the
    answer is that second script instead once the conversation holds a tool result (a
    ``<tool_response>`` token, as both templates render ``tool`` messages): a tool-calling
    script, then the answer after the tool ran, which is what an agent's round trip needs.
    The two scripts share no piece but their final end-of-turn. The vocabulary holds Qwen's
    fill-in-the-middle tokens, so a fill-in-the-middle prompt (any prompt) is answered with
    the script too (end it with ``<|endoftext|>`` as Qwen's code models do); without ``fim``
    they are left out, a model that cannot infill. Returns ``path``.
    """
    pieces, second = _check_scripts(script, after_tool_script)
    vocab = _build_vocab(pieces + (second or ()), fim=fim)
    distinguished = len(set(pieces + (second or ()))) + (3 if second else 1)
    shape = _demo_shape(distinguished, n_ctx)
    return _write_gguf(
        path,
        name="Qwen3-MoE demo (scripted)",
        shape=shape,
        vocab=vocab,
        tensors=_demo_tensors(vocab, pieces, shape, second),
        file_type=gguf.LlamaFileType.ALL_F32,
        template=template,
    )


def _gguf_version() -> str:
    try:
        return importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:  # e.g. gguf-py vendored on sys.path
        return "unknown"


def _cache_name(kind: str, payload: dict[str, object], template: ChatTemplateName = "qwen3") -> str:
    """A file name that changes whenever the file's content would."""
    key = {
        "generator": GENERATOR_VERSION,
        "gguf": _gguf_version(),
        "template": hashlib.sha256(_TEMPLATE_PATHS[template].read_bytes()).hexdigest(),
        "kind": kind,
        **payload,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return f"qwen3moe-{kind}-{digest[:16]}.gguf"


def _ensure(target: Path, build: Callable[[Path], Path]) -> Path:
    """Build ``target`` once, atomically: readers never see a half-written file."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
    )
    os.close(handle)
    started = time.perf_counter()
    try:
        build(Path(temporary))
        # Flush before the rename: a crash must not leave a short file under the final name,
        # and a benchmark started right after must not compete with a gigabyte of writeback.
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; the cache may be shared read-only
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    logger.info(
        "built %s (%.1f MB) in %.2f s",
        target,
        target.stat().st_size / 1e6,
        time.perf_counter() - started,
    )
    return target


def ensure_demo_model(
    cache_dir: Path,
    script: Sequence[bytes] = DEFAULT_SCRIPT,
    *,
    template: ChatTemplateName = "qwen3",
    after_tool_script: Sequence[bytes] | None = None,
    fim: bool = True,
) -> Path:
    """Return the demo model for ``script`` (and ``template``, ``after_tool_script`` and
    ``fim``) in ``cache_dir``, building it only if missing."""
    pieces, second = _check_scripts(script, after_tool_script)
    payload: dict[str, object] = {"script": [piece.hex() for piece in pieces]}
    if second is not None:
        payload["after_tool_script"] = [piece.hex() for piece in second]
    if not fim:
        payload["fim"] = False
    name = _cache_name("demo", payload, template)
    return _ensure(
        cache_dir / name,
        lambda path: write_demo_model(
            path, pieces, template=template, after_tool_script=second, fim=fim
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m app.demo_model --out PATH [--n-ctx N]`` (bench models: ``bench.model``)."""
    parser = argparse.ArgumentParser(
        prog="python -m app.demo_model",
        description="Write the scripted demo model (random bench models: python -m bench.model).",
    )
    parser.add_argument("--out", type=Path, required=True, help="GGUF file to write")
    parser.add_argument("--n-ctx", type=int, default=4096, help="context length (default 4096)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    path = write_demo_model(args.out, n_ctx=args.n_ctx)
    logger.info(
        "wrote %s (%.1f MB) in %.2f s",
        path,
        path.stat().st_size / 1e6,
        time.perf_counter() - started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
