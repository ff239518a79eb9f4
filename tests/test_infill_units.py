"""The pure parts of fill-in-the-middle: the prompt's layout and cuts (on the demo model's real
tokenizer), the editor's line limits, and the chunk-reuse walk."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.core.infill import CURRENT_FILE, REPO_NAME, ExtraChunk, FimWindow, fim_prompt
from app.engine import FimTokens
from app.engine.chunk_reuse import plan_reuse
from app.engine.llama_backend import LlamaBackend
from app.engine.tokenizer import LlamaTokenizer
from app.text.lines import LineLimits
from tests.support.models import load

WIDE = FimWindow.of(around=2048, n_ctx=8192, reserve=256)


@pytest.fixture(scope="module")
def demo(demo_model_path: Path) -> Iterator[LlamaBackend]:
    backend = load(demo_model_path)
    yield backend
    backend.close()


@pytest.fixture
def tokenizer(demo: LlamaBackend) -> LlamaTokenizer:
    assert isinstance(demo.tokenizer, LlamaTokenizer)
    return demo.tokenizer


@pytest.fixture
def fim(tokenizer: LlamaTokenizer) -> FimTokens:
    assert tokenizer.fim is not None
    return tokenizer.fim


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_001")
def test_the_fim_tokens_are_the_models_own(tokenizer: LlamaTokenizer, fim: FimTokens) -> None:
    texts = tokenizer.control_texts
    assert texts[fim.prefix] == "<|fim_prefix|>"
    assert texts[fim.suffix] == "<|fim_suffix|>"
    assert texts[fim.middle] == "<|fim_middle|>"
    assert fim.repo_name is not None and texts[fim.repo_name] == "<|repo_name|>"
    assert fim.file_sep is not None and texts[fim.file_sep] == "<|file_sep|>"


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_001")
def test_the_prompt_is_qwens_repository_level_format(
    tokenizer: LlamaTokenizer, fim: FimTokens
) -> None:
    text = tokenizer.tokenize_text
    extra = (ExtraChunk("x = 1\n", "a.py"), ExtraChunk("y = 2\n", "b.py"))
    built = fim_prompt(
        tokenizer, fim, prefix="def f():\n", suffix="\nf()\n", middle="    ret", extra=extra,
        window=WIDE,
    )  # fmt: skip
    assert fim.repo_name is not None and fim.file_sep is not None
    expected = [
        fim.repo_name, *text(REPO_NAME + "\n"),
        fim.file_sep, *text("a.py\n"), *text("x = 1\n"),
        fim.file_sep, *text("b.py\n"), *text("y = 2\n"),
        fim.file_sep, *text(CURRENT_FILE + "\n"),
        fim.prefix, *text("def f():\n"), *text("    ret"),
        fim.suffix, *text("\nf()\n"),
        fim.middle,
    ]  # fmt: skip
    assert built.tokens == expected
    assert not built.truncated
    plain = fim_prompt(tokenizer, fim, prefix="a", suffix="b", window=WIDE)
    assert plain.tokens == [fim.prefix, *text("a"), fim.suffix, *text("b"), fim.middle]


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_001")
def test_fim_markup_typed_in_the_code_stays_text(tokenizer: LlamaTokenizer, fim: FimTokens) -> None:
    """A file about FIM prompts must not be able to end its own prompt early."""
    typed = "s = '<|fim_middle|><|fim_suffix|><|file_sep|><|endoftext|><|im_end|>'\n"
    built = fim_prompt(
        tokenizer, fim, prefix=typed, suffix=typed, middle=typed,
        extra=(ExtraChunk(typed, typed.strip()),), window=WIDE,
    )  # fmt: skip
    control = set(tokenizer.control_texts)
    markup = [token for token in built.tokens if token in control]
    assert fim.repo_name is not None and fim.file_sep is not None
    assert markup == [fim.repo_name, fim.file_sep, fim.file_sep, fim.prefix, fim.suffix, fim.middle]


@pytest.mark.falsifies("QWEN3_MOE_EDITOR_FIM_V1_001")
def test_what_is_cut_is_what_is_farthest_from_the_cursor(
    tokenizer: LlamaTokenizer, fim: FimTokens
) -> None:
    text = tokenizer.tokenize_text
    prefix = "".join(f"line_{i} = {i}\n" for i in range(400))
    suffix = "".join(f"after_{i} = {i}\n" for i in range(400))
    chunks = tuple(ExtraChunk(f"chunk_{i} = {i}\n" * 20, f"f{i}.py") for i in range(12))
    window = FimWindow.of(around=256, n_ctx=1024, reserve=64)
    built = fim_prompt(
        tokenizer, fim, prefix=prefix, suffix=suffix, middle="x = ", extra=chunks, window=window
    )
    assert built.truncated
    tokens = built.tokens
    pre, suf, mid = tokens.index(fim.prefix), tokens.index(fim.suffix), tokens.index(fim.middle)
    assert mid == len(tokens) - 1
    before_cursor = tokens[pre + 1 : suf]
    assert before_cursor == (text(prefix) + text("x = "))[-len(before_cursor) :]  # the tail
    after_cursor = tokens[suf + 1 : mid]
    assert after_cursor == text(suffix)[: len(after_cursor)]  # the head
    assert len(before_cursor) <= window.prefix + window.middle
    assert len(after_cursor) <= window.suffix
    context = tokens[:pre]
    kept = [
        c.filename for c in chunks if _contains(context, text(c.filename + "\n") + text(c.text))
    ]
    assert kept == [c.filename for c in chunks[-len(kept) :]]  # the newest, whole, in order
    assert 0 < len(kept) < len(chunks)
    assert len(tokens) + 64 <= 1024


def _contains(tokens: list[int], run: list[int]) -> bool:
    return any(tokens[i : i + len(run)] == run for i in range(len(tokens) - len(run) + 1))


def test_the_window_leaves_room_for_the_completion() -> None:
    for n_ctx, around, n_predict in [(512, 2048, 128), (4096, 1024, 128), (300, 256, 290)]:
        window = FimWindow.of(around=around, n_ctx=n_ctx, reserve=n_predict)
        most = window.prefix + window.suffix + window.extra + 3
        assert most + n_predict <= n_ctx + 3


# -- n_indent and t_max_predict_ms -----------------------------------------------------------


def _limited(pieces: list[str], **limits: float) -> tuple[str, str | None]:
    lines = LineLimits(**limits)  # type: ignore[arg-type]
    out = "".join(lines.push(piece) for piece in pieces) + lines.finish()
    return out, lines.stopped


def test_n_indent_ends_at_a_later_line_indented_less() -> None:
    text = "    return a\n    b = 1\n  c\nd\n"
    out, stopped = _limited(list(text), n_indent=4)
    assert (out, stopped) == ("    return a\n    b = 1\n  ", "n_indent")
    # the first line is the cursor's own: never checked
    assert _limited(["x = 1\n", "    y\n"], n_indent=4) == ("x = 1\n    y\n", None)
    # a blank line is indented less, as llama-server counts it
    assert _limited(["    a\n", "\n", "    b"], n_indent=4) == ("    a\n", "n_indent")


@given(st.lists(st.sampled_from(["a", " ", "\t", "\n", "  x", "\n  ", "b\n"]), max_size=30))
def test_n_indent_is_the_same_however_the_text_is_split(pieces: list[str]) -> None:
    whole = _limited(["".join(pieces)], n_indent=2)
    assert _limited(pieces, n_indent=2) == whole
    chars = [char for piece in pieces for char in piece]
    assert _limited(chars, n_indent=2) == whole


def test_t_max_predict_ms_ends_at_the_next_newline_once_over_time() -> None:
    now = [0.0]
    lines = LineLimits(t_max_predict_ms=100, clock=lambda: now[0])
    assert lines.push("a = 1\n") == "a = 1\n" and lines.stopped is None
    now[0] = 0.2
    assert lines.push("b = ") == "b = " and lines.stopped is None  # mid-line: not cut
    assert lines.push("2\nc") == "2\nc"
    assert lines.stopped == "t_max_predict_ms"
    assert lines.push("more") == ""


# -- chunk reuse -------------------------------------------------------------------------------


def test_chunk_reuse_moves_the_runs_that_follow_the_prefix() -> None:
    header, a, b, local = (
        [1, 2],
        list(range(100, 140)),
        list(range(200, 240)),
        list(range(300, 350)),
    )
    cells = header + a + b + local
    prompt = header + b + local + [9, 9]
    plan = plan_reuse(cells, prompt, prefix=2, min_chunk=16)
    assert plan.kept == len(header + b + local)
    assert [(m.cache_at, m.prompt_at, m.length) for m in plan.moves] == [
        (len(header + a), len(header), len(b + local))
    ]
    assert plan_reuse(cells, prompt, prefix=2, min_chunk=0).kept == 2
    assert plan_reuse(cells, prompt, prefix=2, min_chunk=len(b + local) + 1).kept == 2


@given(st.integers(0, 2**32 - 1))
def test_chunk_reuse_keeps_only_tokens_the_cells_hold(seed: int) -> None:
    """Whatever the edit, the kept prompt is assembled from runs of the cells, in order, each
    at least ``min_chunk`` long, and never past the first prompt token no run covers."""
    rng = random.Random(seed)
    cells = [rng.randrange(8) for _ in range(rng.randrange(0, 80))]
    prompt = list(cells)
    for _ in range(rng.randrange(4)):
        at = rng.randrange(len(prompt) + 1)
        if rng.random() < 0.5:
            del prompt[at : at + rng.randrange(1, 10)]
        else:
            prompt[at:at] = [rng.randrange(8) for _ in range(rng.randrange(1, 10))]
    prefix = 0
    while prefix < min(len(cells), len(prompt)) and cells[prefix] == prompt[prefix]:
        prefix += 1
    min_chunk = rng.randrange(1, 6)
    plan = plan_reuse(cells, prompt, prefix=prefix, min_chunk=min_chunk)
    at_cache = at_prompt = prefix
    for move in plan.moves:
        assert move.prompt_at == at_prompt and move.cache_at >= at_cache
        assert move.length >= min_chunk
        run = slice(move.cache_at, move.cache_at + move.length)
        assert cells[run] == prompt[move.prompt_at : move.prompt_at + move.length]
        at_cache, at_prompt = run.stop, move.prompt_at + move.length
    assert plan.kept == at_prompt <= len(prompt)
