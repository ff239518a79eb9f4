"""The scripted demo model: a tiny real ``qwen3moe`` GGUF whose greedy answer is a known script.

Decision: the project is tested on the real llama.cpp engine running models that this package
constructs weight by weight, not on a downloaded Qwen3 checkpoint (gigabytes, a network
dependency, and text nobody can predict) and not on a fake engine (which would prove nothing
about tokenization, byte-level detokenization, end-of-generation handling or partial UTF-8).
The file has the real architecture (attention with q/k norms and rope, a softmax router over
experts) and the real Qwen3 tokenizer family (``app.demo.vocab``), with the Qwen3 chat
template or, for Qwen3-Coder variants, the Qwen3-Coder one (``template="qwen3_coder"``).

The weights are set by construction rather than trained: each script token, and the ``"\\n"``
byte token that every prompt rendered with ``add_generation_prompt`` ends in, owns one of a
set of orthonormal directions of the residual stream; every embedding also carries a shared
"default" direction and every other token a random direction orthogonal to all of those. The
output row of a script piece is the direction of its predecessor, and the first piece's row
also reads the default direction, so a script token predicts its successor and any other
token (the prompt's final ``"\\n"`` included) predicts the first piece. The transformer layers
have small random weights, so they run for real but leave the residual stream dominated by
the current token; the logit margins are wide enough that even temperature-1 sampling follows
the script.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import gguf
import numpy as np
import numpy.typing as npt

from app.demo.cache import build_once, cache_name
from app.demo.vocab import EOS_TEXT, Vocab, added_token_texts, build_vocab
from app.demo.writer import ChatTemplateName, FloatArray, Shape, write_gguf

__all__ = [
    "DEFAULT_SCRIPT",
    "check_script",
    "ensure_demo_model",
    "script_text",
    "write_demo_model",
]

# What llama.cpp ends a generation at in Qwen's vocabulary: the chat turn's end, and the
# fill-in-the-middle answer's (``<|endoftext|>``, or a token that would open the next file).
_SCRIPT_ENDS: Final = (
    EOS_TEXT.encode(),
    b"<|endoftext|>",
    b"<|fim_pad|>",
    b"<|file_sep|>",
    b"<|repo_name|>",
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


def check_script(script: Sequence[bytes]) -> tuple[bytes, ...]:
    """Validate a script, returning it as a tuple; every rule protects the construction."""
    pieces = tuple(script)
    if not pieces or pieces[-1] not in _SCRIPT_ENDS:
        raise ValueError(f"a script must end with {EOS_TEXT} (or another end: {_SCRIPT_ENDS})")
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
    added = added_token_texts()
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
    pieces = check_script(script)
    return b"".join(pieces[:-1]).decode("utf-8")


def _demo_shape(n_distinguished: int, n_ctx: int) -> Shape:
    """Small shapes, but a residual stream wide enough for one direction per script token."""
    needed = n_distinguished + 1 + _DEMO_FREE_DIMS
    n_embd = max(_DEMO_MIN_EMBD, -(-needed // 64) * 64)
    return Shape(
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
    vocab: Vocab,
    script: tuple[bytes, ...],
    shape: Shape,
    after_tool: tuple[bytes, ...] | None = None,
) -> list[tuple[str, FloatArray]]:
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

    def small(*dims: int, std: float = _DEMO_LAYER_STD) -> FloatArray:
        return (rng.standard_normal(dims) * std).astype(np.float32)

    tensors: list[tuple[str, FloatArray]] = [
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
    pieces = check_script(script)
    if after_tool_script is None:
        return pieces, None
    second = check_script(after_tool_script)
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
    vocab = build_vocab(pieces + (second or ()), fim=fim)
    distinguished = len(set(pieces + (second or ()))) + (3 if second else 1)
    shape = _demo_shape(distinguished, n_ctx)
    return write_gguf(
        path,
        name="Qwen3-MoE demo (scripted)",
        shape=shape,
        vocab=vocab,
        tensors=_demo_tensors(vocab, pieces, shape, second),
        file_type=gguf.LlamaFileType.ALL_F32,
        template=template,
    )


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
    name = cache_name("demo", payload, template)
    return build_once(
        cache_dir / name,
        lambda path: write_demo_model(
            path, pieces, template=template, after_tool_script=second, fim=fim
        ),
    )
