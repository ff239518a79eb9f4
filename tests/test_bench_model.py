"""The random-weight bench models (``bench.model``) on the real llama.cpp engine.

Every benchmark decides how many tokens a request streams because these models never end a
generation: greedy decoding must stay on printable ASCII, never a special token, for as long
as it is asked to. The cache must rebuild a model exactly when its parameters change.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import jinja2.sandbox
import pytest
from llama_cpp import Llama

from app.demo import ensure_demo_model
from bench.model import ensure_bench_model, main

TINY_BENCH = {
    "n_layer": 2,
    "n_embd": 256,
    "n_expert": 8,
    "n_expert_used": 2,
    "n_ff_exp": 128,
    "n_head": 4,
    "n_head_kv": 2,
}
CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Bonjour, ça va ? 😀"},
    {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nÇa va bien !"},
    {"role": "user", "content": "Once more, with <think> in the text."},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench_model")


@pytest.fixture(scope="module")
def bench_path(model_dir: Path) -> Path:
    return ensure_bench_model(model_dir, **TINY_BENCH)


def test_bench_model_greedy_output_is_printable_ascii_without_eos(bench_path: Path) -> None:
    reader = gguf.GGUFReader(bench_path)
    types: list[int] = reader.fields["tokenizer.ggml.token_type"].contents()
    special_ids = {i for i, kind in enumerate(types) if kind != gguf.TokenType.NORMAL}
    llm = Llama(model_path=str(bench_path), n_ctx=512, verbose=False)
    try:
        environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True
        )
        template = environment.from_string(llm.metadata["tokenizer.chat_template"])
        text = template.render(messages=CONVERSATION, add_generation_prompt=True)
        prompt = llm.tokenize(text.encode(), add_bos=False, special=True)
        generated: list[int] = []
        for token in llm.generate(prompt, temp=0.0, top_k=1):
            generated.append(token)
            if token == llm.token_eos() or len(generated) >= 64:
                break
        output = llm.detokenize(generated)
    finally:
        llm.close()

    assert len(generated) == 64
    assert not special_ids & set(generated)
    assert all(0x20 <= byte < 0x7F for byte in output), output


def test_bench_model_shares_the_demo_models_tokenizer_and_template(
    model_dir: Path, bench_path: Path
) -> None:
    """Both kinds are written by one set of GGUF helpers: same template, same added tokens."""
    bench = gguf.GGUFReader(bench_path)
    demo = gguf.GGUFReader(ensure_demo_model(model_dir))
    for key in ("tokenizer.chat_template", "tokenizer.ggml.pre", "general.architecture"):
        assert bench.fields[key].contents() == demo.fields[key].contents(), key
    bench_tokens: list[str] = bench.fields["tokenizer.ggml.tokens"].contents()
    demo_tokens: list[str] = demo.fields["tokenizer.ggml.tokens"].contents()
    assert "<|im_end|>" in bench_tokens and "<think>" in bench_tokens
    assert set(bench_tokens) <= set(demo_tokens)


def test_ensure_bench_model_is_keyed_by_its_parameters(model_dir: Path, bench_path: Path) -> None:
    assert ensure_bench_model(model_dir, **TINY_BENCH) == bench_path
    other = ensure_bench_model(model_dir, **(TINY_BENCH | {"seed": 1}))
    assert other != bench_path
    with pytest.raises(TypeError):
        ensure_bench_model(model_dir, n_layers=2)


def test_command_line_writes_a_bench_model(tmp_path: Path) -> None:
    arguments = ["--out", str(tmp_path / "bench.gguf")]
    for key, value in TINY_BENCH.items():
        arguments += ["--" + key.replace("_", "-"), str(value)]
    assert main(arguments) == 0
    reader = gguf.GGUFReader(tmp_path / "bench.gguf")
    assert reader.fields["qwen3moe.block_count"].contents() == TINY_BENCH["n_layer"]
    assert reader.fields["qwen3moe.expert_count"].contents() == TINY_BENCH["n_expert"]
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x.gguf"), "--bench"])
