"""Code completion in the editor on the real engine: ``POST /infill`` as llama-server answers
it, ``/v1/completions`` with ``suffix``, the editor's limits, ``n_cmpl``, the cache warm-up and
KV chunk reuse.

The model is a demo variant whose greedy answer to any prompt (a FIM prompt ends in
``<|fim_middle|>``, which predicts the script's first piece like any other token) is a short
code completion ending in ``<|endoftext|>``, as Qwen's code models end a middle. Expectations
come from the script, not from recorded output.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.demo import ensure_demo_model, script_text
from app.engine import Backend
from app.engine.batched import BatchedLlamaBackend
from app.engine.llama_backend import LlamaBackend
from app.main import create_app
from tests.support.clients import asgi_client
from tests.support.models import ENGINES, engine_config
from tests.support.servers import LiveServer, settings_for

pytestmark = pytest.mark.anyio

CODE = (b"    return", b" a", b" +", b" b", b"\n\n", b"def", b" main", b"():", b"<|endoftext|>")
ANSWER = script_text(CODE)
MIN_CHUNK = 32

PREFIX = "import os\n\n\ndef add(a, b):\n"
SUFFIX = "\n\nprint(add(1, 2))\n"
CHUNKS = [
    {"text": "".join(f"value_{n}_{i} = {i} * {n}\n" for i in range(12)), "filename": f"m{n}.py"}
    for n in range(4)
]


def llama_vim_body(**fields: Any) -> dict[str, Any]:
    """The fields llama.vim's ``llama#fim`` sends (its sampling included), greedy unless a test
    samples: temperature does not count once ``samplers`` leaves it out, so top-k 1."""
    body: dict[str, Any] = {
        "id_slot": 0,
        "input_prefix": PREFIX,
        "input_suffix": SUFFIX,
        "input_extra": [{**chunk, "time": 1700000000} for chunk in CHUNKS[:2]],
        "prompt": "",
        "n_predict": 128,
        "stop": [],
        "n_indent": 0,
        "top_k": 1,
        "top_p": 0.90,
        "samplers": ["top_k", "top_p", "infill"],
        "stream": False,
        "cache_prompt": True,
        "t_max_prompt_ms": 500,
        "t_max_predict_ms": 1000,
    }
    body.update(fields)
    return body


@pytest.fixture(scope="module")
def code_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("fim"), CODE)


@pytest.fixture(scope="module")
def engines(code_model: Path) -> Iterator[dict[str, Backend]]:
    loaded: dict[str, Backend] = {
        "single": LlamaBackend(engine_config(code_model, n_ctx=2048)),
        "batched": BatchedLlamaBackend(
            engine_config(code_model, n_ctx=2048, n_batch=256, cache_reuse=MIN_CHUNK), parallel=2
        ),
    }
    yield loaded
    for backend in loaded.values():
        backend.close()


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, engines: dict[str, Backend]) -> Backend:
    return engines[request.param]


async def infill(backend: Backend, **fields: Any) -> dict[str, Any]:
    """The answer to one llama.vim request."""
    answer: dict[str, Any] = await _infill(backend, **fields)
    return answer


async def infill_n(backend: Backend, n_cmpl: int, **fields: Any) -> list[dict[str, Any]]:
    """The ``n_cmpl`` answers to one request that asks for several."""
    answers: list[dict[str, Any]] = await _infill(backend, n_cmpl=n_cmpl, **fields)
    return answers


async def _infill(backend: Backend, **fields: Any) -> Any:
    async with asgi_client(create_app(settings_for(), backend=backend)) as client:
        response = await client.post("/infill", json=llama_vim_body(**fields))
    assert response.status_code == 200, response.text
    return response.json()


def data_events(text: str) -> list[dict[str, Any]]:
    """The ``data:`` events of an ``/infill`` stream (llama-server's: no ``[DONE]``)."""
    frames = [frame for frame in text.split("\n\n") if frame.strip()]
    assert all(frame.startswith("data: ") for frame in frames), frames
    return [json.loads(frame.removeprefix("data: ")) for frame in frames]


# -- the answer -------------------------------------------------------------------------------


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_002")
async def test_infill_answers_as_llama_server_does(engine: Backend) -> None:
    answer = await infill(engine)
    assert answer["content"] == ANSWER
    assert answer["stop"] is True and answer["stop_type"] == "eos"
    assert answer["stopping_word"] == "" and answer["truncated"] is False
    assert answer["tokens_predicted"] == len(CODE)  # the end token included, as llama.cpp counts
    timings = answer["timings"]
    assert timings["prompt_n"] + timings["cache_n"] == answer["tokens_evaluated"]
    assert timings["cache_n"] == answer["tokens_cached"]
    assert timings["predicted_n"] == answer["tokens_predicted"]
    for key in ("prompt_ms", "prompt_per_second", "predicted_ms", "predicted_per_token_ms"):
        assert timings[key] >= 0
    assert answer["has_new_line"] is True


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_002")
@pytest.mark.parametrize("name", ENGINES)
def test_a_stream_carries_the_buffered_content_over_a_real_socket(
    name: str, engines: dict[str, Backend]
) -> None:
    with LiveServer(create_app(settings_for(), backend=engines[name])) as server:
        buffered = httpx.post(f"{server.url}/infill", json=llama_vim_body(), timeout=60).json()
        with httpx.stream(
            "POST", f"{server.url}/infill", json=llama_vim_body(stream=True), timeout=60
        ) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = data_events(response.read().decode())
    *deltas, final = events
    assert [event["stop"] for event in deltas] == [False] * len(deltas)
    assert len(deltas) > 1  # token by token
    assert "".join(event["content"] for event in deltas) == buffered["content"] == ANSWER
    assert final["stop"] is True and final["content"] == ""
    assert final["tokens_predicted"] == buffered["tokens_predicted"]
    assert final["stop_type"] == "eos"


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_002")
async def test_response_fields_are_picked_and_flattened(engine: Backend) -> None:
    fields = ["content", "timings/prompt_n", "timings/nothing", "tokens_cached", "truncated"]
    answer = await infill(engine, response_fields=fields)
    assert set(answer) == {"content", "timings/prompt_n", "tokens_cached", "truncated"}
    assert answer["content"] == ANSWER


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_002")
@pytest.mark.parametrize(
    "end", [b"<|endoftext|>", b"<|fim_pad|>", b"<|file_sep|>", b"<|repo_name|>", b"<|im_end|>"]
)
async def test_every_fim_end_token_ends_the_middle(
    end: bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    script = (*CODE[:-1], end)
    path = ensure_demo_model(tmp_path_factory.getbasetemp() / "fim-ends", script)
    backend = LlamaBackend(engine_config(path, n_ctx=2048))
    try:
        answer = await infill(backend)
    finally:
        backend.close()
    assert answer["content"] == ANSWER
    assert answer["stop_type"] == "eos"
    assert answer["tokens_predicted"] == len(script)


# -- the editor's limits ----------------------------------------------------------------------


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_002")
async def test_n_indent_ends_at_a_line_indented_less(engine: Backend) -> None:
    answer = await infill(engine, n_indent=4)
    # "\n\n" opens a blank line (indent 0 < 4): llama-server cuts there
    assert answer["content"] == ANSWER[: ANSWER.index("\n") + 1]
    assert answer["stop_type"] == "limit"


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_002")
async def test_t_max_predict_ms_ends_at_the_first_newline_once_over_time(engine: Backend) -> None:
    answer = await infill(engine, t_max_predict_ms=0.001)
    first_line_token = next(piece for piece in CODE if b"\n" in piece)
    upto = b"".join(CODE[: CODE.index(first_line_token) + 1]).decode()
    assert answer["content"] == upto
    assert answer["stop_type"] == "limit"


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_002")
async def test_n_predict_and_stop_strings_end_it_too(engine: Backend) -> None:
    short = await infill(engine, n_predict=3)
    assert short["content"] == b"".join(CODE[:3]).decode() and short["stop_type"] == "limit"
    word = await infill(engine, stop=[" +"])
    assert word["content"] == ANSWER[: ANSWER.index(" +")]
    assert (word["stop_type"], word["stopping_word"]) == ("word", " +")


# -- several completions, and the warm-up ------------------------------------------------------


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_004")
async def test_n_cmpl_completions_share_one_prefill(engines: dict[str, Backend]) -> None:
    backend = engines["batched"]
    extra = [{**chunk, "filename": "n_cmpl.py"} for chunk in CHUNKS[2:]]  # a prompt no slot holds
    answers = await infill_n(backend, 2, input_extra=extra)
    assert isinstance(answers, list) and [a["index"] for a in answers] == [0, 1]
    assert [a["content"] for a in answers] == [ANSWER, ANSWER]
    decoded = [a["timings"]["prompt_n"] for a in answers]
    assert sorted(decoded) == [0, answers[0]["tokens_evaluated"]]  # one prefill for both
    assert all(a["tokens_evaluated"] == answers[0]["tokens_evaluated"] for a in answers)


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_004")
async def test_n_cmpl_streams_interleave_by_index(engines: dict[str, Backend]) -> None:
    async with asgi_client(create_app(settings_for(), backend=engines["batched"])) as client:
        response = await client.post("/infill", json=llama_vim_body(n_cmpl=2, stream=True))
    events = data_events(response.text)
    for index in (0, 1):
        mine = [event for event in events if event["index"] == index]
        assert "".join(event["content"] for event in mine) == ANSWER
        assert [event["stop"] for event in mine].count(True) == 1 and mine[-1]["stop"]


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_004")
async def test_n_cmpl_above_the_slots_waits_its_turn(engines: dict[str, Backend]) -> None:
    """llama.vscode asks for 3 completions by default; a one-slot server (a CPU build's
    default) answers them one after the other, each after the first from the cached prompt."""
    answers = await infill_n(engines["single"], 3)
    assert [a["content"] for a in answers] == [ANSWER] * 3
    assert [a["timings"]["prompt_n"] for a in answers[1:]] == [1, 1]


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_004")
async def test_the_warm_up_fills_the_cache_and_samples_nothing(engine: Backend) -> None:
    """llama.vim's request when a chunk enters its ring: the next completion finds the ring
    decoded and decodes only the text around the cursor."""
    ring = [{**chunk, "filename": f"warm-{chunk['filename']}"} for chunk in CHUNKS]
    warm_up = {"input_prefix": "", "input_suffix": "", "prompt": "", "n_predict": 0}
    warm_up |= {"samplers": [], "temperature": 0.0, "input_extra": ring}
    warm_up |= {"t_max_prompt_ms": 1, "t_max_predict_ms": 1}
    filled = await infill(engine, **warm_up)
    assert filled["content"] == "" and filled["tokens_predicted"] == 0
    assert filled["timings"]["prompt_n"] + filled["tokens_cached"] == filled["tokens_evaluated"]
    assert filled["tokens_cached"] < 20  # these files were never sent before: the header at most
    assert await infill(engine, **warm_up, response_fields=[""]) == {}
    answer = await infill(engine, input_extra=ring)
    assert answer["content"] == ANSWER
    # everything up to the end of the ring (its header and the current file's separator)
    assert answer["tokens_cached"] >= filled["tokens_evaluated"] - 3
    assert (
        answer["timings"]["prompt_n"] <= answer["tokens_evaluated"] - filled["tokens_evaluated"] + 3
    )


# -- KV chunk reuse -----------------------------------------------------------------------------


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_003")
async def test_a_rotated_ring_is_moved_not_decoded_again(
    engines: dict[str, Backend], code_model: Path
) -> None:
    """llama.vim's ring drops its oldest chunk: everything after it moves forward. The slot
    keeps it all (moved), decodes one token, and answers what a cold slot answers."""
    batched = engines["batched"]
    ring = [{**chunk, "filename": f"ring-{chunk['filename']}"} for chunk in CHUNKS]
    first = await infill(batched, input_extra=ring)
    rotated = await infill(batched, input_extra=ring[1:])
    assert rotated["tokens_cached"] == rotated["tokens_evaluated"] - 1
    assert rotated["timings"]["prompt_n"] == 1
    cold_backend = BatchedLlamaBackend(
        engine_config(code_model, n_ctx=2048, n_batch=256), parallel=1
    )
    try:
        cold = await infill(cold_backend, input_extra=ring[1:])
        prefix_only = await infill(cold_backend, input_extra=ring[2:])
    finally:
        cold_backend.close()
    assert cold["tokens_cached"] == 0
    assert rotated["content"] == cold["content"] == first["content"] == ANSWER
    # without chunk reuse (--cache-reuse 0) only the common prefix is kept: the ring's header
    # and the first file's name up to where the names differ
    assert prefix_only["timings"]["prompt_n"] > 0.95 * prefix_only["tokens_evaluated"]


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_003")
async def test_a_chat_that_drops_old_turns_keeps_the_rest_cached(
    engines: dict[str, Backend],
) -> None:
    """A client that drops the oldest turns of a long conversation to fit (as agents compact
    their history): the turns kept are moved, not decoded again."""
    backend = engines["batched"]
    turns = [f"turn {i}: " + " ".join(f"word{i}x{j}" for j in range(60)) for i in range(4)]
    system = {"role": "system", "content": "You are terse."}
    history: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        history += [{"role": "user", "content": turn}, {"role": "assistant", "content": f"ok {i}"}]
    async with asgi_client(create_app(settings_for(), backend=backend)) as client:
        body = {"max_tokens": 2, "temperature": 0}
        whole = [system, *history, {"role": "user", "content": "next"}]
        first = await client.post("/v1/chat/completions", json={**body, "messages": whole})
        assert first.status_code == 200
        dropped = [system, *history[2:], {"role": "user", "content": "next"}]
        second = await client.post("/v1/chat/completions", json={**body, "messages": dropped})
    usage = second.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1
    assert (
        second.json()["choices"][0]["message"]["content"]
        == first.json()["choices"][0]["message"]["content"]
    )


# -- /v1/completions' suffix -------------------------------------------------------------------


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_002")
async def test_completions_with_suffix_answer_what_infill_answers(engine: Backend) -> None:
    async with asgi_client(create_app(settings_for(), backend=engine)) as client:
        # Typed for httpx2's client; the SDK takes an httpx one too (ours carries the ASGI app).
        sdk = openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=client)  # type: ignore[arg-type]
        completion = await sdk.completions.create(
            model="qwen3-moe-demo", prompt=PREFIX, suffix=SUFFIX, max_tokens=64, temperature=0
        )
        raw = await client.post(
            "/v1/completions",
            json={
                "prompt": f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>",
                "max_tokens": 64,
                "temperature": 0,
            },
        )
        infilled = await client.post(
            "/infill",
            json=llama_vim_body(input_extra=[], response_fields=["content", "tokens_evaluated"]),
        )
    assert completion.choices[0].text == ANSWER
    assert completion.choices[0].finish_reason == "stop"
    assert raw.json()["choices"][0]["text"] == ANSWER  # the raw FIM prompt still works
    assert infilled.json()["content"] == ANSWER
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == infilled.json()["tokens_evaluated"]
    assert completion.usage.prompt_tokens == raw.json()["usage"]["prompt_tokens"]


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_002")
async def test_a_model_without_fim_tokens_gets_a_clear_400(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    path = ensure_demo_model(tmp_path_factory.mktemp("no-fim"), CODE, fim=False)
    backend = LlamaBackend(engine_config(path, n_ctx=2048))
    try:
        async with asgi_client(create_app(settings_for(), backend=backend)) as client:
            refused = await client.post("/infill", json=llama_vim_body())
            suffixed = await client.post(
                "/v1/completions", json={"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 4}
            )
            plain = await client.post(
                "/v1/completions", json={"prompt": PREFIX, "suffix": "", "max_tokens": 4}
            )
            chat = await client.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            )
    finally:
        backend.close()
    for response in (refused, suffixed):
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "fim_not_supported" and "fill-in-the-middle" in error["message"]
    assert plain.status_code == 200 and chat.status_code == 200


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_002")
async def test_bad_infill_bodies_are_400s(engine: Backend) -> None:
    async with asgi_client(create_app(settings_for(), backend=engine)) as client:
        for bad in (
            {"input_extra": "not a list"},
            {"input_extra": [{"filename": "no text"}]},
            {"n_predict": -2},
            {"n_indent": -1},
            {"n_cmpl": 0},
            {"input_prefix": 7},
        ):
            response = await client.post("/infill", json=llama_vim_body(**bad))
            assert response.status_code == 400, (bad, response.text)
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert (await client.post("/infill", json=llama_vim_body())).status_code == 200


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_001")
async def test_a_file_larger_than_the_window_is_cut_and_says_so(engine: Backend) -> None:
    """A prefix, a suffix and a ring of chunks far past the context still complete: the far
    text is left out, the prompt fits with the completion, and ``truncated`` says so."""
    long_prefix = "".join(f"line_{i} = {i}\n" for i in range(3000)) + PREFIX
    long_suffix = SUFFIX + "".join(f"tail_{i} = {i}\n" for i in range(3000))
    ring = [
        {**chunk, "filename": f"big{i}-{chunk['filename']}"} for i in range(20) for chunk in CHUNKS
    ]
    answer = await infill(
        engine, input_prefix=long_prefix, input_suffix=long_suffix, input_extra=ring
    )
    assert answer["content"] == ANSWER
    assert answer["truncated"] is True
    assert answer["tokens_evaluated"] + 128 <= 2048
    short = await infill(engine, input_extra=[])
    assert short["truncated"] is False


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_003")
async def test_keystrokes_do_not_fill_the_prompt_cache(code_model: Path) -> None:
    """Each keystroke revises the document in the slot: the old version is not copied to the
    host-RAM prompt cache (a whole-state copy per request, for a version never asked for
    again), but a conversation that takes the slot over still saves the editor's cells."""
    backend = BatchedLlamaBackend(
        engine_config(
            code_model, n_ctx=2048, n_batch=256, cache_reuse=MIN_CHUNK, prompt_cache_mib=64
        ),
        parallel=1,
    )
    try:
        line = "    total = a"
        for typed in range(1, len(line) + 1):
            await infill(backend, prompt=line[:typed])
        stats = backend.prompt_cache_stats()
        assert stats is not None and stats.saved_bytes == 0
        async with asgi_client(create_app(settings_for(), backend=backend)) as client:
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
        stats = backend.prompt_cache_stats()
        assert stats is not None and stats.saved_bytes > 0 and stats.entries == 1
    finally:
        backend.close()
