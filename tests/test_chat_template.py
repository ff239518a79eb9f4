"""Prompt rendering with Qwen3's published chat template (the copy packaged in ``app/``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from app.core.chat_template import ChatTemplate, TemplateRejected

PACKAGED = Path(__file__).resolve().parents[1] / "app" / "qwen3_chat_template.jinja"
PUBLISHED_SHA256 = "c945a4a87850dd79827191150be98539a7a5e7da0689f3550d880f8dcc95b856"
"""SHA-256 of the template Qwen3 models publish in their tokenizer configuration."""


@pytest.fixture(scope="module")
def qwen3() -> ChatTemplate:
    return ChatTemplate(
        PACKAGED.read_text(encoding="utf-8"), bos_token="<|endoftext|>", eos_token="<|im_end|>"
    )


def test_packaged_template_is_the_published_one() -> None:
    """Guards the packaged copy against accidental edits: it must stay byte for byte what
    Qwen3 publishes, since every prompt the demo model and the tests render comes from it."""
    assert hashlib.sha256(PACKAGED.read_bytes()).hexdigest() == PUBLISHED_SHA256


def test_system_and_user_turns(qwen3: ChatTemplate) -> None:
    prompt = qwen3.render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_enable_thinking_false_prefills_an_empty_think_block(qwen3: ChatTemplate) -> None:
    prompt = qwen3.render([{"role": "user", "content": "Hi"}], extra={"enable_thinking": False})
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_reasoning_of_earlier_turns_is_dropped(qwen3: ChatTemplate) -> None:
    prompt = qwen3.render(
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello!"},
            {"role": "user", "content": "Again"},
        ]
    )
    assert "hmm" not in prompt
    assert "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nAgain" in prompt


def test_tools_and_tool_results_render_as_qwen_expects(qwen3: ChatTemplate) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    prompt = qwen3.render(
        [
            {"role": "user", "content": "Weather in Zürich?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}
                ],
            },
            {"role": "tool", "content": "12°C"},
        ],
        tools=[tool],
    )
    assert '"name": "get_weather"' in prompt and "Zürich" in prompt  # tojson keeps non-ASCII
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
        in prompt
    )
    assert "<|im_start|>user\n<tool_response>\n12°C\n</tool_response><|im_end|>" in prompt


def test_template_raise_exception_is_a_client_error() -> None:
    template = ChatTemplate(
        "{{ raise_exception('roles must alternate') }}", bos_token="", eos_token=""
    )
    with pytest.raises(TemplateRejected, match="roles must alternate"):
        template.render([{"role": "user", "content": "x"}])


CODER_PACKAGED = PACKAGED.with_name("qwen3_coder_chat_template.jinja")
CODER_PUBLISHED_SHA256 = "d287fb2edf144207f868ae1b282755dc19db2a3f1c5b3a3d57e9e5abffa98392"
"""SHA-256 of the template Qwen3-Coder (Qwen3-Coder-30B-A3B-Instruct) publishes."""


def test_packaged_coder_template_is_the_published_one() -> None:
    """Guards the packaged Qwen3-Coder copy the same way: the XML tool-call format is
    detected from it and the Coder demo models carry it."""
    assert hashlib.sha256(CODER_PACKAGED.read_bytes()).hexdigest() == CODER_PUBLISHED_SHA256
