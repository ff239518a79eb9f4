"""``bench.editing``: the editor it plays, the requests it builds, the figures it reports, and the
committed run.

The session and the requests are checked against llama.vim's own rules (its local context, its
ring of chunks, its request fields); the edit count and the figures on small hand-made inputs
whose answers are known; a server without ``/infill`` (fault injection) ends the session with
the reason instead of a stack trace. The committed run is the report of its own JSON, and
docs/performance.md shows its rows. The quick run (slow) checks the harness end to end.
"""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench import editing, servers
from bench.editing import (
    Chunk,
    Fim,
    Ring,
    Sample,
    Session,
    WarmUp,
    edit_tokens,
    figures,
    fim_context,
    histogram,
    infill_request,
    markdown,
    response_field,
    run_session,
    session,
    warm_up_request,
)

ROOT = Path(__file__).resolve().parent.parent
N_PREFIX = editing.N_PREFIX
SMALL = Session(lines=160, start_line=60, positions=6, ring_chunks=4, seed=3)


def _fim(line: str, col: int, *, row: int = 10, ring: tuple[Chunk, ...] = ()) -> Fim:
    return Fim(
        kind="keystroke",
        row=row,
        col=col,
        line=line,
        lines_prefix=tuple(f"above {i}" for i in range(max(0, row - 1 - N_PREFIX), row - 1)),
        lines_suffix=("below 1", "below 2"),
        ring=ring,
        typed="x",
    )


def _chunk(name: str, n: int = 5) -> Chunk:
    return Chunk(tuple(f"{name} line {i}" for i in range(n)), f"{name}.py", (1, 2))


# -- the session -------------------------------------------------------------------------------


def test_a_session_is_a_function_of_its_settings() -> None:
    assert session(SMALL) == session(SMALL)
    assert session(SMALL) != session(Session(**{**SMALL.__dict__, "seed": 4}))


def test_a_session_types_a_few_keys_per_request_walking_down() -> None:
    events = session(SMALL)
    fims = [e for e in events if isinstance(e, Fim)]
    assert isinstance(events[0], WarmUp) and len(events[0].ring) == SMALL.ring_chunks
    assert fims[0] is events[1] and fims[0].kind == "first"
    assert [f.kind for f in fims].count("first") == 1
    for before, event in itertools.pairwise(events):
        if isinstance(event, Fim) and event.kind == "after ring change":
            assert isinstance(before, WarmUp)
    assert all(1 <= len(f.typed) <= editing.KEYS_PER_REQUEST[1] for f in fims)
    assert [f.row for f in fims] == sorted(f.row for f in fims)
    positions = [f for f in fims if f.kind != "keystroke"]
    assert len(positions) == SMALL.positions
    for fim in fims:
        # what was typed is left of the cursor, and llama.vim's automatic requests only
        # come with a few characters right of it
        assert fim.line[: fim.col].endswith(fim.typed)
        assert len(fim.line) - fim.col <= editing.MAX_LINE_SUFFIX
        assert len(fim.lines_prefix) == min(fim.row - 1, editing.N_PREFIX)
        assert len(fim.lines_suffix) <= editing.N_SUFFIX


def test_the_ring_takes_one_queued_chunk_at_a_time_dropping_its_oldest() -> None:
    ring = Ring(n_chunks=2)
    rng = random.Random(0)
    for name in ("a", "b", "c"):
        ring.pick(rng, _chunk(name).lines, f"{name}.py", 1.0)
    assert [c.filename for c in ring.queued] == ["a.py", "b.py", "c.py"]
    assert ring.update() and ring.update() and ring.update()
    assert [c.filename for c in ring.chunks] == ["b.py", "c.py"]
    assert not ring.update()
    ring.pick(rng, _chunk("b").lines, "again.py", 2.0)  # already held: not queued
    ring.pick(rng, ["x", "y"], "short.py", 2.0)  # under 3 lines: not picked
    assert ring.queued == []
    ring.evict_similar(_chunk("c").lines)
    assert [c.filename for c in ring.chunks] == ["b.py"] and ring.evicted == 1


def test_a_long_text_gives_a_chunk_of_half_the_chunk_size() -> None:
    ring = Ring(n_chunks=4)
    text = [f"line {i}" for i in range(200)]
    ring.pick(random.Random(1), text, "long.py", 1.0)
    (chunk,) = ring.queued
    assert len(chunk.lines) == editing.RING_CHUNK_SIZE // 2 + 1
    assert chunk.text == "\n".join(chunk.lines) + "\n"


# -- the requests ------------------------------------------------------------------------------


def test_the_local_context_is_llama_vims() -> None:
    context = fim_context(_fim("    total = count(", 12))
    assert context.prefix == "".join(f"above {i}\n" for i in range(9))
    assert context.middle == "    total = "
    assert context.suffix == "count(\nbelow 1\nbelow 2\n"
    assert context.indent == 4


def test_a_blank_line_is_completed_from_its_start() -> None:
    context = fim_context(_fim("        ", 8))
    assert (context.middle, context.indent) == ("", 0)
    assert context.suffix == "\nbelow 1\nbelow 2\n"


def test_a_speculative_request_reads_as_if_the_suggestion_were_accepted() -> None:
    one = fim_context(_fim("    total = ", 12), ["count(items)"])
    assert one.middle == "    total = count(items)"
    assert one.prefix == fim_context(_fim("    total = ", 12)).prefix
    assert one.suffix == "\nbelow 1\nbelow 2\n" and one.indent == 4
    row = editing.N_PREFIX + 20
    three = fim_context(_fim("    x = ", 8, row=row), ["f(", "    a,", "    b)"])
    # the prefix window starts two lines lower and ends with the suggestion's first lines
    lines = three.prefix.splitlines()
    assert lines[0] == "above 21" and lines[-2:] == ["    x = f(", "    a,"]
    assert len(lines) == editing.N_PREFIX
    assert three.middle == "    b)"


def test_the_infill_request_has_llama_vims_fields() -> None:
    ring = (_chunk("a"),)
    body = infill_request(
        fim_context(_fim("    total = ", 12)), ring, seed=5, n_predict=128, first=True
    )
    assert body["input_extra"] == [{"text": ring[0].text, "time": [1, 2], "filename": "a.py"}]
    assert body["prompt"] == "    total = " and body["n_indent"] == 4
    assert body["samplers"] == ["top_k", "top_p", "infill"]
    assert (body["top_k"], body["top_p"], body["n_predict"]) == (40, 0.90, 128)
    assert (body["t_max_prompt_ms"], body["t_max_predict_ms"]) == (500, 250)
    assert body["id_slot"] == 0 and body["cache_prompt"] is True and body["stream"] is False
    assert body["response_fields"][: len(editing.RESPONSE_FIELDS)] == list(editing.RESPONSE_FIELDS)
    later = infill_request(fim_context(_fim("x", 1)), ring, seed=6, n_predict=128, first=False)
    assert later["t_max_predict_ms"] == 1000 and later["seed"] == 6


def test_the_warm_up_is_the_ring_alone() -> None:
    body = warm_up_request((_chunk("a"), _chunk("b")))
    assert (body["input_prefix"], body["input_suffix"], body["prompt"]) == ("", "", "")
    assert [c["filename"] for c in body["input_extra"]] == ["a.py", "b.py"]
    assert body["n_predict"] == 0 and body["samplers"] == []


def test_a_response_field_is_read_flat_or_nested() -> None:
    flat = {"timings/prompt_n": 12, "tokens_cached": 900}
    nested = {"timings": {"prompt_n": 12}, "tokens_cached": 900}
    for body in (flat, nested):
        assert response_field(body, "timings/prompt_n") == 12
        assert response_field(body, "tokens_cached") == 900
        assert response_field(body, "timings/predicted_n") is None


def test_a_server_without_infill_ends_the_session_with_the_reason() -> None:
    """Before /infill existed here the bench must say so, not fail with a stack trace."""

    def not_found(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"message": "File Not Found"}})

    transport = httpx.MockTransport(not_found)
    with httpx.Client(transport=transport, base_url="http://editor.test") as http:
        done, failure = run_session(http, session(SMALL), 8, speculative=True, seed=0)
    assert len(done) == 1 and done[0].error is not None
    assert failure is not None and failure.startswith("POST /infill failed: HTTP 404")


def test_the_session_goes_on_past_one_error_and_stops_at_three_in_a_row() -> None:
    answers = iter([200, 500, 200, 500, 500, 500, 200])

    def flaky(request: httpx.Request) -> httpx.Response:
        status = next(answers)
        if status != 200:
            return httpx.Response(status, text="busy")
        return httpx.Response(200, json={"content": "", "timings/prompt_n": 3})

    with httpx.Client(transport=httpx.MockTransport(flaky), base_url="http://e.test") as http:
        done, failure = run_session(http, session(SMALL), 8, speculative=True, seed=0)
    assert len(done) == 6
    assert failure is not None and failure.startswith("3 requests in a row failed")


# -- the edit and the figures --------------------------------------------------------------------


def test_the_edit_is_what_no_held_run_covers() -> None:
    base = list(range(100, 200))
    assert edit_tokens([], base) == 100
    assert edit_tokens(base, base) == 0
    typed = [*base[:60], 1, 2, 3, *base[60:]]
    assert edit_tokens(base, typed) == 3
    # a run moved elsewhere is still held; a run shorter than 16 tokens is not
    moved = base[50:] + base[:50]
    assert edit_tokens(base, moved) == 0
    assert edit_tokens(base[:10], base[:10]) == 10
    # the previous completion counts as held
    assert edit_tokens(base + list(range(500, 540)), base[:70] + list(range(500, 540))) == 0


def _sample(kind: str, latency_ms: float, prompt_n: int, **more: Any) -> Sample:
    fields = {"predicted_n": 10, "predicted_ms": 5.0, "edit_tokens": 2} | more
    return Sample(kind, {}, latency_s=latency_ms / 1000, prompt_n=prompt_n, **fields)


def test_the_figures_of_a_session() -> None:
    samples = [
        _sample("warm-up", 500, 4000, predicted_n=None, predicted_ms=None),
        _sample("first", 300, 1000),
        *(_sample("keystroke", 10 * i, i) for i in range(1, 22)),
        Sample("keystroke", {}, error="HTTP 500: busy"),
    ]
    result = figures(samples)
    assert result["error_count"] == 1 and result["errors"] == ["HTTP 500: busy"]
    assert result["fim"]["requests"] == 22 and result["warm"]["requests"] == 21
    assert result["warm"]["prompt_n"] == {"mean": 11.0, "p50": 11, "p95": 20, "max": 21}
    assert result["warm"]["latency_ms"] == {"p50": 110.0, "p95": 200.0}
    assert result["warm"]["less_generation_ms"] == {"p50": 105.0, "p95": 195.0}
    assert result["warm"]["ms_per_predicted_token"] == 0.5
    assert result["warm"]["edit_tokens_mean"] == 2
    assert result["warm_prompt_n_histogram"] == [8, 13, 0, 0, 0, 0]
    assert set(result["kinds"]) == {"warm-up", "first", "keystroke"}
    assert result["kinds"]["warm-up"]["latency_ms"]["p50"] == 500.0


def test_the_histogram_counts_each_value_once() -> None:
    values = [0, 8, 9, 32, 33, 128, 129, 512, 513, 2048, 2049, None]
    assert histogram(values) == [2, 2, 2, 2, 2, 1]


def test_the_fim_window_is_ours_or_llama_servers_logical_batch() -> None:
    ours = servers.Server(servers.OURS, command=["python", "-m", "app.cli", "--n-ctx", "9"])
    assert editing.fim_window(ours) == editing.DEFAULT_WINDOW[servers.OURS] == 1024
    ours.command += ["--n-batch", "4096", "--fim-window", "512"]
    assert editing.fim_window(ours) == 512
    preset = servers.Server(servers.LLAMA_SERVER, command=["llama-server", "-b", "1024"])
    assert editing.fim_window(preset) == 1024
    assert editing.fim_window(servers.Server(servers.LLAMA_SERVER, command=["x"])) == 2048
    command = ["x", "--n-batch", "512", "--ctx-size", "9", "--batch-size", "512", "-b", "7"]
    assert editing._without(command, editing.BATCH_FLAGS) == ["x", "--ctx-size", "9", "-b", "7"]


# -- the committed run ---------------------------------------------------------------------------


def test_the_committed_editing_run_is_the_report_of_its_figures() -> None:
    """bench/results/editing.md is the report of editing.json (no figure typed in), and every
    line docs/performance.md shows of that run (table rows, target verdicts, the prompt
    cache's figures) is a line of that report."""
    results_dir = ROOT / "bench" / "results"
    results = json.loads((results_dir / "editing.json").read_text())
    report = (results_dir / "editing.md").read_text(encoding="utf-8")
    assert report == markdown(results)
    page = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    section = page.split("## Editor completion (fill-in-the-middle)", 1)[1].split("\n## ", 1)[0]
    part = section.split("<!-- editing -->", 1)[1].split("<!-- end -->", 1)[0]
    intro, rest = part.strip().split("\n\n", 1)
    assert intro.startswith("Model: ") and results["machine"]["git_commit"][:7] in intro
    shown = [line for line in rest.splitlines() if line.strip()]
    assert sum(line.startswith("| ") for line in shown) > 2
    assert any(line.startswith("- Run ") for line in shown)  # the target's verdicts
    lines = report.splitlines()
    for line in shown:
        assert line in lines, line
    for row in results["rows"]:
        assert row["failure"] is None and row["error_count"] == 0, row["server"]


def test_make_bench_runs_the_editing_bench() -> None:
    makefile = (ROOT / "Makefile").read_text()
    target = makefile.split("\nbench:", 1)[1].split("\n\n", 1)[0]
    assert "$(PY) -m bench.editing $(EDITING_ARGS)" in target
    assert "EDITING_ARGS ?=" in makefile


@pytest.mark.slow
def test_the_quick_editing_run_measures_every_server_or_says_why_not(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.editing", "--quick", "--variant", "qwen3-moe-serve",
         "--variant", "llama-server --cache-reuse 256", "--out", str(tmp_path),
         "--cache-dir", str(tmp_path / "models")],
        capture_output=True, text=True, timeout=600, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((tmp_path / "editing.json").read_text())
    assert (tmp_path / "editing.md").read_text(encoding="utf-8") == markdown(results)
    binary, why_not = servers.find_llama_server(None, ROOT)
    by_label = {s["label"]: s for s in results["servers"]}
    assert by_label["llama-server --cache-reuse 256"]["skipped"] == (None if binary else why_not)
    measured = {s["label"] for s in results["servers"] if s["skipped"] is None}
    assert {row["server"] for row in results["rows"]} == measured
    for row in results["rows"]:
        assert row["failure"] is None and row["error_count"] == 0, row
        samples = row["samples"]
        fims = samples["kind"].count("first") + samples["kind"].count("keystroke")
        fims += samples["kind"].count("new position") + samples["kind"].count("after ring change")
        assert fims == results["session"]["fim_requests"]
        assert samples["kind"].count("warm-up") == results["session"]["warm_ups"]
        for n, cached, evaluated in zip(
            samples["prompt_n"], samples["cache_n"], samples["tokens_evaluated"], strict=True
        ):
            assert n + cached == evaluated
        # a keystroke brings in its few characters (and the suffix tokens the suggestion of
        # the speculative request before it had pushed out of the window); a speculative
        # request next to nothing: its suggestion is the completion the server just wrote
        keystroke, speculative = row["kinds"]["keystroke"], row["kinds"]["speculative"]
        assert keystroke["edit_tokens_mean"] <= results["settings"]["n_predict"] + 8
        assert speculative["edit_tokens_mean"] < 3
        assert row["fim"]["tokens_evaluated_mean"] > 1000
