"""The official ``openai`` SDK as the client, against a real uvicorn."""

from __future__ import annotations

import openai
import pytest

from app.demo_model import script_text
from tests.conftest import LiveServer

SCRIPT = script_text()
HELLO = [{"role": "user", "content": "Hello!"}]


@pytest.fixture
def sdk(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)


@pytest.mark.falsifies("QWEN3_MOE_STREAMING_SSE_V1_002", "QWEN3_MOE_OPENAI_WIRE_V1_001")
def test_sdk_chat_buffered_and_streamed_agree(sdk: openai.OpenAI) -> None:
    buffered = sdk.chat.completions.create(
        model="qwen3-moe-demo",
        messages=HELLO,
        temperature=0,  # type: ignore[arg-type]
    )
    assert buffered.choices[0].message.content == SCRIPT
    assert buffered.choices[0].finish_reason == "stop"
    stream = sdk.chat.completions.create(
        model="qwen3-moe-demo",
        messages=HELLO,  # type: ignore[arg-type]
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, finishes, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    assert "".join(parts) == SCRIPT
    assert finishes == ["stop"]
    assert usage is not None and buffered.usage is not None
    assert usage.completion_tokens == buffered.usage.completion_tokens
    assert usage.prompt_tokens == buffered.usage.prompt_tokens


@pytest.mark.falsifies("QWEN3_MOE_OPENAI_WIRE_V1_002")
def test_sdk_text_completion(sdk: openai.OpenAI) -> None:
    result = sdk.completions.create(
        model="qwen3-moe-demo", prompt="<|im_start|>assistant\n", max_tokens=3, temperature=0
    )
    assert result.choices[0].finish_reason == "length"
    assert SCRIPT.startswith(result.choices[0].text)


@pytest.mark.falsifies(
    "QWEN3_MOE_OPENAI_WIRE_V1_002",
    "QWEN3_MOE_OPENAI_WIRE_V1_004",
    "QWEN3_MOE_OPENAI_WIRE_V1_005",
)
def test_sdk_sees_typed_errors(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="nope", messages=HELLO)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        sdk.chat.completions.create(
            model="qwen3-moe-demo",
            messages=HELLO,
            max_tokens=10**6,  # type: ignore[arg-type]
        )
    assert too_long.value.code == "context_length_exceeded"
    models = sdk.models.list()
    assert [m.id for m in models.data] == ["qwen3-moe-demo"]
