"""The llama.cpp knobs on the real engine (docs/llama-knobs.md): expert placement through
``tensor_buft_overrides``, KV cache types, the host-RAM prompt cache, thinking budgets, the
context length in ``/v1/models``, and start-up errors that name their flag.

Evidence comes from llama.cpp itself where it can: the tensors it reports overriding in its
own load log, the sizes of the states it saves. Outputs are compared greedy token for token:
on the scripted demo model against its script, on the random bench model against the same
prompt on an engine that never had the knob (a restored state that differed in one cell would
change the random model's answer).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest

from app.cli import main as cli_main
from app.cli import parse_settings
from app.core.thinking_budget import EFFORT_BUDGETS
from app.demo import DEFAULT_SCRIPT
from app.engine import (
    Backend,
    SamplingParams,
    ThinkingBudget,
    host_memory,
    load_backend,
    prompt_store,
)
from app.engine.batched import BatchedLlamaBackend
from app.engine.llama_backend import LlamaBackend
from app.engine.llama_setup import kv_cache_bytes
from app.engine.prompt_cache import PromptCache, SavedPrompt
from app.engine.protocol import PromptCacheStats
from app.engine.thinking_limit import BudgetTracker
from app.main import create_app
from app.settings import ENV_PREFIX, KvCacheType, Settings
from bench.model import ensure_bench_model, random_prompt
from tests.chat import both, chat_client, delta_field
from tests.support.clients import HELLO, asgi_client
from tests.support.models import ENGINES, engine_config
from tests.support.servers import settings_for

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(temperature=0.0)
ANSWER = b"".join(DEFAULT_SCRIPT[DEFAULT_SCRIPT.index(b"</think>") + 2 : -1]).decode()
THOUGHT = b"".join(DEFAULT_SCRIPT[1 : DEFAULT_SCRIPT.index(b"</think>")]).decode().strip()

# A demo model that thinks for 20 tokens, then answers in 6.
LONG_THOUGHT = (
    b"\nLet", b" me", b" think", b" this", b" through", b" slowly", b" and", b" with",
    b" great", b" care", b",", b" one", b" step", b" at", b" a", b" time", b" until", b" all",
    b" clear", b".\n",
)  # fmt: skip
LONG_ANSWER = (b"Sure", b"!", b" Here", b" it", b" is", b".")
LONG_THINK_SCRIPT = (b"<think>", *LONG_THOUGHT, b"</think>", b"\n\n", *LONG_ANSWER, b"<|im_end|>")


def settings(model: Path, **knobs: Any) -> Settings:
    """Server settings for ``load_backend`` on a test model: CPU, one thread, small context."""
    values: dict[str, Any] = {
        "model": model,
        "n_ctx": 1024,
        "n_batch": 64,
        "n_gpu_layers": 0,
        "n_threads": 1,
        "parallel": 1,
    }
    return Settings(**(values | knobs))


async def generate(
    backend: Backend, prompt: Sequence[int], max_tokens: int = 16
) -> tuple[list[int], int]:
    """Greedy tokens for ``prompt`` and how many prompt tokens came from the cache."""
    tokens: list[int] = []
    result = await backend.generate(prompt, GREEDY, max_tokens, lambda t: tokens.append(t) or True)
    return tokens, result.cached_tokens


# -- settings and start-up errors --------------------------------------------------------------


@pytest.mark.falsifies("QWEN3_MOE_LLAMA_KNOBS_V1_006")
def test_every_knob_is_a_flag_and_a_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    assert (defaults.cpu_moe, defaults.n_cpu_moe, defaults.override_tensor) == (False, 0, [])
    assert (defaults.cache_type_k, defaults.cache_type_v) == ("f16", "f16")
    assert (defaults.cache_ram, defaults.reasoning_budget) == ("auto", -1)
    parsed = parse_settings(
        [
            "--cpu-moe", "--n-cpu-moe", "12", "--override-tensor", r"blk\.1\.ffn_up_exps=CPU",
            "--override-tensor", "attn_q=CPU,attn_k=CPU", "--cache-type-k", "q8_0",
            "--cache-type-v", "q4_0", "--cache-ram", "4096", "--reasoning-budget", "512",
        ]
    )  # fmt: skip
    assert parsed.cpu_moe and parsed.n_cpu_moe == 12
    assert parsed.override_tensor == [r"blk\.1\.ffn_up_exps=CPU", "attn_q=CPU", "attn_k=CPU"]
    assert (parsed.cache_type_k, parsed.cache_type_v) == ("q8_0", "q4_0")
    assert (parsed.cache_ram, parsed.reasoning_budget) == (4096, 512)
    for name, value in {
        "CPU_MOE": "true",
        "N_CPU_MOE": "3",
        "OVERRIDE_TENSOR": r"ffn_.*_exps=CPU,blk\.0\.attn_q=CPU",
        "CACHE_TYPE_K": "q8_0",
        "CACHE_TYPE_V": "q8_0",
        "CACHE_RAM": "-1",
        "REASONING_BUDGET": "0",
    }.items():
        monkeypatch.setenv(f"{ENV_PREFIX}{name}", value)
    env = parse_settings([])
    assert env.cpu_moe and env.n_cpu_moe == 3
    assert env.override_tensor == ["ffn_.*_exps=CPU", r"blk\.0\.attn_q=CPU"]
    assert (env.cache_type_v, env.cache_ram, env.reasoning_budget) == ("q8_0", -1, 0)


@pytest.mark.falsifies("QWEN3_MOE_LLAMA_KNOBS_V1_006")
@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--cache-type-v", "q8_0", "--flash-attn", "off"], "--cache-type-v q8_0 needs flash"),
        (["--cache-type-k", "q9_9"], "--cache-type-k"),
        (["--override-tensor", "no-buffer-type"], "--override-tensor 'no-buffer-type'"),
        (["--override-tensor", "(unclosed=CPU"], "--override-tensor '(unclosed=CPU'"),
        (["--override-tensor", r"(?<=blk)\.0=CPU"], "ECMAScript"),
        (["--override-tensor", "ffn_.*_exps=NOSUCH0"], "--override-tensor ffn_.*_exps=NOSUCH0"),
        (["--n-cpu-moe", "-1"], "--n-cpu-moe"),
        (["--cache-ram", "-2"], "--cache-ram"),
        (["--reasoning-budget", "-2"], "--reasoning-budget"),
    ],
    ids=[
        "v-without-fa",
        "k-type",
        "rule",
        "regex",
        "lookbehind",
        "buffer-type",
        "ncmoe",
        "ram",
        "budget",
    ],
)
def test_an_invalid_knob_stops_the_start_naming_its_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli_main(argv)
    message = str(stopped.value.code)
    assert message.startswith("qwen3-moe-serve: invalid settings")
    assert flag in message and "Traceback" not in message
    if "NOSUCH0" in flag:
        assert "it has CPU" in message  # the buffer types this build does have


@pytest.mark.falsifies("QWEN3_MOE_LLAMA_KNOBS_V1_006")
@pytest.mark.parametrize("parallel", [1, 2], ids=["single", "batched"])
def test_a_kv_type_whose_blocks_do_not_divide_the_head_size_is_refused_by_flag(
    model_cache: Path, parallel: int
) -> None:
    """A 48-wide head cannot hold q8_0's 32-value blocks: llama.cpp would refuse the context
    with a log line; the server refuses the setting, naming it, on both engines."""
    model = ensure_bench_model(
        model_cache, n_layer=1, n_embd=96, n_expert=2, n_expert_used=1, n_ff_exp=32,
        n_head=2, n_head_kv=1, head_dim=48,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"--cache-type-k q8_0: .* head size 48"):
        load_backend(settings(model, parallel=parallel, cache_type_k="q8_0"), model)
    with pytest.raises(ValueError, match=r"--cache-type-v q4_0: .* head size 48"):
        load_backend(settings(model, parallel=parallel, cache_type_v="q4_0"), model)


# -- expert placement ----------------------------------------------------------------------------


def expert_tensors(layers: Sequence[int]) -> dict[str, str]:
    kinds = ("up", "down", "gate")
    return {f"blk.{i}.ffn_{kind}_exps.weight": "CPU" for i in layers for kind in kinds}


@pytest.mark.falsifies("QWEN3_MOE_LLAMA_KNOBS_V1_001")
async def test_n_cpu_moe_reaches_llama_cpp_and_the_model_answers_as_before(
    demo_model_path: Path,
) -> None:
    """--parallel 1 with --n-cpu-moe 1 loads on the one-slot batching engine; llama.cpp's own
    log names exactly layer 0's three expert tensors as overridden to CPU; the answer is the
    script's."""
    backend = load_backend(settings(demo_model_path, n_cpu_moe=1, n_ctx=512), demo_model_path)
    try:
        assert isinstance(backend, BatchedLlamaBackend) and backend.max_concurrency == 1
        assert backend.placement.overridden == expert_tensors([0])
        async with chat_client(backend) as client:
            buffered, _ = await both(client)
    finally:
        backend.close()
    message = buffered["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == (THOUGHT, ANSWER)


@pytest.mark.falsifies("QWEN3_MOE_LLAMA_KNOBS_V1_001")
def test_cpu_moe_and_override_tensor_rules_reach_llama_cpp(
    slow_model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rules = [r"blk\.[13]\.attn_q_norm\.weight=CPU", "no_such_tensor=CPU"]
    caplog.set_level(logging.INFO, logger="app.engine.placement")
    backend = load_backend(
        settings(slow_model_path, cpu_moe=True, override_tensor=rules), slow_model_path
    )
    try:
        overridden = backend.placement.overridden  # type: ignore[attr-defined]
    finally:
        backend.close()
    expected = expert_tensors(range(4)) | {f"blk.{i}.attn_q_norm.weight": "CPU" for i in (1, 3)}
    assert overridden == expected
    assert "tensor overrides: 14 tensors to CPU" in caplog.text

    caplog.clear()
    backend = load_backend(
        settings(slow_model_path, override_tensor=["nothing=CPU"]), slow_model_path
    )
    backend.close()
    assert "llama.cpp reported no tensor matched" in caplog.text


@pytest.mark.falsifies("QWEN3_MOE_LLAMA_KNOBS_V1_006")
def test_a_rule_llama_cpp_cannot_apply_fails_the_load_naming_the_flags(
    demo_model_path: Path,
) -> None:
    """A regex past the settings' checks that llama.cpp's std::regex still rejects: the load
    fails with llama.cpp's own words and the flags, not a bare "failed to load"."""
    config = engine_config(demo_model_path, n_ctx=256, tensor_overrides=((r"(?<=blk)\.0", "CPU"),))
    with pytest.raises(
        ValueError, match=r"--override-tensor.*llama.cpp said: .*regular expression"
    ):
        BatchedLlamaBackend(config, parallel=1)


def test_without_knobs_parallel_1_stays_on_the_one_slot_engine(demo_model_path: Path) -> None:
    backend = load_backend(settings(demo_model_path, n_ctx=512, cache_ram=0), demo_model_path)
    try:
        assert isinstance(backend, LlamaBackend)
    finally:
        backend.close()


def test_by_default_parallel_1_keeps_a_prompt_cache_sized_from_host_memory(
    demo_model_path: Path,
) -> None:
    """Out of the box a conversation whose slot another one took comes back from host memory
    (issue 22): the default --cache-ram auto runs --parallel 1 on the batching engine with a
    cache of a quarter of the memory available, the CPU model's weights set aside."""
    backend = load_backend(settings(demo_model_path, n_ctx=512), demo_model_path)
    try:
        assert isinstance(backend, BatchedLlamaBackend) and backend.max_concurrency == 1
        stats = backend.prompt_cache_stats()
    finally:
        backend.close()
    available = host_memory.available_bytes()
    assert stats is not None and stats.limit_bytes is not None and available is not None
    weights = demo_model_path.stat().st_size
    expected = (available - weights) * host_memory.AUTO_SHARE
    assert abs(stats.limit_bytes - expected) < 0.1 * expected + 2 * host_memory.MIB


def test_auto_cache_size_reads_the_container_limit(tmp_path: Path) -> None:
    """A container's cgroup limit bounds the auto size where it is below MemAvailable; an
    unreadable machine turns the cache off rather than guessing."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 67108864 kB\nMemAvailable: 33554432 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text(f"{6 * 1024**3}\n")
    (cgroup / "memory.current").write_text(f"{2 * 1024**3}\n")
    assert host_memory.available_bytes(meminfo, cgroup) == 4 * 1024**3
    (cgroup / "memory.max").write_text("max\n")
    assert host_memory.available_bytes(meminfo, cgroup) == 32 * 1024**3
    assert host_memory.auto_prompt_cache_mib(8 * 1024**3, 32 * 1024**3) == 6 * 1024
    assert host_memory.auto_prompt_cache_mib(0, None) == 0
    assert host_memory.available_bytes(tmp_path / "none", tmp_path / "none") is None


# -- KV cache types ------------------------------------------------------------------------------


def held_state_bytes(backend: Backend) -> int:
    """Bytes of the KV state llama.cpp saves for the (first) sequence the backend holds."""
    if isinstance(backend, LlamaBackend):
        return int(llama_cpp.llama_state_seq_get_size(backend._llm._ctx.ctx, 0))
    assert isinstance(backend, BatchedLlamaBackend)
    return int(llama_cpp.llama_state_seq_get_size(backend._ctx, 0))


@pytest.mark.falsifies("QWEN3_MOE_LLAMA_KNOBS_V1_002")
@pytest.mark.parametrize("engine", ENGINES)
async def test_a_quantized_kv_cache_generates_and_takes_the_memory_its_type_says(
    demo_model_path: Path, engine: str
) -> None:
    """f16, q8_0 and q4_0 caches each answer the script; the state llama.cpp saves for the
    conversation is the size ``kv_cache_bytes`` computes for its cells (plus llama.cpp's few
    bytes of cell metadata), so q8_0 takes 34/64 of f16's KV memory and q4_0 18/64."""
    sizes: dict[KvCacheType, tuple[int, int]] = {}
    kv_types: tuple[KvCacheType, ...] = ("f16", "q8_0", "q4_0")
    for kv_type in kv_types:
        backend = load_backend(
            settings(
                demo_model_path,
                parallel=1 if engine == "single" else 2,
                cache_type_k=kv_type,
                cache_type_v=kv_type,
                flash_attn="auto",
                n_ctx=512,
            ),
            demo_model_path,
        )
        try:
            async with chat_client(backend) as client:
                buffered, _ = await both(client)
            cells = buffered["usage"]["prompt_tokens"] + buffered["usage"]["completion_tokens"] - 1
            sizes[kv_type] = (held_state_bytes(backend), cells)
        finally:
            backend.close()
        message = buffered["choices"][0]["message"]
        assert (message["reasoning_content"], message["content"]) == (THOUGHT, ANSWER), kv_type
    for kv_type, (state, cells) in sizes.items():
        # The demo model: 2 layers, 2 KV heads of 32.
        kv = kv_cache_bytes(
            n_layer=2, n_head_kv=2, head_dim=32, cells=cells, type_k=kv_type, type_v=kv_type
        )
        assert kv <= state <= kv + 16 * cells + 1024, (kv_type, state, kv)
    assert sizes["q4_0"][0] < sizes["q8_0"][0] < sizes["f16"][0]


def test_the_kv_memory_table_is_computed_from_qwen3_30b_a3b_shapes() -> None:
    """docs/llama-knobs.md's table: 48 layers, 4 KV heads of 128, 32k x --parallel 4."""
    page = (ROOT / "docs" / "llama-knobs.md").read_text(encoding="utf-8")
    rows = re.findall(
        r"^\| (\w+) \| (\w+) \| (\d+) KiB \| ([\d.]+) GiB \| ([\d.]+ GiB|-) \|$", page, re.M
    )
    assert len(rows) >= 3
    f16 = kv_cache_bytes(n_layer=48, n_head_kv=4, head_dim=128, cells=32768 * 4)
    for type_k, type_v, per_token_kib, total_gib, saved in rows:
        per_token = kv_cache_bytes(
            n_layer=48, n_head_kv=4, head_dim=128, cells=1, type_k=type_k, type_v=type_v
        )
        total = per_token * 32768 * 4
        assert int(per_token_kib) == per_token / 1024
        assert float(total_gib) == total / 2**30
        if saved != "-":
            assert float(saved.removesuffix(" GiB")) == (f16 - total) / 2**30


# -- the host-RAM prompt cache -----------------------------------------------------------------


@pytest.fixture
def cold(slow_model_path: Path) -> Iterator[BatchedLlamaBackend]:
    """An engine without a prompt cache: a cold prefill of any prompt."""
    backend = BatchedLlamaBackend(
        engine_config(slow_model_path, n_ctx=1024, n_batch=64), parallel=1
    )
    yield backend
    backend.close()


def metric(text: str, name: str) -> float:
    found = re.search(rf"^qwen3_moe_serve:{name} (\S+)$", text, re.M)
    assert found, name
    return float(found.group(1))


@pytest.mark.falsifies("QWEN3_MOE_LLAMA_KNOBS_V1_003")
@pytest.mark.parametrize(
    ("parallel", "kv_unified"),
    [(1, False), (2, False), (2, True)],
    ids=["one-slot", "two-slots", "two-slots-unified-kv"],
)
async def test_a_conversation_whose_slot_was_taken_is_restored_from_host_memory(
    slow_model_path: Path, cold: BatchedLlamaBackend, parallel: int, kv_unified: bool
) -> None:
    """Conversations A, B, C on fewer slots: A's second turn restores A's saved state, decodes
    only its new turn (and the one token re-decoded for its logits), and answers exactly as a
    cold prefill of the whole prompt does; /metrics counts the hit, the misses and the bytes."""
    backend = load_backend(
        settings(slow_model_path, parallel=parallel, cache_ram=64), slow_model_path
    )
    rng = random.Random(17)
    a1, b1, c1 = (random_prompt(rng, 300) for _ in range(3))
    try:
        async with asgi_client(create_app(settings_for(), backend=backend)) as client:
            reply_a, cached = await generate(backend, a1)
            assert cached == 0
            for other in (b1, c1):  # take A's slot (with two slots, C takes it)
                assert (await generate(backend, other))[1] == 0
            new_turn = random_prompt(rng, 20)
            a2 = a1 + reply_a + new_turn
            reply_a2, cached = await generate(backend, a2, 24)
            scraped = (await client.get("/metrics")).text
        stats = backend.prompt_cache_stats()
    finally:
        backend.close()
    assert cached == len(a1) + len(reply_a) - 1  # every cell of A's first turn came back
    assert len(a2) - cached == len(new_turn) + 1
    assert reply_a2 == (await generate(cold, a2, 24))[0]
    assert stats is not None and (stats.hits, stats.misses) == (1, 3)
    assert stats.restored_tokens == cached
    per_token = kv_cache_bytes(n_layer=4, n_head_kv=4, head_dim=64, cells=1)
    assert stats.restored_bytes >= per_token * (len(a1) + len(reply_a) - 1)
    assert metric(scraped, "prompt_cache_hits_total") == 1
    assert metric(scraped, "prompt_cache_misses_total") == 3
    assert metric(scraped, "prompt_cache_restored_bytes_total") == stats.restored_bytes
    assert metric(scraped, "prompt_cache_saved_bytes_total") == stats.saved_bytes > 0
    assert metric(scraped, "prompt_cache_bytes") == stats.bytes


@pytest.mark.falsifies("QWEN3_MOE_LLAMA_KNOBS_V1_004")
async def test_a_saved_state_is_used_only_up_to_where_it_and_the_prompt_differ(
    slow_model_path: Path, cold: BatchedLlamaBackend
) -> None:
    """A prompt that shares A's first 150 tokens and then differs gets exactly those 150 cells
    back, and the cold answer; one that shares 20 (under a tenth of it) gets nothing back."""
    backend = load_backend(settings(slow_model_path, cache_ram=64), slow_model_path)
    rng = random.Random(5)
    a1, b1 = random_prompt(rng, 300), random_prompt(rng, 300)
    try:
        await generate(backend, a1)
        await generate(backend, b1)  # A's state goes to host memory
        diverging = a1[:150] + random_prompt(rng, 150)
        assert diverging[150] != a1[150]
        reply, cached = await generate(backend, diverging)
        assert cached == 150
        assert reply == (await generate(cold, diverging))[0]
        await generate(backend, b1)  # B's state comes back; the diverged A goes to the cache
        before = backend.prompt_cache_stats()
        barely = a1[:20] + random_prompt(rng, 280)
        reply, cached = await generate(backend, barely)
        after = backend.prompt_cache_stats()
    finally:
        backend.close()
    assert cached == 0
    assert reply == (await generate(cold, barely))[0]
    assert before is not None and after is not None
    assert (after.hits, after.misses) == (before.hits, before.misses + 1)


@pytest.mark.falsifies("QWEN3_MOE_LLAMA_KNOBS_V1_003")
async def test_agents_sharing_a_system_prompt_keep_their_histories(
    slow_model_path: Path, cold: BatchedLlamaBackend
) -> None:
    """Issue 22: agents share a long system prompt, so a new conversation matches the slot of
    another one well past the similarity threshold. It takes that slot's opening, and the
    conversation it displaces is saved first: A's next turn gets all of A back (the old rule
    saved a slot only when the new prompt shared almost nothing with it, and A lost its
    history but the system prompt), and so does B's after A displaced it in turn."""
    backend = load_backend(settings(slow_model_path, cache_ram=64), slow_model_path)
    rng = random.Random(23)
    system = random_prompt(rng, 200)
    a1, b1 = system + random_prompt(rng, 60), system + random_prompt(rng, 60)
    try:
        reply_a, _ = await generate(backend, a1)
        reply_b, cached_b = await generate(backend, b1)
        a2 = a1 + reply_a + random_prompt(rng, 20)
        reply_a2, cached_a2 = await generate(backend, a2, 24)
        b2 = b1 + reply_b + random_prompt(rng, 20)
        reply_b2, cached_b2 = await generate(backend, b2, 24)
        stats = backend.prompt_cache_stats()
    finally:
        backend.close()
    assert cached_b == len(system)  # the opening, from A's slot
    assert cached_a2 == len(a1) + len(reply_a) - 1
    assert cached_b2 == len(b1) + len(reply_b) - 1
    assert reply_a2 == (await generate(cold, a2, 24))[0]
    assert reply_b2 == (await generate(cold, b2, 24))[0]
    assert stats is not None and stats.hits == 2 and stats.restored_tokens == cached_a2 + cached_b2


@pytest.mark.falsifies("QWEN3_MOE_LLAMA_KNOBS_V1_003")
async def test_a_state_that_lends_its_opening_to_a_new_conversation_stays_for_its_own(
    slow_model_path: Path, cold: BatchedLlamaBackend
) -> None:
    """A new agent whose system prompt only a saved state holds gets that opening restored
    (a copy), and the saved conversation is still there for its own next turn (the old rule
    moved the state into the new conversation's slot, and A's history was lost)."""
    backend = load_backend(settings(slow_model_path, cache_ram=64), slow_model_path)
    rng = random.Random(29)
    system = random_prompt(rng, 200)
    a1, c1 = system + random_prompt(rng, 60), system + random_prompt(rng, 60)
    try:
        reply_a, _ = await generate(backend, a1)
        await generate(backend, random_prompt(rng, 260))  # D displaces A: A is saved
        _, cached_c = await generate(backend, c1)
        a2 = a1 + reply_a + random_prompt(rng, 20)
        reply_a2, cached_a2 = await generate(backend, a2, 24)
    finally:
        backend.close()
    assert cached_c == len(system)
    assert cached_a2 == len(a1) + len(reply_a) - 1
    assert reply_a2 == (await generate(cold, a2, 24))[0]


@pytest.mark.falsifies("QWEN3_MOE_LLAMA_KNOBS_V1_003")
async def test_the_prompt_cache_stays_within_its_size_when_filled_past_it(
    slow_model_path: Path, cold: BatchedLlamaBackend
) -> None:
    """Five conversations through one slot with room in host memory for two of them: the
    cache never holds more than its size, the oldest go first (counted), the newest still
    comes back whole, and an evicted one is decoded cold with the cold answer."""
    per_token = kv_cache_bytes(n_layer=4, n_head_kv=4, head_dim=64, cells=1)
    first_turns = [random_prompt(random.Random(31 + n), 260) for n in range(5)]
    size_mib = 3  # two states of ~276 tokens (~1.1 MiB each), not three
    assert 2 * 276 * per_token < size_mib * 2**20 < 3 * 276 * per_token
    backend = load_backend(settings(slow_model_path, cache_ram=size_mib), slow_model_path)
    held: list[int] = []
    try:
        replies = []
        for prompt in first_turns:
            replies.append((await generate(backend, prompt))[0])
            stats = backend.prompt_cache_stats()
            assert stats is not None
            held.append(stats.bytes)
        newest = first_turns[3] + replies[3] + [7, 8, 9]
        _, cached_newest = await generate(backend, newest)
        evicted = first_turns[0] + replies[0] + [7, 8, 9]
        reply_evicted, cached_evicted = await generate(backend, evicted)
        stats = backend.prompt_cache_stats()
    finally:
        backend.close()
    assert max(held) <= size_mib * 2**20 and stats is not None and stats.evictions >= 2
    assert stats.limit_bytes == size_mib * 2**20
    assert cached_newest == len(first_turns[3]) + len(replies[3]) - 1
    assert cached_evicted == 0
    assert reply_evicted == (await generate(cold, evicted))[0]


@pytest.mark.falsifies("QWEN3_MOE_LLAMA_KNOBS_V1_003")
async def test_conversations_come_back_from_disk_after_a_restart(
    slow_model_path: Path, cold: BatchedLlamaBackend, tmp_path: Path
) -> None:
    """--prompt-cache-dir: A's state (saved when B took the slot) and B's (still in the slot)
    are written when the engine closes and read when a new one starts: both next turns
    restore their whole history and answer as a cold prefill does. A folder written by
    another KV layout is not read, and a file cut short is skipped."""
    store = tmp_path / "prompt-cache"
    knobs = {"cache_ram": 64, "prompt_cache_dir": store}
    rng = random.Random(37)
    a1, b1 = random_prompt(rng, 300), random_prompt(rng, 300)
    first = load_backend(settings(slow_model_path, **knobs), slow_model_path)
    try:
        reply_a, _ = await generate(first, a1)
        reply_b, _ = await generate(first, b1)
    finally:
        first.close()
    assert len(list(store.glob("*.kvstate"))) == 2
    a2 = a1 + reply_a + random_prompt(rng, 20)
    b2 = b1 + reply_b + random_prompt(rng, 20)
    other_layout = load_backend(
        settings(slow_model_path, **knobs, cache_type_k="q8_0"), slow_model_path
    )
    try:
        assert other_layout.prompt_cache_stats() == PromptCacheStats(
            hits=0, misses=0, saved_bytes=0, restored_bytes=0, restored_tokens=0,
            evictions=0, bytes=0, entries=0, limit_bytes=64 * 2**20,
        )  # fmt: skip
    finally:
        other_layout.close()  # writes its own (empty) cache: the folder is its now
    first = load_backend(settings(slow_model_path, **knobs), slow_model_path)
    try:
        await generate(first, a1)
        await generate(first, b1)
    finally:
        first.close()
    (newest, *_) = sorted(store.glob("*.kvstate"), reverse=True)
    newest.write_bytes(newest.read_bytes()[:-10])  # cut short: skipped
    second = load_backend(settings(slow_model_path, **knobs), slow_model_path)
    try:
        loaded = second.prompt_cache_stats()
        reply_a2, cached_a2 = await generate(second, a2, 24)
        reply_b2, cached_b2 = await generate(second, b2, 24)
    finally:
        second.close()
    assert loaded is not None and loaded.entries == 1
    restored = {cached_a2 == len(a1) + len(reply_a) - 1, cached_b2 == len(b1) + len(reply_b) - 1}
    assert restored == {True, False}  # one of the two files was cut short
    assert reply_a2 == (await generate(cold, a2, 24))[0]
    assert reply_b2 == (await generate(cold, b2, 24))[0]


def test_a_smaller_cache_reads_back_only_the_newest_states_that_fit(tmp_path: Path) -> None:
    """A folder written by a larger cache, read by one with room for two of its three states:
    the two most recently saved come back, in their order, and the read stops there."""
    who = {"model": "x"}
    written = PromptCache(limit_bytes=None)
    for n in range(3):
        written.save([n, n + 1, n + 2], state(40), 2)
    assert prompt_store.write(written, tmp_path, who)[0] == 3
    smaller = PromptCache(limit_bytes=100)
    assert prompt_store.read(tmp_path, who, smaller) == (2, 80)
    assert [tuple(e.tokens) for e in smaller.entries()] == [(1, 2, 3), (2, 3, 4)]
    assert smaller.evictions == 0 and smaller.saved_bytes == 0
    assert prompt_store.read(tmp_path, {"model": "y"}, PromptCache(None)) == (0, 0)


def test_a_borrowed_opening_goes_back_and_a_continued_conversation_stays_with_its_slot() -> None:
    cache = PromptCache(limit_bytes=None)
    cache.save([*range(100), 500, 501], state(8), 100)  # a 100-token prompt and its answer
    (entry,) = list(cache._entries)
    cache.take(entry)
    cache.hit(entry, 60)  # another conversation used its first 60 tokens: a copy
    assert list(cache._entries) == [entry]
    cache.take(entry)
    cache.hit(entry, 101)  # its own next turn: it lives in the slot now
    assert len(cache) == 0 and cache.hits == 2 and cache.restored_tokens == 161


@pytest.mark.falsifies("QWEN3_MOE_LLAMA_KNOBS_V1_004")
async def test_a_saved_state_that_disagrees_with_its_tokens_is_not_restored(
    slow_model_path: Path, cold: BatchedLlamaBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """The guard behind every restore: an entry whose token list claims one cell more than its
    state holds (what a mix-up of two conversations' states would look like) is refused when
    llama.cpp's restored positions disagree, and the prompt is decoded cold."""
    backend = load_backend(settings(slow_model_path, cache_ram=64), slow_model_path)
    assert isinstance(backend, BatchedLlamaBackend)
    rng = random.Random(9)
    a1, b1 = random_prompt(rng, 300), random_prompt(rng, 300)
    try:
        reply_a, _ = await generate(backend, a1)
        await generate(backend, b1)
        cache = backend._prompt_cache
        assert cache is not None and len(cache) == 1
        (entry,) = list(cache._entries)
        cache.take(entry)
        cache.save((*entry.tokens, reply_a[-1]), entry.state, entry.prompt_len)
        a2 = a1 + reply_a + random_prompt(rng, 20)
        reply, cached = await generate(backend, a2)
        stats = backend.prompt_cache_stats()
    finally:
        backend.close()
    assert "not used" in caplog.text
    assert cached == 0 and stats is not None and stats.hits == 0
    assert reply == (await generate(cold, a2))[0]


def state(size: int) -> Any:
    return np.zeros(size, dtype=np.uint8)


def test_the_prompt_cache_keeps_its_byte_budget_least_recently_saved_first() -> None:
    cache = PromptCache(limit_bytes=100)
    assert cache.save([1, 2, 3], state(40), 0) and cache.save([4, 5, 6], state(40), 0)
    assert cache.save([7, 8, 9], state(40), 0)  # the first goes
    assert [tuple(e.tokens) for e in cache._entries] == [(4, 5, 6), (7, 8, 9)]
    assert cache.evictions == 1 and cache.bytes == 80
    assert not cache.save([10], state(101), 0)  # larger than the whole budget
    assert not cache.save([4, 5], state(10), 0)  # already covered by (4, 5, 6)
    assert cache.save([4, 5, 6, 7], state(30), 0)  # covers (4, 5, 6), which goes
    assert [tuple(e.tokens) for e in cache._entries] == [(7, 8, 9), (4, 5, 6, 7)]
    unlimited = PromptCache(limit_bytes=None)
    assert all(unlimited.save([i], state(10**6), 1) for i in range(5))


def test_the_prompt_cache_finds_only_states_worth_restoring() -> None:
    cache = PromptCache(limit_bytes=None)
    cache.save(list(range(100)), state(8), 0)
    found = cache.find([*range(60), 999], better_than=0, min_share=0.1)
    assert found is not None and found[1] == 60
    assert cache.find([*range(60), 999], better_than=60, min_share=0.1) is None  # a slot has it
    assert cache.find([*range(5), *range(1000, 1100)], better_than=0, min_share=0.1) is None
    assert cache.find([*range(20), 999], better_than=0, min_share=0.1) is None  # < 25 % of it
    assert cache.find([999, *range(1, 100)], better_than=0, min_share=0.1) is None
    entry = next(iter(cache._entries))
    assert isinstance(entry, SavedPrompt) and entry.size == 8


# -- thinking budgets ----------------------------------------------------------------------------


def thought_of(tokens: int) -> str:
    return b"".join(LONG_THOUGHT[:tokens]).decode().strip()


@pytest.mark.falsifies("QWEN3_MOE_LLAMA_KNOBS_V1_005")
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("budget", [0, 1, 7])
async def test_a_thinking_budget_ends_the_thought_and_the_model_answers(
    scripted: Callable[..., Backend], engine: str, budget: int
) -> None:
    """The reasoning is the script's first ``budget`` thought tokens, the server closes the
    block (two forced tokens, counted), the answer is the script's, and the stream's deltas
    are the buffered message."""
    async with chat_client(scripted(LONG_THINK_SCRIPT, engine)) as client:
        buffered, stream = await both(client, thinking_budget=budget)
    message = buffered["choices"][0]["message"]
    assert message.get("reasoning_content", "") == thought_of(budget)
    assert message["content"] == b"".join(LONG_ANSWER).decode()
    assert "".join(delta_field(stream, "reasoning_content")) == thought_of(budget)
    assert "".join(delta_field(stream, "content")) == message["content"]
    forced = 2  # "\n", "</think>"
    expected = 1 + budget + forced + 1 + len(LONG_ANSWER) + 1  # <think>, "\n\n", <|im_end|>
    assert buffered["usage"]["completion_tokens"] == expected
    assert stream.usage() is None or stream.usage() == buffered["usage"]
    assert buffered["choices"][0]["finish_reason"] == "stop"


@pytest.mark.falsifies("QWEN3_MOE_LLAMA_KNOBS_V1_005")
async def test_reasoning_effort_and_the_server_default_choose_the_budget(
    scripted: Callable[..., Backend],
) -> None:
    backend = scripted(LONG_THINK_SCRIPT)
    async with chat_client(backend, reasoning_budget=3) as client:
        default, _ = await both(client)
        lifted, _ = await both(client, thinking_budget=-1)
        none, _ = await both(client, reasoning_effort="none")
        low, _ = await both(client, reasoning_effort="low")
        both_set, _ = await both(client, reasoning_effort="none", thinking_budget=5)
        unknown = await client.post(
            "/v1/chat/completions", json={"messages": HELLO, "reasoning_effort": "extreme"}
        )

    def reasoning(response: dict[str, Any]) -> str:
        return str(response["choices"][0]["message"].get("reasoning_content", ""))

    assert reasoning(default) == thought_of(3)
    assert reasoning(lifted) == reasoning(low) == thought_of(len(LONG_THOUGHT))
    assert EFFORT_BUDGETS["low"] == 1024 and EFFORT_BUDGETS["none"] == 0
    assert reasoning(none) == ""
    assert reasoning(both_set) == thought_of(5)
    assert unknown.status_code == 400
    assert unknown.json()["error"]["param"] == "reasoning_effort"


@pytest.mark.falsifies("QWEN3_MOE_LLAMA_KNOBS_V1_005")
@pytest.mark.parametrize("engine", ENGINES)
async def test_a_budget_never_lets_thinking_use_up_max_tokens(
    scripted: Callable[..., Backend], engine: str
) -> None:
    """max_tokens 12 and a budget of 100: thinking stops after 12 - 2 - 12 // 4 = 7 tokens and
    the answer gets the rest. Without a budget the same request thinks until max_tokens and
    answers nothing, which is what the cap is for."""
    async with chat_client(scripted(LONG_THINK_SCRIPT, engine)) as client:
        capped, stream = await both(client, max_tokens=12, thinking_budget=100)
        unbudgeted, _ = await both(client, max_tokens=12)
    message = capped["choices"][0]["message"]
    assert message["reasoning_content"] == thought_of(7)
    assert message["content"] == "Sure"  # 1 + 7 + 2 + 1 ("\n\n") + 1 = 12 tokens
    assert capped["choices"][0]["finish_reason"] == "length"
    assert "".join(delta_field(stream, "content")) == "Sure"
    assert not unbudgeted["choices"][0]["message"]["content"]


@pytest.mark.falsifies("QWEN3_MOE_LLAMA_KNOBS_V1_005")
async def test_a_request_that_does_not_think_gets_no_budget(
    scripted: Callable[..., Backend],
) -> None:
    """With thinking off the template renders an empty block and the budget has nothing to
    count: the demo model, which thinks anyway, is left to write its whole script."""
    async with chat_client(scripted(LONG_THINK_SCRIPT)) as client:
        off, _ = await both(
            client, thinking_budget=1, chat_template_kwargs={"enable_thinking": False}
        )
    assert off["choices"][0]["message"]["content"] == b"".join(LONG_THINK_SCRIPT[:-1]).decode()


async def test_a_budget_with_a_grammar_keeps_to_the_grammar(
    scripted: Callable[..., Backend],
) -> None:
    """A JSON response_format allows a think block first; closing it early is a valid step of
    that grammar, and the sampler chain takes the forced tokens without failing."""
    async with chat_client(scripted(LONG_THINK_SCRIPT)) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={
                "messages": HELLO,
                "temperature": 0,
                "max_tokens": 40,
                "thinking_budget": 2,
                "response_format": {"type": "json_object"},
            },
        )
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert message["reasoning_content"] == thought_of(2)


def tracker(
    tokens: int, *, inside: bool = False, pieces: dict[int, bytes] | None = None
) -> BudgetTracker:
    budget = ThinkingBudget(tokens=tokens, start=(1,), end=(2,), forced=(8, 2), inside=inside)
    return BudgetTracker(budget, lambda t: (pieces or {}).get(t, b"x"))


def run(tracker: BudgetTracker, model: Sequence[int]) -> list[int]:
    """What the engine hands out when the model would write ``model``."""
    out: list[int] = []
    for token in model:
        forced = tracker.forced()
        while forced is not None:
            out.append(forced)
            tracker.observe(forced)
            forced = tracker.forced()
        out.append(token)
        tracker.observe(token)
    return out


def test_the_budget_tracker_counts_inside_the_block_only_and_forces_once() -> None:
    assert run(tracker(2), [5, 1, 5, 5, 5, 5]) == [5, 1, 5, 5, 8, 2, 5, 5]
    assert run(tracker(5), [1, 5, 2, 5, 5, 5, 5, 5]) == [1, 5, 2, 5, 5, 5, 5, 5]  # ended itself
    assert run(tracker(1, inside=True), [5, 5, 5]) == [5, 8, 2, 5, 5]
    assert run(tracker(0, inside=True), [5]) == [8, 2, 5]
    assert run(tracker(0), [1, 5]) == [1, 8, 2, 5]
    assert run(tracker(3), [5, 5, 5, 5]) == [5, 5, 5, 5]  # never opened a block


def test_the_budget_tracker_never_splits_a_character() -> None:
    """A budget spent on the first byte of a 3-byte character waits for the other two."""
    pieces = {5: b"\xe2", 6: b"\x82", 7: b"\xac"}
    assert run(tracker(1, pieces=pieces), [1, 5, 6, 7, 9]) == [1, 5, 6, 7, 8, 2, 9]


# -- /v1/models and /health ----------------------------------------------------------------------


@pytest.mark.falsifies("QWEN3_MOE_LLAMA_KNOBS_V1_006")
async def test_models_tell_clients_the_context_length(demo_engine: Backend) -> None:
    async with asgi_client(create_app(settings_for(), backend=demo_engine)) as client:
        listed = (await client.get("/v1/models")).json()
    (card,) = listed["data"]
    assert card["context_length"] == card["max_model_len"] == demo_engine.info.n_ctx > 0


async def test_models_and_health_are_503_until_the_model_is_loaded(
    demo_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.engine
    import app.lifespan

    release = threading.Event()
    real_load = app.engine.load_backend  # what app.lifespan calls, replaced there below

    def slow_load(*args: Any) -> Any:
        assert release.wait(timeout=30)
        return real_load(*args)

    monkeypatch.setattr(app.lifespan, "load_backend", slow_load)
    application = create_app(settings_for(model=demo_model_path, n_ctx=512))
    async with asgi_client(application) as client:
        assert (await client.get("/health")).status_code == 503
        assert (await client.get("/v1/models")).status_code == 503
        release.set()
        for _ in range(600):
            if (await client.get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        card = (await client.get("/v1/models")).json()["data"][0]
    assert card["context_length"] == 512


@pytest.mark.falsifies("QWEN3_MOE_LLAMA_KNOBS_V1_005")
@pytest.mark.parametrize("engine", ENGINES)
async def test_the_agent_apis_carry_their_thinking_budgets(
    scripted: Callable[..., Backend], engine: str
) -> None:
    """Anthropic's ``thinking.budget_tokens`` is the thinking budget on /v1/messages (the
    thinking block is cut there and the answer follows); the Responses API's
    ``reasoning.effort`` is ``reasoning_effort`` (``none`` pre-fills an empty block)."""
    async with chat_client(scripted(LONG_THINK_SCRIPT, engine)) as client:
        body = {"model": "qwen3-moe-demo", "max_tokens": 200, "messages": HELLO, "temperature": 0}
        body["thinking"] = {"type": "enabled", "budget_tokens": 3}
        message = (await client.post("/v1/messages", json=body)).json()
        responses = {"model": "qwen3-moe-demo", "input": "Hello!", "temperature": 0}
        none = await client.post(
            "/v1/responses", json={**responses, "reasoning": {"effort": "none"}}
        )
        low = await client.post("/v1/responses", json={**responses, "reasoning": {"effort": "low"}})
    blocks = {block["type"]: block for block in message["content"]}
    assert blocks["thinking"]["thinking"] == thought_of(3)
    assert blocks["text"]["text"] == b"".join(LONG_ANSWER).decode()
    assert none.status_code == low.status_code == 200, (none.text, low.text)
    assert none.json()["usage"]["input_tokens"] > low.json()["usage"]["input_tokens"]
