"""The generated GGUFs on the real llama.cpp engine.

The demo model is the project's ground truth: every other test trusts that any chat prompt
yields ``script_text()`` token by token and then ``<|im_end|>``. These tests check that on the
engine itself, with prompts rendered from the template the GGUF carries, and check that the
file looks like a real Qwen3 GGUF (architecture keys, token types, chat template).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gguf
import jinja2.sandbox
import numpy as np
import pytest
from llama_cpp import Llama

from app.demo import (
    DEFAULT_SCRIPT,
    ChatTemplateName,
    ensure_demo_model,
    script_text,
    write_demo_model,
)
from app.demo.cli import main

PACKAGED_TEMPLATE = Path(__file__).resolve().parents[1] / "app" / "qwen3_chat_template.jinja"
# A tool-call turn: USER_DEFINED tokens around a JSON piece, no reasoning block.
TOOL_CALL_SCRIPT = (
    b"<tool_call>",
    b'\n{"name": "get_weather", ',
    b'"arguments": {"city": "Paris"}}',
    b"\n</tool_call>",
    b"<|im_end|>",
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CONVERSATIONS: dict[str, dict[str, Any]] = {
    "system_and_user": {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hi."},
        ],
    },
    "multi_turn_history": {
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Bonjour, ça va ? 😀"},
            {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nÇa va bien !"},
            {"role": "user", "content": "And in English?"},
            {"role": "assistant", "content": script_text()},
            {"role": "user", "content": "Once more, with <think> in the text."},
        ],
    },
    "thinking_disabled": {
        "messages": [{"role": "user", "content": "Answer directly."}],
        "enable_thinking": False,
    },
    "tools_and_tool_response": {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                ],
            },
            {"role": "tool", "content": '{"celsius": 21}'},
        ],
        "tools": [WEATHER_TOOL],
    },
    "long_prompt": {
        "messages": [{"role": "user", "content": script_text() * 15}],
    },
}


def render(llm: Llama, **conversation: Any) -> list[int]:
    """Render with the GGUF's own template, as Hugging Face does, and tokenize like a server."""
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = environment.from_string(llm.metadata["tokenizer.chat_template"])
    prompt = template.render(add_generation_prompt=True, **conversation)
    return llm.tokenize(prompt.encode(), add_bos=False, special=True)


def generate(llm: Llama, prompt: Sequence[int], limit: int = 100, **sampling: Any) -> list[int]:
    """Token ids up to and including EOS (or ``limit`` of them)."""
    options: dict[str, Any] = {"temp": 0.0, "top_k": 1} | sampling
    generated: list[int] = []
    for token in llm.generate(prompt, **options):
        generated.append(token)
        if token == llm.token_eos() or len(generated) >= limit:
            break
    return generated


def vocabulary(llm: Llama) -> dict[bytes, int]:
    """Each token's bytes -> its id; a byte-level vocabulary has no two tokens alike."""
    inverse = {llm.detokenize([i], special=True): i for i in range(llm.n_vocab())}
    assert len(inverse) == llm.n_vocab()
    return inverse


def read_field(reader: gguf.GGUFReader, key: str) -> Any:
    return reader.fields[key].contents()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo_model")


@pytest.fixture(scope="session")
def demo_path(model_dir: Path) -> Path:
    return ensure_demo_model(model_dir)


@pytest.fixture(scope="session")
def demo_llm(demo_path: Path) -> Iterator[Llama]:
    llm = Llama(model_path=str(demo_path), n_ctx=4096, logits_all=True, verbose=False)
    yield llm
    llm.close()


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_greedy_decoding_of_any_chat_prompt_yields_the_script(demo_llm: Llama, name: str) -> None:
    prompt = render(demo_llm, **CONVERSATIONS[name])
    assert demo_llm.detokenize(prompt[-1:]) == b"\n"

    generated = generate(demo_llm, prompt)

    ids = vocabulary(demo_llm)
    assert generated == [ids[piece] for piece in DEFAULT_SCRIPT]
    assert generated[-1] == demo_llm.token_eos()
    assert demo_llm.detokenize(generated).decode("utf-8") == script_text()


def test_script_text_is_the_visible_answer_with_a_think_block() -> None:
    text = script_text()
    assert text.startswith("<think>\n")
    assert "\n</think>\n\n" in text
    assert "<|im_end|>" not in text
    assert "é" in text and "😀" in text
    assert len(DEFAULT_SCRIPT) >= 40


def test_multibyte_characters_arrive_split_across_byte_tokens(demo_llm: Llama) -> None:
    """A streaming server must buffer: no single token of "é" or "😀" is valid UTF-8."""
    generated = generate(demo_llm, render(demo_llm, **CONVERSATIONS["system_and_user"]))
    pieces = [demo_llm.detokenize([token]) for token in generated]

    for character in ("é", "😀"):
        encoded = character.encode()
        start = pieces.index(encoded[:1])
        assert pieces[start : start + len(encoded)] == [bytes([b]) for b in encoded]
        for piece in pieces[start : start + len(encoded)]:
            with pytest.raises(UnicodeDecodeError):
                piece.decode("utf-8")
    assert len("😀".encode()) == 4


def test_think_tokens_are_text_and_end_of_turn_is_hidden(demo_llm: Llama) -> None:
    generated = generate(demo_llm, render(demo_llm, **CONVERSATIONS["system_and_user"]))
    think, eos = generated[0], generated[-1]

    assert demo_llm.detokenize([think]) == b"<think>"
    assert demo_llm.detokenize([eos]) == b""
    assert demo_llm.detokenize([eos], special=True) == b"<|im_end|>"


def test_script_is_followed_with_a_wide_margin(demo_llm: Llama) -> None:
    """Teacher-forced logits: the scripted token leads every other token by at least 10."""
    prompt = render(demo_llm, **CONVERSATIONS["long_prompt"])
    ids = vocabulary(demo_llm)
    script_ids = [ids[piece] for piece in DEFAULT_SCRIPT]

    demo_llm.reset()  # type: ignore[no-untyped-call]  # llama_cpp leaves it unannotated
    demo_llm.eval(prompt + script_ids[:-1])
    logits = np.asarray(demo_llm.scores[len(prompt) - 1 : demo_llm.n_tokens])

    assert logits.shape[0] == len(script_ids)
    assert list(logits.argmax(axis=1)) == script_ids
    runner_up = np.sort(logits, axis=1)[:, -2]
    assert (logits.max(axis=1) - runner_up).min() >= 10.0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_temperature_one_sampling_also_follows_the_script(demo_llm: Llama, seed: int) -> None:
    demo_llm.set_seed(seed)
    generated = generate(
        demo_llm,
        render(demo_llm, **CONVERSATIONS["multi_turn_history"]),
        temp=1.0,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
    )
    assert demo_llm.detokenize(generated).decode("utf-8") == script_text()


@pytest.mark.parametrize(
    "script",
    [TOOL_CALL_SCRIPT, (b"<|im_end|>",), (b"\n\n", b"Ok", b"<|im_end|>")],
    ids=["tool_call", "empty_answer", "starts_with_blank_line"],
)
def test_custom_script(model_dir: Path, script: tuple[bytes, ...]) -> None:
    path = ensure_demo_model(model_dir, script)
    llm = Llama(model_path=str(path), n_ctx=1024, verbose=False)
    try:
        for name in ("system_and_user", "thinking_disabled"):
            generated = generate(llm, render(llm, **CONVERSATIONS[name]))
            assert [llm.detokenize([token], special=True) for token in generated] == list(script)
            assert generated[-1] == llm.token_eos()
            assert llm.detokenize(generated).decode("utf-8") == script_text(script)
    finally:
        llm.close()


AFTER_TOOL_SCRIPT = (b"The", b" weather", b" is", b" mild", b".", b"<|im_end|>")


@pytest.mark.parametrize("template", ["qwen3", "qwen3_coder"])
def test_a_second_script_answers_once_the_conversation_holds_a_tool_result(
    model_dir: Path, template: ChatTemplateName
) -> None:
    """An agent's round trip on the demo model: a tool call first; once a tool result is in
    the conversation (however long it and the turns after it are), the second script."""
    path = ensure_demo_model(
        model_dir, TOOL_CALL_SCRIPT, template=template, after_tool_script=AFTER_TOOL_SCRIPT
    )
    llm = Llama(model_path=str(path), n_ctx=2048, verbose=False)
    call = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    asked = [{"role": "user", "content": "Weather in Paris?"}]
    answered = [
        *asked,
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": '{"celsius": 21} ' * 40},
    ]
    later = [
        *answered,
        {"role": "assistant", "content": "Mild."},
        {"role": "user", "content": "Ok " * 50},
    ]
    try:
        for messages, script in ((asked, TOOL_CALL_SCRIPT), (answered, AFTER_TOOL_SCRIPT),
                                 (later, AFTER_TOOL_SCRIPT)):  # fmt: skip
            generated = generate(llm, render(llm, messages=messages, tools=[WEATHER_TOOL]))
            assert [llm.detokenize([t], special=True) for t in generated] == list(script)
    finally:
        llm.close()


def test_the_two_scripts_may_share_no_piece(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="share"):
        ensure_demo_model(
            model_dir, (b"Yes", b"<|im_end|>"), after_tool_script=(b"Yes", b"<|im_end|>")
        )


def test_gguf_carries_the_qwen3_chat_template_byte_for_byte(
    demo_llm: Llama, demo_path: Path
) -> None:
    expected = PACKAGED_TEMPLATE.read_bytes()
    reader = gguf.GGUFReader(demo_path)
    assert read_field(reader, "tokenizer.chat_template").encode() == expected
    assert demo_llm.metadata["tokenizer.chat_template"].encode() == expected


def test_tokenizer_metadata_matches_qwen3(demo_path: Path) -> None:
    reader = gguf.GGUFReader(demo_path)
    tokens: list[str] = read_field(reader, "tokenizer.ggml.tokens")
    types: list[int] = read_field(reader, "tokenizer.ggml.token_type")
    type_of = dict(zip(tokens, types, strict=True))

    for control in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert type_of[control] == gguf.TokenType.CONTROL, control
    for text in ("<tool_call>", "</tool_call>", "<think>", "</think>"):
        assert type_of[text] == gguf.TokenType.USER_DEFINED, text
    # Byte tokens in GPT-2 form and Qwen's order: "\n" is "Ċ" at 198, space is "Ġ" at 220.
    assert tokens[198] == "Ċ" and tokens[220] == "Ġ"
    assert all(kind == gguf.TokenType.NORMAL for kind in types[:256])
    assert read_field(reader, "tokenizer.ggml.model") == "gpt2"
    assert read_field(reader, "tokenizer.ggml.pre") == "qwen2"
    assert read_field(reader, "tokenizer.ggml.merges")
    assert tokens[read_field(reader, "tokenizer.ggml.eos_token_id")] == "<|im_end|>"
    assert tokens[read_field(reader, "tokenizer.ggml.bos_token_id")] == "<|endoftext|>"
    assert tokens[read_field(reader, "tokenizer.ggml.padding_token_id")] == "<|endoftext|>"
    assert read_field(reader, "tokenizer.ggml.add_bos_token") is False


def test_architecture_metadata_and_tensors_are_qwen3moe(demo_path: Path) -> None:
    reader = gguf.GGUFReader(demo_path)
    assert read_field(reader, "general.architecture") == "qwen3moe"
    assert read_field(reader, "qwen3moe.rope.freq_base") == pytest.approx(1e6)
    assert read_field(reader, "qwen3moe.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    for key in (
        "context_length",
        "embedding_length",
        "block_count",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.key_length",
        "attention.value_length",
        "expert_count",
        "expert_used_count",
        "expert_feed_forward_length",
    ):
        assert read_field(reader, f"qwen3moe.{key}") > 0, key

    per_layer = [
        "attn_norm",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "attn_q_norm",
        "attn_k_norm",
        "ffn_norm",
        "ffn_gate_inp",
        "ffn_gate_exps",
        "ffn_up_exps",
        "ffn_down_exps",
    ]
    n_layer = read_field(reader, "qwen3moe.block_count")
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{layer}.{name}.weight" for layer in range(n_layer) for name in per_layer
    }
    assert {tensor.name for tensor in reader.tensors} == expected
    for tensor in reader.tensors:
        if tensor.name.startswith("blk.") and not tensor.name.endswith("norm.weight"):
            assert np.abs(tensor.data).max() > 0, tensor.name


def test_demo_model_is_small_and_builds_in_well_under_a_second(tmp_path: Path) -> None:
    started = time.perf_counter()
    path = write_demo_model(tmp_path / "demo.gguf")
    elapsed = time.perf_counter() - started

    assert path.stat().st_size < 5_000_000
    assert elapsed < 1.0


def test_ensure_demo_model_builds_once_per_script(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="app.demo"):
        first = ensure_demo_model(tmp_path)
    assert any("built" in record.getMessage() for record in caplog.records)
    built_at = first.stat().st_mtime_ns

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="app.demo"):
        again = ensure_demo_model(tmp_path)
    assert again == first and again.stat().st_mtime_ns == built_at
    assert not caplog.records

    other = ensure_demo_model(tmp_path, TOOL_CALL_SCRIPT)
    assert other != first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, other.name])


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ((b"Hi", b"!"), "end with"),
        ((b"Hi", b"Hi", b"<|im_end|>"), "unique"),
        ((b"Hi", b"\n", b"There", b"<|im_end|>"), "b'\\n'"),
        ((b"Hi", b"<|im_start|>", b"<|im_end|>"), "control token"),
        ((b"x" * 33, b"<|im_end|>"), "at most 32 bytes"),
        ((b"caf", b"\xc3", b"<|im_end|>"), "UTF-8"),
        ((b"", b"<|im_end|>"), "non-empty"),
    ],
)
def test_invalid_scripts_are_rejected(
    tmp_path: Path, script: tuple[bytes, ...], reason: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        write_demo_model(tmp_path / "bad.gguf", script)
    assert not (tmp_path / "bad.gguf").exists()


def test_user_defined_tokens_are_parsed_in_prompts_even_without_special(demo_llm: Llama) -> None:
    """llama.cpp matches USER_DEFINED tokens in any text; CONTROL ones only when asked."""
    think = demo_llm.tokenize(b"<think>", add_bos=False, special=False)
    im_end_as_text = demo_llm.tokenize(b"<|im_end|>", add_bos=False, special=False)
    im_end = demo_llm.tokenize(b"<|im_end|>", add_bos=False, special=True)

    assert len(think) == 1
    assert im_end == [demo_llm.token_eos()]
    assert len(im_end_as_text) > 1


def test_command_line_writes_either_model(tmp_path: Path) -> None:
    assert main(["--out", str(tmp_path / "demo.gguf")]) == 0
    assert (tmp_path / "demo.gguf").stat().st_size > 0
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x.gguf"), "--n-layer", "3"])
