"""``bench.conversations``: the harness end to end on a small point, and the committed run.

The quick run's figures are checked for what they must be whatever the machine: every turn
answered, the cached share the ratio of the token counts beside it, and this server with its
default prompt cache serving more of the later turns from cache than with the cache off (a
conversation whose slot another one took comes back). The committed run is the report of its
own JSON, and docs/performance.md shows its rows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import servers
from bench.conversations import markdown

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("conversations")
    done = subprocess.run(
        [sys.executable, "-m", "bench.conversations", "--points", "6x3", "--parallel", "2",
         "--concurrency", "2", "--system-tokens", "400", "--user-words", "10",
         "--max-tokens", "8", "--variant", "qwen3-moe-serve",
         "--variant", "qwen3-moe-serve --cache-ram 0", "--variant", "llama-server",
         "--out", str(out), "--cache-dir", str(out / "models")],
        capture_output=True, text=True, timeout=600, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    results: dict[str, Any] = json.loads((out / "conversations.json").read_text())
    assert (out / "conversations.md").read_text(encoding="utf-8") == markdown(results)
    return results


@pytest.mark.slow
def test_the_conversations_bench_measures_every_server_or_says_why_not(
    quick_run: dict[str, Any],
) -> None:
    binary, why_not = servers.find_llama_server(None, ROOT)
    by_label = {s["label"]: s for s in quick_run["servers"]}
    assert by_label["qwen3-moe-serve"]["skipped"] is None
    assert by_label["llama-server"]["skipped"] == (None if binary else why_not)
    measured = {s["label"] for s in quick_run["servers"] if s["skipped"] is None}
    assert {row["server"] for row in quick_run["rows"]} == measured
    # each server with its own prefill defaults: no batch flag from the harness
    for server in quick_run["servers"]:
        assert not {"--n-batch", "--batch-size", "--ubatch-size"} & set(server["command"])


@pytest.mark.slow
def test_the_conversations_bench_figures_are_consistent(quick_run: dict[str, Any]) -> None:
    rows = {row["server"]: row for row in quick_run["rows"]}
    for row in rows.values():
        assert row["error_count"] == 0, row["errors"]
        later, first = row["later_turns"], row["first_turns"]
        assert (later["turns"], first["turns"]) == (12, 6)
        for block in (later, first):
            assert 0 <= block["cached_tokens"] <= block["prompt_tokens"]
            share = block["cached_tokens"] / block["prompt_tokens"]
            assert block["cached_share"] == pytest.approx(share, abs=1e-4)
            decoded = (block["prompt_tokens"] - block["cached_tokens"]) / block["turns"]
            assert block["decoded_per_turn"] == pytest.approx(decoded, abs=0.05)
            for figure in ("ttft_ms", "latency_ms"):
                assert 0 < block[figure]["p50"] <= block[figure]["p95"]
    cached = rows["qwen3-moe-serve"]["later_turns"]["cached_share"]
    assert cached > rows["qwen3-moe-serve --cache-ram 0"]["later_turns"]["cached_share"]


@pytest.mark.slow
def test_a_restart_keeps_the_cache_only_with_a_prompt_cache_dir(tmp_path: Path) -> None:
    """``--restart``: after a restart the turns are served from cache only where the server
    wrote its prompt cache to disk on the way down and read it back on start."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.conversations", "--points", "", "--restart", "4x2",
         "--parallel", "2", "--concurrency", "2", "--system-tokens", "400",
         "--user-words", "10", "--max-tokens", "8", "--variant", "qwen3-moe-serve",
         "--out", str(tmp_path), "--cache-dir", str(tmp_path / "models")],
        capture_output=True, text=True, timeout=600, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((tmp_path / "conversations.json").read_text())
    cold, kept = results["restart"]
    assert "--prompt-cache-dir" in kept["server"] and "--prompt-cache-dir" not in cold["server"]
    assert cold["error_count"] == kept["error_count"] == 0
    assert cold["after_restart"]["turns"] == kept["after_restart"]["turns"] == 4
    assert cold["after_restart"]["cached_share"] < 0.5 < kept["after_restart"]["cached_share"]


@pytest.mark.parametrize(
    "stem", ["conversations", "conversations_distinct", "conversations_restart"]
)
def test_the_committed_conversations_run_is_the_report_of_its_figures(stem: str) -> None:
    """bench/results/<stem>.md is the report of <stem>.json (no figure typed in), and every
    row docs/performance.md shows of that run is a row of that report."""
    results_dir = ROOT / "bench" / "results"
    results = json.loads((results_dir / f"{stem}.json").read_text())
    report = (results_dir / f"{stem}.md").read_text(encoding="utf-8")
    assert report == markdown(results)
    page = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    section = page.split("## Many conversations on few slots", 1)[1].split("\n## ", 1)[0]
    label = "its own" if results["settings"]["distinct_systems"] else "a shared"
    part = section.split(f"<!-- {stem} -->", 1)[1].split("<!-- end -->", 1)[0]
    assert results["machine"]["git_commit"][:7] in part and label in part
    shown = [line for line in part.splitlines() if line.startswith("| ") and "---" not in line]
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert len(shown) > 2
    for line in shown:
        assert line in table, line
