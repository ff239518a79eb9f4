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
            assert level["tokens_per_s"] == pytest.approx(level["tokens"] / level["window_s"], 0.01)
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


def _readme_section(title: str) -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index(f"\n## {title}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start:end]


def test_readme_performance_figures_are_the_committed_runs() -> None:
    """The README's tables are the committed results, not numbers typed in by hand."""
    section = _readme_section("Performance")
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
    assert (ROOT / image).read_bytes().startswith(PNG_MAGIC)
