"""The benchmark harness (``make bench``), end to end on the tiny model with tiny counts.

These tests check that the harness measures what it says and reports it consistently, not
how fast anything is: no wall-clock thresholds.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import servers
from bench.client import Exchange, _Protocol, read_stream

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _chunked_sse(events: list[bytes], sep: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
    body = b"".join(b"%x\r\n%s\r\n" % (len(e + sep), e + sep) for e in events)
    return head + b"\r\n" + body + b"0\r\n\r\n"


class _Transport(asyncio.Transport):
    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


@pytest.mark.anyio
@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n"])
async def test_client_reads_the_same_events_whatever_the_read_boundaries(sep: bytes) -> None:
    """The raw client must find every event and [DONE] however TCP splits the bytes."""
    events = [b'data: {"choices":[{"text":"%d"}]}' % i for i in range(20)]
    events.insert(5, b": keep-alive")
    wire = _chunked_sse([*events, b"data: [DONE]"], sep)
    rng = random.Random(7)
    for _ in range(30):
        protocol = _Protocol()
        protocol.connection_made(_Transport())
        done = protocol.send(b"GET / HTTP/1.1\r\n\r\n")
        position = 0
        while position < len(wire):
            step = rng.randint(1, 40)
            protocol.data_received(wire[position : position + step])
            position += step
        exchange: Exchange = await asyncio.wait_for(done, 1)
        stream = read_stream(exchange)
        assert stream.error is None and stream.done
        assert len(stream.token_times) == 20
        assert protocol.reusable


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench")
    command = [
        sys.executable, "-m", "bench", "--models", "tiny", "--concurrency", "1,2",
        "--reps", "2", "--ttft-probes", "3", "--rounds", "1", "--prompt-tokens", "24",
        "--max-tokens", "6",
        "--n-threads", "1", "--llama-server", str(out / "no-such-llama-server"),
        "--out", str(out), "--cache-dir", str(out / "models"), "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), done.stdout


@pytest.mark.slow
def test_bench_writes_json_markdown_and_plots(bench_run: tuple[Path, dict[str, Any], str]) -> None:
    out, results, stdout = bench_run
    assert (out / "results.md").read_text() in stdout
    for name in ("tiny_latency_cdf.png", "tiny_throughput.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    machine = results["machine"]
    assert machine["cpu_count"] >= 1 and machine["cpu_model"]
    assert len(machine["load_average"]["start"]) == len(machine["load_average"]["end"]) == 3
    assert results["versions"]["llama-cpp-python"]
    assert results["elapsed_s"] > 0


@pytest.mark.slow
def test_bench_reports_a_missing_peer_as_skipped(
    bench_run: tuple[Path, dict[str, Any], str],
) -> None:
    """A peer it cannot find is reported as skipped with the reason, never measured."""
    out, results, _ = bench_run
    (model,) = results["models"]
    llama_server = next(s for s in model["servers"] if s["name"] == "llama-server")
    assert llama_server["status"] == "skipped"
    assert "no-such-llama-server" in llama_server["reason"]
    assert "levels" not in llama_server and "overhead" not in llama_server
    assert "- llama-server: skipped" in (out / "results.md").read_text()


@pytest.mark.slow
def test_bench_figures_are_consistent(bench_run: tuple[Path, dict[str, Any], str]) -> None:
    """Each measured server: every request streamed every token; counts, samples, percentiles
    and the Markdown rows agree with each other."""
    out, results, _ = bench_run
    (model,) = results["models"]
    markdown = (out / "results.md").read_text()
    measured = [s for s in model["servers"] if s["status"] == "ok"]
    assert "qwen3-moe-serve" in [s["name"] for s in measured]
    assert 0 < model["prompt_tokens"] <= 24
    max_tokens = model["max_tokens"]
    for server in measured:
        assert server["peak_rss_bytes"] > 0
        assert server["other_processes_cpus"] >= 0
        assert [level["concurrency"] for level in server["levels"]] == [1, 2]
        for level in server["levels"]:
            requests = 2 if level["concurrency"] == 1 else level["concurrency"]
            assert level["requests"] == requests
            assert level["errors"] == 0 and level["short_streams"] == 0
            assert level["tokens"] == requests * max_tokens
            assert len(level["ttft_samples_ms"]) == requests
            assert len(level["itl_samples_ms"]) == requests * (max_tokens - 1)
            for key in ("ttft_ms", "itl_ms"):
                samples = level[key.replace("_ms", "_samples_ms")]
                assert min(samples) <= level[key]["p50"] <= level[key]["p95"] <= max(samples)
            assert level["tokens_per_s"] == pytest.approx(
                level["tokens"] / level["window_s"], rel=_rounding(level["window_s"])
            )
            assert f"| {server['name']} | {level['concurrency']} |" in markdown
        overhead = server["overhead"]
        assert len(overhead["floor_per_token_samples_ms"]) == 2
        assert len(overhead["http_per_token_samples_ms"]) == 2
        # the first token is timed by its own alternated 1-token requests
        assert len(overhead["floor_ttft_samples_ms"]) == 3
        assert len(overhead["http_ttft_samples_ms"]) == 3
        # The ratio comes from the unrounded times, the milliseconds are rounded to 0.001:
        # on the tiny model (~0.08 ms per token) that rounding alone moves the ratio by ~1 %.
        http_ms, floor_ms = overhead["http_per_token_ms"], overhead["floor_per_token_ms"]
        rounding = http_ms / floor_ms * (0.0005 / http_ms + 0.0005 / floor_ms) + 0.00005
        assert overhead["per_token_ratio"] == pytest.approx(http_ms / floor_ms, abs=rounding)
        assert overhead["ttft_overhead_ms"] == pytest.approx(
            overhead["http_ttft_ms"] - overhead["floor_ttft_ms"], abs=0.01
        )


@pytest.mark.slow
def test_bench_checks_its_client_against_curl(
    bench_run: tuple[Path, dict[str, Any], str],
) -> None:
    _, results, _ = bench_run
    check = results["client_check"]
    if shutil.which("curl") is None:
        assert check == {"skipped": "curl is not on PATH"}
        return
    assert check["server"] == "qwen3-moe-serve"
    assert len(check["client_samples_ms"]) == len(check["curl_samples_ms"]) == check["runs"]
    assert check["client_ttfb_ms"] > 0
    assert 0 < check["curl_ttfb_after_connect_ms"] <= check["curl_ttfb_ms"]


def test_a_variant_with_a_flag_the_server_does_not_list_is_skipped(tmp_path: Path) -> None:
    """A variant flag missing from the server's --help skips the variant with the reason; a
    listed one is passed as is."""
    settings = servers.ServerSettings(
        model=tmp_path / "m.gguf", n_ctx=256, n_threads=1, n_batch=512, parallel=4, flash_attn="on"
    )
    ours = servers.OURS
    missing = servers.server(ours, settings, None, ROOT, extra_args=("--no-such-flag",), label="x")
    assert missing.skipped is not None
    assert "--no-such-flag" in missing.skipped and "--help" in missing.skipped
    listed = servers.server(ours, settings, None, ROOT, extra_args=("--max-queue", "3"))
    assert listed.skipped is None
    assert listed.command[-2:] == ["--max-queue", "3"]
    assert listed.label == ours


@pytest.mark.slow
def test_batching_bench_takes_turns_and_reports_every_run(tmp_path: Path) -> None:
    """bench.batching on the tiny model: every server at every client count, each request
    streamed in full, the medians and the Markdown table made of the same runs."""
    from bench.model import ensure_bench_model
    from bench.run import BUILT_MODELS

    model = ensure_bench_model(tmp_path / "models", **BUILT_MODELS["tiny"])
    command = [
        sys.executable, "-m", "bench.batching", "--model", str(model), "--clients", "1,2",
        "--parallel", "1,2", "--llama-server-np", "2", "--prompt-tokens", "24",
        "--max-tokens", "6", "--rounds", "2", "--n-threads", "1",
        "--llama-server", str(tmp_path / "no-such-llama-server"),
        "--cache-dir", str(tmp_path), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "batching.json").read_text())
    markdown = (tmp_path / "out" / "batching.md").read_text()
    assert markdown in done.stdout
    assert results["machine"]["git_commit"] and results["machine"]["cpu_count"] >= 1
    (skipped,) = results["not_measured"]
    assert skipped["label"] == "llama-server -np 2"
    assert "no-such-llama-server" in skipped["reason"]
    assert not results["failed_runs"]
    labels = ["qwen3-moe-serve --parallel 1", "qwen3-moe-serve --parallel 2"]
    # the servers take turns at each client count
    assert [(r["clients"], r["server"]) for r in results["rows"]] == [
        (clients, label) for clients in (1, 2) for label in labels
    ]
    assert results["medians"] == results["rows"]  # one run each: the median is the run
    for row in results["rows"]:
        assert row["requests"] == 2 * row["clients"] and row["errors"] == 0
        assert row["ttft_p50_ms"] <= row["ttft_p95_ms"]
        assert row["itl_p50_ms"] <= row["itl_p95_ms"]
        assert row["tokens_per_s"] > 0
        assert f"| {row['server']} | {row['clients']} | {row['tokens_per_s']:.1f} |" in markdown


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bench.model import ensure_bench_model
    from bench.run import BUILT_MODELS

    return ensure_bench_model(tmp_path_factory.mktemp("tiny"), **BUILT_MODELS["tiny"])


@pytest.mark.parametrize("layout", ["unified", "split"])
def test_engine_floor_decodes_what_llama_cpp_decodes_one_sequence_at_a_time(
    tiny_model: Path, layout: str
) -> None:
    """The batched floor is the servers' decode loop, so its tokens must be greedy decoding's:
    every sequence of one batched round yields what Llama.generate yields for it alone (a
    wrong position or sequence id would still time something, but not this)."""
    from llama_cpp import Llama

    from bench.engine_floor import EngineFloor, FloorSettings
    from bench.model import random_prompt

    rng = random.Random(11)
    prompts = [random_prompt(rng, n) for n in (5, 40, 17)]
    settings = FloorSettings(tiny_model, 4, 256, 1, 32, "on", layout)  # type: ignore[arg-type]
    floor = EngineFloor(settings)  # n_batch 32: the 40-token prompt spans two batches
    try:
        timed = floor.run_round(prompts, 8)
    finally:
        floor.close()
    assert len(timed.steps) == 7 and len(timed.ttfts) == 3
    assert min(timed.ttfts) > 0 and max(timed.ttfts) <= timed.seconds
    llm = Llama(model_path=str(tiny_model), n_ctx=256, n_threads=1, verbose=False)
    try:
        for prompt, tokens in zip(prompts, timed.tokens, strict=True):
            alone = []
            for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                alone.append(token)
                if len(alone) == 8:
                    break
            assert tokens == alone
    finally:
        llm.close()


@pytest.fixture(scope="module")
def many_streams(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("many_streams")
    command = [
        sys.executable, "-m", "bench.many_streams", "--quick", "--n-threads", "1",
        "--out", str(out), "--cache-dir", str(out / "cache"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    markdown = (out / "many_streams.md").read_text()
    assert markdown in done.stdout
    assert (out / "many_streams_runs.md").read_text() == markdown  # the record of every run
    return json.loads((out / "many_streams.json").read_text()), markdown


def _ordered(figures: dict[str, float]) -> bool:
    return figures["min"] <= figures["p50"] <= figures["p95"] <= figures["max"]


def _rounding(window_s: float) -> float:
    """Relative tolerance of a rate against its window, which is recorded to 0.1 ms: 1 % plus
    what that rounding alone moves a window of a few milliseconds."""
    return 0.01 + 0.00005 / window_s


@pytest.mark.slow
def test_many_streams_measures_every_variant_or_says_why_not(
    many_streams: tuple[dict[str, Any], str],
) -> None:
    """This server is always measured; llama-server where a binary is found, else skipped
    with the reason; a variant whose flag the server lacks is skipped, with the reason."""
    results, markdown = many_streams
    variants = {v["label"]: v for v in results["variants"]}
    ours = variants["qwen3-moe-serve --parallel 64"]
    assert not ours["skipped"] and ours["kv_layout"] == "split"
    unified = variants["qwen3-moe-serve --parallel 64 --kv-unified"]
    help_text = subprocess.run(
        [sys.executable, "-m", "app.cli", "--help"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert unified["skipped"] == ("--kv-unified" not in help_text)
    assert unified["skipped"] or unified["kv_layout"] == "unified"
    binary, why_not = servers.find_llama_server(None, ROOT)
    for label in ("llama-server -np 64", "llama-server -np 64 --kv-unified"):
        assert variants[label]["skipped"] == (binary is None)
        if binary is None:
            assert variants[label]["reason"] == why_not
    for variant in results["variants"]:
        if variant["skipped"]:
            assert variant["reason"] and f"- {variant['label']}: {variant['reason']}" in markdown
    measured = {v["label"] for v in results["variants"] if not v["skipped"]}
    for entry in results["runs"]:
        assert {row["label"] for row in entry["servers"]} == measured


@pytest.mark.slow
def test_many_streams_figures_are_consistent(many_streams: tuple[dict[str, Any], str]) -> None:
    """Every stream streamed every token; counts, percentiles, CPU per 1k tokens and every
    ratio to the floor and to the client ceiling come from the numbers reported beside them."""
    results, markdown = many_streams
    max_tokens = results["settings"]["max_tokens"]
    assert max_tokens == 16 and results["settings"]["parallel"] == 64
    assert results["machine"]["git_commit"] and results["machine"]["cpu_count"] >= 1
    points = [(e["streams"], e["prompt_tokens"]) for e in results["runs"]]
    assert points == [(1, 25), (4, 25), (4, 256)]
    for entry in results["runs"]:
        streams, rounds = entry["streams"], entry["rounds"]
        expected = streams * rounds * max_tokens
        assert entry["n_ctx_per_slot"] >= entry["prompt_tokens"] + max_tokens
        assert set(entry["floors"]) == {"unified", "split"}
        for layout, floor in entry["floors"].items():
            assert floor["layout"] == layout and floor["tokens"] == expected
            assert floor["steps"] == rounds * (max_tokens - 1)
            assert _ordered(floor["ttft_ms"]) and _ordered(floor["itl_ms"])
            assert floor["tokens_per_s"] == pytest.approx(
                expected / floor["window_s"], rel=_rounding(floor["window_s"])
            )
            assert floor["cpu_s_per_1k_tokens"] > 0
            assert f"| engine floor | {layout} | {floor['tokens_per_s']:.1f} |" in markdown
        engine = entry["engine"]  # this server's engine in-process, its default layout
        assert engine["layout"] == "split" and engine["tokens"] == expected
        assert _ordered(engine["ttft_ms"]) and _ordered(engine["itl_ms"])
        assert engine["tokens_per_s"] == pytest.approx(
            expected / engine["window_s"], rel=_rounding(engine["window_s"])
        )
        assert engine["cpu_s_per_1k_tokens"] > 0
        _check_vs_floor(engine, entry["floors"]["split"])
        shown = f"| qwen3-moe-serve engine, no HTTP | split | {engine['tokens_per_s']:.1f} "
        assert f"{shown}({engine['vs_floor']['tokens_per_s']:.2f}x) |" in markdown
        ceiling = entry["client_ceiling"]
        assert ceiling["status"] == "ok" and ceiling["failed"] == 0
        assert ceiling["tokens"] == expected
        assert ceiling["client_cpu_s_per_1k_tokens"] > 0
        for row in entry["servers"]:
            assert row["status"] == "ok", row.get("reason")
            assert row["requests"] == streams * rounds
            assert row["errors"] == row["short_streams"] == row["failed"] == 0
            assert row["tokens"] == expected
            assert _ordered(row["ttft_ms"]) and _ordered(row["itl_ms"])
            assert row["tokens_per_s"] == pytest.approx(
                row["tokens"] / row["window_s"], rel=_rounding(row["window_s"])
            )
            assert row["cpu_s_per_1k_tokens"] > 0
            assert row["server_cpu_s"] == pytest.approx(
                row["cpu_s_per_1k_tokens"] * row["tokens"] / 1000, rel=0.01, abs=1e-4
            )
            assert row["kv_layout"] in ("unified", "split")
            if row["kv_layout_logged"] is not None:
                assert row["kv_layout"] == row["kv_layout_logged"]
            _check_vs_floor(row, entry["floors"][row["kv_layout"]])
            vs = row["vs_floor"]
            assert row["vs_client_ceiling"] == pytest.approx(
                row["tokens_per_s"] / ceiling["tokens_per_s"], rel=1e-3
            )
            shown = f"| {row['label']} | {row['kv_layout']} | {row['tokens_per_s']:.1f} "
            assert f"{shown}({vs['tokens_per_s']:.2f}x) |" in markdown
        _check_head_to_head(entry, markdown)


def _check_vs_floor(figures: dict[str, Any], floor: dict[str, Any]) -> None:
    """Every ratio to the floor is the figure over the floor's, as both are reported."""
    vs = figures["vs_floor"]
    pairs = [
        (vs["tokens_per_s"], figures["tokens_per_s"], floor["tokens_per_s"]),
        (vs["ttft_p50"], figures["ttft_ms"]["p50"], floor["ttft_ms"]["p50"]),
        (vs["ttft_p95"], figures["ttft_ms"]["p95"], floor["ttft_ms"]["p95"]),
        (vs["itl_p50"], figures["itl_ms"]["p50"], floor["itl_ms"]["p50"]),
        (vs["itl_p95"], figures["itl_ms"]["p95"], floor["itl_ms"]["p95"]),
        (vs["cpu_s_per_1k_tokens"], figures["cpu_s_per_1k_tokens"], floor["cpu_s_per_1k_tokens"]),
    ]
    for ratio, value, limit in pairs:
        assert ratio == pytest.approx(value / limit, rel=1e-3, abs=1e-4)


def _check_head_to_head(entry: dict[str, Any], markdown: str) -> None:
    """The summary row of a point: this server's and llama-server's figures (both with their
    default flags) and their ratio, as the point's own rows report them."""
    rows = {row["label"]: row for row in entry["servers"] if row["status"] == "ok"}
    ours, theirs = rows.get("qwen3-moe-serve --parallel 64"), rows.get("llama-server -np 64")
    if ours is None or theirs is None:
        assert f"| {entry['streams']} x {entry['prompt_tokens']} | {entry['run'] + 1} |" not in (
            markdown
        )
        return
    cells = []
    for key, digits in (("tokens_per_s", 1), ("itl_p95", 2), ("cpu_s_per_1k_tokens", 3)):
        a, b = ((r["itl_ms"]["p95"] if key == "itl_p95" else r[key]) for r in (ours, theirs))
        ratio = float(f"{a / b:.4g}")  # the report's ratios are kept to 4 significant digits
        cells.append(f"{a:.{digits}f} / {b:.{digits}f} = {ratio:.2f}x")
    point = f"| {entry['streams']} x {entry['prompt_tokens']} | {entry['run'] + 1} | "
    row = point + " | ".join(cells)
    assert row in markdown, row


def test_the_committed_many_streams_run_is_the_report_of_its_figures() -> None:
    """bench/results/many_streams.md is the report of many_streams.json (no figure typed in),
    that run is in the record of every run, and docs/performance.md's many-streams rows are
    rows of that report."""
    from bench.many_streams import markdown as render

    results_dir = ROOT / "bench" / "results"
    results = json.loads((results_dir / "many_streams.json").read_text())
    report = (results_dir / "many_streams.md").read_text(encoding="utf-8")
    assert report == render(results)
    assert results["date"] in (results_dir / "many_streams_runs.md").read_text(encoding="utf-8")
    for entry in results["runs"]:
        _check_head_to_head(entry, report)
    page = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    section = page.split("## Many streams", 1)[1].split("\n## ", 1)[0]
    assert results["machine"]["git_commit"][:7] in section
    shown = [line for line in section.splitlines() if re.match(r"\| \d+ x \d+ \| \d \|", line)]
    assert len(shown) == len(results["runs"])
    for line in shown:
        assert line in report, line


def test_the_performance_page_shows_the_committed_runs() -> None:
    """docs/performance.md's tables are the committed results, not numbers typed in by hand."""
    section = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    assert "make bench" in section and "bench.batching" in section
    results = json.loads((ROOT / "bench" / "results" / "results.json").read_text())
    assert results["machine"]["git_commit"][:7] in section
    rows = 0
    for model in results["models"]:
        for server in model["servers"]:
            overhead = server["overhead"]
            digits = 2 if model["label"] == "bench" else 3
            row = (
                f"| {model['label']} | {server['name']} "
                f"| {overhead['http_per_token_ms']:.{digits}f} "
                f"| {overhead['floor_per_token_ms']:.{digits}f} |"
            )
            assert row in section, row
            rows += 1
    assert rows == 6
    batching = (ROOT / "bench" / "results" / "batching.md").read_text(encoding="utf-8")
    table = [line for line in batching.splitlines() if line.startswith(("| qwen3", "| llama"))]
    assert len(table) == 12
    for line in table:
        assert line in section, line
    (image,) = re.findall(r"!\[[^]]*\]\(([^)]+)\)", section)
    assert (ROOT / "docs" / image).read_bytes().startswith(PNG_MAGIC)
