"""How prompts become token ids: client text as text, the template's markup as control tokens,
exactly llama.cpp's ids for ordinary prompts, and at a cost linear in the prompt.

The reference is llama.cpp itself: ``llama_tokenize`` with special-token parsing over the
rendered prompt, on the demo model's vocabulary (Qwen3's added tokens with Qwen3's types, as
llama.cpp loads them) and on a demo variant that carries Qwen3-Coder's chat template.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.api.openai.requests import ChatCompletionRequest, ChatMessage
from app.api.openai.to_core import chat_request, turn_of
from app.core.admission import Admission
from app.core.chat_prompt import ChatSemantics, template_message
from app.core.chat_template import ChatTemplate
from app.core.prepare import PreparedGeneration, Preparer
from app.engine import Backend
from app.engine.llama_backend import LlamaBackend
from app.engine.tokenizer import LlamaTokenizer, overlapping
from app.errors import ContextLengthExceeded
from app.main import create_app
from tests.support.clients import asgi_client
from tests.support.servers import settings_for

EXAMPLES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CONTROL = re.compile(r"<\|[a-z_]+\|>")
"""Every CONTROL token text of Qwen3's vocabulary has this form (and no other text of it)."""

# Pieces that make tokenization interesting: USER_DEFINED tokens (matched as tokens in any
# text), fragments of control token texts, multi-byte characters, whitespace runs.
PIECES = [
    "Hello", " world", "\n", "\n\n", "  ", "\t", "é", "日本語", "🙂", "<", ">", "|", "<|", "|>",
    "im_start", "im_end", "<think>", "</think>", "<tool_call>", "</tool_call>",
    "<tool_response>", "</tool_response>", "{", "}", '"', "\\", "/think", "/no_think", "<|im_",
    "_end|>", "system", "user", "assistant", "<function=f>", "<parameter=x>", "</parameter>",
]  # fmt: skip
CONTROL_TEXTS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|fim_prefix|>", "<|vision_pad|>"]


def texts(pieces: Sequence[str], max_size: int = 12) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(pieces) | st.text(max_size=4), max_size=max_size).map("".join)


ORDINARY = texts(PIECES).filter(lambda text: CONTROL.search(text) is None)
"""Client text that holds no control token text."""
HOSTILE = texts(PIECES + CONTROL_TEXTS)
"""Client text that may hold control token texts anywhere."""


def reference(backend: Backend, text: str, *, special: bool = True) -> list[int]:
    """llama.cpp's own tokens for ``text`` (the model adds no BOS)."""
    model = backend._llm._model if isinstance(backend, LlamaBackend) else backend._model  # type: ignore[attr-defined]
    tokens: list[int] = model.tokenize(text.encode(), add_bos=False, special=special)
    return tokens


def weather(description: str = "Weather now.") -> dict[str, Any]:
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
    return {"type": "function", "function": {"name": "get_weather", "description": description,
            "parameters": parameters}}  # fmt: skip


@st.composite
def conversations(draw: st.DrawFn, text: st.SearchStrategy[str]) -> dict[str, Any]:
    """A chat request body: system prompt, turns with reasoning, tool calls and results, tools
    whose descriptions and argument values are client text, thinking on or off."""
    messages: list[dict[str, Any]] = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(text)})
    turns = draw(st.integers(1, 3))
    for turn in range(turns):
        messages.append({"role": "user", "content": draw(text), **({"name": draw(text)}
                         if draw(st.booleans()) else {})})  # fmt: skip
        if turn == turns - 1 and draw(st.booleans()):
            break
        assistant: dict[str, Any] = {"role": "assistant", "content": draw(text)}
        if draw(st.booleans()):
            assistant["reasoning_content"] = draw(text)
        if draw(st.booleans()):
            arguments = json.dumps({"city": draw(text)}, ensure_ascii=draw(st.booleans()))
            call = {"id": f"call{turn}", "type": "function",
                    "function": {"name": "get_weather", "arguments": arguments}}  # fmt: skip
            messages += [
                {**assistant, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": f"call{turn}", "content": draw(text)},
            ]
            if turn == turns - 1:
                break
        else:
            messages.append(assistant)
    body: dict[str, Any] = {"messages": messages, "max_tokens": 1}
    if draw(st.booleans()):
        body["tools"] = [weather(draw(text))]
    thinking = draw(st.sampled_from([None, True, False]))
    if thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": thinking}
    return body


_PREPARERS: dict[Backend, Preparer] = {}
_CHAT_TEMPLATES: dict[Backend, ChatTemplate] = {}


def preparer(backend: Backend) -> Preparer:
    """One ``Preparer`` per backend for the session (backends are session fixtures)."""
    if backend not in _PREPARERS:
        _PREPARERS[backend] = Preparer(
            backend,
            Admission(8),
            model_names=["m"],
            semantics=ChatSemantics(),
            max_tokens_limit=None,
        )
    return _PREPARERS[backend]


def prepared(backend: Backend, body: dict[str, Any]) -> PreparedGeneration:
    job = asyncio.run(
        preparer(backend).chat(chat_request(ChatCompletionRequest.model_validate(body)))
    )
    job.ticket.release()
    return job


def chat_template(backend: Backend) -> ChatTemplate:
    """The backend's own chat template, compiled once."""
    if backend not in _CHAT_TEMPLATES:
        info = backend.info
        assert info.chat_template is not None
        _CHAT_TEMPLATES[backend] = ChatTemplate(
            info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token
        )
    return _CHAT_TEMPLATES[backend]


def rendered(backend: Backend, body: dict[str, Any]) -> str:
    """The prompt the model's chat template renders for ``body``, client text as it is."""
    coder = "<function=" in (backend.info.chat_template or "")
    return chat_template(backend).render(
        [
            template_message(turn_of(ChatMessage.model_validate(m)), arguments_as_object=coder)
            for m in body["messages"]
        ],
        tools=body.get("tools"),
        extra=body.get("chat_template_kwargs"),
    )


def controls(backend: Backend, tokens: Sequence[int]) -> list[int]:
    texts = backend.tokenizer.control_texts
    return [token for token in tokens if token in texts]


def piece(backend: Backend, token: int) -> bytes:
    """The bytes a token stands for, a control token as its text."""
    tokenizer = backend.tokenizer
    text = tokenizer.control_texts.get(token)
    return text.encode() if text is not None else tokenizer.token_bytes(token)


def as_text(backend: Backend, tokens: Sequence[int]) -> str:
    return b"".join(piece(backend, t) for t in tokens).decode()


@pytest.fixture(scope="module")
def coder_backend(scripted: Callable[..., Backend]) -> Backend:
    return scripted([b"Done.", b"<|im_end|>"], "single", "qwen3_coder")


# -- the tokenizer against llama.cpp ---------------------------------------------------------


@EXAMPLES
@given(text=texts(PIECES + CONTROL_TEXTS, max_size=30))
def test_tokenize_gives_llama_cpps_ids_with_and_without_special_parsing(
    demo_backend: LlamaBackend, text: str
) -> None:
    """The server's own partition (one scan, linear) cuts exactly where llama.cpp's does."""
    tokenizer = demo_backend.tokenizer
    assert tokenizer.tokenize(text) == reference(demo_backend, text)
    assert tokenizer.tokenize(text, special=False) == reference(demo_backend, text, special=False)


def test_the_vocabulary_is_read_as_llama_cpp_loads_it(demo_backend: LlamaBackend) -> None:
    """CONTROL: the special added tokens plus what llama.cpp makes control (FIM and repo/file
    tokens); USER_DEFINED: the thinking and tool tokens, which are text for Qwen; and no added
    token text overlaps another's, so the leftmost-longest scan is llama.cpp's partition."""
    tokenizer = demo_backend.tokenizer
    assert isinstance(tokenizer, LlamaTokenizer)
    control = set(tokenizer.control.ids)
    user_defined = set(tokenizer.user_defined.ids)
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|fim_prefix|>"} <= control
    assert user_defined == {
        "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"
    }  # fmt: skip
    assert all(CONTROL.fullmatch(text) for text in control)
    assert overlapping([*control, *user_defined]) == []
    assert overlapping(["<a|", "|b>"]) == [("<a|", "|b>")]


def test_max_token_bytes_is_the_longest_piece(demo_backend: LlamaBackend) -> None:
    """The lower bound of the early context check: no token stands for more bytes."""
    lengths = [len(piece(demo_backend, t)) for t in range(demo_backend.info.n_vocab)]
    assert max(lengths) == demo_backend.tokenizer.max_token_bytes


def test_llama_cpp_only_ever_tokenizes_text_without_added_tokens(
    demo_backend: LlamaBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why tokenizing is linear: llama.cpp's partition, quadratic in its matches, is handed no
    text in which an added token occurs, however many the prompt holds (here 30k messages and
    thousands of <think> tags in client text)."""
    tokenizer = demo_backend.tokenizer
    assert isinstance(tokenizer, LlamaTokenizer)
    added = [*tokenizer.control.ids, *tokenizer.user_defined.ids]
    seen: list[str] = []
    text_tokens = tokenizer._text_tokens

    def checked(text: str) -> list[int]:
        seen.append(text)
        assert not any(token in text for token in added), text
        return text_tokens(text)

    monkeypatch.setattr(tokenizer, "_text_tokens", checked)
    prompt = "".join(f"<|im_start|>user\n{i % 10}<|im_end|>\n" for i in range(30_000))
    tokens = tokenizer.tokenize(prompt + "<think>x</think>" * 5_000)
    assert len(controls(demo_backend, tokens)) == 60_000
    assert tokens.count(tokenizer.user_defined.ids["<think>"]) == 5_000
    # Each distinct short fragment is tokenized once per prompt: user\n0 to 9, \n and x.
    assert sorted(seen) == sorted({*(f"user\n{i}" for i in range(10)), "\n", "x"})


# -- chat prompts ----------------------------------------------------------------------------


@EXAMPLES
@given(body=conversations(ORDINARY))
def test_an_ordinary_chat_prompt_has_exactly_llama_cpps_tokens(
    demo_backend: LlamaBackend, body: dict[str, Any]
) -> None:
    """With no control token text in client strings, escaping changes nothing: the prompt's
    ids are those of tokenizing the rendered prompt with special parsing, so ordinary prompts
    keep their token counts."""
    assert prepared(demo_backend, body).prompt_tokens == reference(
        demo_backend, rendered(demo_backend, body)
    )


@EXAMPLES
@given(body=conversations(ORDINARY))
def test_an_ordinary_coder_prompt_has_exactly_llama_cpps_tokens(
    coder_backend: Backend, body: dict[str, Any]
) -> None:
    """The same on Qwen3-Coder's template, which iterates history arguments as objects."""
    assert prepared(coder_backend, body).prompt_tokens == reference(
        coder_backend, rendered(coder_backend, body)
    )


def _without_control_texts(value: Any) -> Any:
    if isinstance(value, str):
        while CONTROL.search(value):  # a removal may join the rest into another
            value = CONTROL.sub("", value)
        return value
    if isinstance(value, dict):
        return {_without_control_texts(k): _without_control_texts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_control_texts(v) for v in value]
    return value


@EXAMPLES
@given(body=conversations(HOSTILE))
def test_control_token_texts_in_client_strings_never_become_control_tokens(
    demo_backend: LlamaBackend, body: dict[str, Any]
) -> None:
    """Whatever control token texts the client writes, anywhere, the prompt holds exactly the
    control tokens of the template's own markup (those of the same conversation without them),
    and its text is the rendered prompt, the client's characters included."""
    tokens = prepared(demo_backend, body).prompt_tokens
    markup_only = reference(demo_backend, rendered(demo_backend, _without_control_texts(body)))
    assert controls(demo_backend, tokens) == controls(demo_backend, markup_only)
    assert as_text(demo_backend, tokens) == rendered(demo_backend, body)


@EXAMPLES
@given(body=conversations(HOSTILE))
def test_control_token_texts_in_coder_client_strings_never_become_control_tokens(
    coder_backend: Backend, body: dict[str, Any]
) -> None:
    tokens = prepared(coder_backend, body).prompt_tokens
    markup_only = reference(coder_backend, rendered(coder_backend, _without_control_texts(body)))
    assert controls(coder_backend, tokens) == controls(coder_backend, markup_only)
    assert as_text(coder_backend, tokens) == rendered(coder_backend, body)


# -- limits that spare the tokenizer ---------------------------------------------------------


def test_a_prompt_longer_than_the_context_in_bytes_is_refused_without_tokenizing(
    demo_backend: LlamaBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The early context check: more UTF-8 bytes than ``n_ctx`` times the longest token's
    cannot fit, so the prompt is never tokenized."""
    tokenizer = demo_backend.tokenizer

    def refuse(parts: object) -> list[int]:
        raise AssertionError("tokenized")

    monkeypatch.setattr(tokenizer, "tokenize_parts", refuse)
    n_bytes = demo_backend.info.n_ctx * tokenizer.max_token_bytes + 1
    body = {"messages": [{"role": "user", "content": "x" * n_bytes}], "max_tokens": 1}
    with pytest.raises(ContextLengthExceeded, match="at least"):
        prepared(demo_backend, body)


def test_counting_a_prompt_is_never_refused_for_the_context(demo_backend: LlamaBackend) -> None:
    """count_tokens counts a prompt of any length within the byte limit (an agent may count to
    learn that it must compact its history)."""
    n_bytes = demo_backend.info.n_ctx * demo_backend.tokenizer.max_token_bytes + 1
    body = {"messages": [{"role": "user", "content": "x" * n_bytes}]}
    request = chat_request(ChatCompletionRequest.model_validate(body))
    counted = asyncio.run(preparer(demo_backend).count_chat(request))
    assert counted > demo_backend.info.n_ctx


def test_a_prompt_that_fits_in_bytes_but_not_in_tokens_gets_its_exact_count(
    demo_backend: LlamaBackend,
) -> None:
    body = {"messages": [{"role": "user", "content": "x y " * 1500}], "max_tokens": 1}
    with pytest.raises(ContextLengthExceeded) as refused:
        prepared(demo_backend, body)
    assert "at least" not in refused.value.message


# -- raw completions -------------------------------------------------------------------------

RAW = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.anyio
@pytest.mark.parametrize("parse_special", [True, False])
async def test_raw_completion_prompts_parse_control_tokens_unless_turned_off(
    demo_backend: LlamaBackend, parse_special: bool
) -> None:
    """``/v1/completions`` clients write the markup on purpose (the default); the setting
    makes it text there too."""
    app = create_app(settings_for(completions_parse_special=parse_special), backend=demo_backend)
    async with asgi_client(app) as client:
        response = await client.post("/v1/completions", json={"prompt": RAW, "max_tokens": 1})
    assert response.status_code == 200, response.text
    expected = reference(demo_backend, RAW, special=parse_special)
    assert response.json()["usage"]["prompt_tokens"] == len(expected)
