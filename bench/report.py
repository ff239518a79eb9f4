"""Figures from the raw measurements, and the three outputs: JSON, Markdown and PNG plots.

The JSON holds every sample (each request's time to first token, each inter-token gap), so
the table and the plots can be rebuilt from it alone (``python -m bench.report RESULTS.json``).
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import facts
from bench.client import Load, Stream, read_stream

MS = 1000.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile by linear interpolation (numpy's default), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * MS, 3)


def _ms_list(seconds: Sequence[float]) -> list[float]:
    return [round(s * MS, 3) for s in seconds]


def level_figures(load: Load, max_tokens: int, *, window_s: float | None = None) -> dict[str, Any]:
    """One concurrency level: TTFT and inter-token latency, throughput, errors.

    ``window_s`` replaces the load's own wall-clock window (for streams that were measured
    one at a time, between other work, whose window is the sum of their durations).
    """
    streams = [read_stream(e) for e in load.exchanges]
    ttfts = [s.ttft for s in streams if s.ttft is not None]
    gaps = [gap for s in streams for gap in s.gaps]
    tokens = sum(len(s.token_times) for s in streams)
    window = window_s if window_s is not None else load.finished - load.started
    errors = [s.error for s in streams if s.error is not None]
    return {
        "concurrency": load.concurrency,
        "requests": len(streams),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "short_streams": sum(len(s.token_times) < max_tokens for s in streams),
        "tokens": tokens,
        "window_s": round(window, 4),
        "tokens_per_s": round(tokens / window, 2) if window > 0 else None,
        "ttft_ms": {"p50": _ms(percentile(ttfts, 0.5)), "p95": _ms(percentile(ttfts, 0.95))},
        "itl_ms": {"p50": _ms(percentile(gaps, 0.5)), "p95": _ms(percentile(gaps, 0.95))},
        "ttft_samples_ms": _ms_list(ttfts),
        "itl_samples_ms": _ms_list(gaps),
    }


def per_token(stream: Stream) -> float | None:
    """Mean seconds per token of one stream after its first token."""
    times = stream.token_times
    return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None


def overhead_figures(
    floor_ttft: Sequence[float],
    floor_per_token: Sequence[float],
    streams: Sequence[Stream],
    *,
    http_ttft: Sequence[float] | None = None,
) -> dict[str, Any]:
    """A server's single-stream cost over the in-process floor, from alternated runs.

    ``http_ttft``: first-token times from their own requests (then ``floor_ttft`` should come
    from the same kind of floor runs); without it, the ``streams``' own first tokens.
    """
    if http_ttft is None:
        http_ttft = [s.ttft for s in streams if s.ttft is not None]
    http_per_token = [p for s in streams if (p := per_token(s)) is not None]
    f_ttft = statistics.median(floor_ttft) if floor_ttft else None
    f_tok = statistics.median(floor_per_token) if floor_per_token else None
    h_ttft = statistics.median(http_ttft) if http_ttft else None
    h_tok = statistics.median(http_per_token) if http_per_token else None
    return {
        "floor_ttft_ms": _ms(f_ttft),
        "floor_per_token_ms": _ms(f_tok),
        "http_ttft_ms": _ms(h_ttft),
        "http_per_token_ms": _ms(h_tok),
        "per_token_ratio": round(h_tok / f_tok, 4) if h_tok is not None and f_tok else None,
        "ttft_overhead_ms": _ms(h_ttft - f_ttft) if h_ttft is not None and f_ttft else None,
        "events_per_s_per_stream": round(1 / h_tok, 1) if h_tok else None,
        "floor_ttft_samples_ms": _ms_list(floor_ttft),
        "floor_per_token_samples_ms": _ms_list(floor_per_token),
        "http_ttft_samples_ms": _ms_list(http_ttft),
        "http_per_token_samples_ms": _ms_list(http_per_token),
    }


# -- Markdown ---------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pair(figures: dict[str, float | None], digits: int = 1) -> str:
    return f"{_f(figures['p50'], digits)} / {_f(figures['p95'], digits)}"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def machine_line(machine: dict[str, Any]) -> str:
    """The machine, its load while measured, and the code measured, in one sentence."""
    load = machine["load_average"]
    # Results written before bench.facts named the platform "os" and the commit "abc1234-dirty".
    system = machine.get("platform") or machine.get("os")
    commit = facts.commit_label(machine) if "git_dirty" in machine else machine.get("git_commit")
    return (
        f"Machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs, "
        f"{machine['memory_gib']} GiB; load average {load['start'][0]:.2f} at the start, "
        f"{load['end'][0]:.2f} at the end. {system}, Python {machine['python']}. "
        f"Code: commit {commit}."
    )


def head_lines(title: str, results: dict[str, Any], *, also: str = "") -> list[str]:
    """A report's opening: its title and date, the machine, the versions (``also`` appended:
    a binary's own version line) and the command with how long it ran."""
    versions = ", ".join(f"{name} {version}" for name, version in results["versions"].items())
    return [
        f"# {title} ({results['date']})",
        "",
        machine_line(results["machine"]),
        "",
        f"Versions: {versions}{also}",
        "",
        f"Command: `{results['command']}` ({results['elapsed_s']:.0f} s).",
    ]


def markdown(results: dict[str, Any]) -> str:
    lines = head_lines("Benchmark results", results)
    check = results.get("client_check")
    if check:
        lines += ["", _client_check_line(check)]
    for model in results["models"]:
        lines += ["", *_model_section(model, results["settings"])]
    return "\n".join(lines) + "\n"


def _client_check_line(check: dict[str, Any]) -> str:
    if check.get("skipped"):
        return f"Client check against curl: skipped ({check['skipped']})."
    return (
        "Client check (non-streamed 1-token completion, time to first byte, median of "
        f"{check['runs']}): this client {check['client_ttfb_ms']:.2f} ms; "
        f"`curl -w %{{time_starttransfer}}` {check['curl_ttfb_ms']:.2f} ms, of which "
        f"{check['curl_ttfb_after_connect_ms']:.2f} ms after its connect (this client's "
        "connection is open before its clock starts)."
    )


def _model_section(model: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    floor = model["floor"]
    lines = [
        f"## {model['label']}: `{model['file']}` ({model['size_bytes'] / 1e6:.1f} MB)",
        "",
        f"{model['prompt_tokens']}-token prompt (the same text every request, so it is warm in "
        f"the KV cache), {model['max_tokens']} tokens per request, greedy; n_ctx "
        f"{settings['n_ctx']}, {settings['n_threads']} threads, batch {settings['n_batch']}, "
        f"parallel {settings['parallel']}, flash attention "
        f"{settings.get('flash_attn', 'off')}. In-process floor (llama-cpp-python's token "
        f"iterator, no HTTP): TTFT {_f(floor['ttft_ms'], 2)} ms, "
        f"{_f(floor['per_token_ms'], 3)} ms/token.",
        "",
        "| server | streams | TTFT p50 / p95 (ms) | ITL p50 / p95 (ms) | tokens/s | errors "
        "| peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    skipped = []
    for server in model["servers"]:
        if server["status"] != "ok":
            skipped.append(f"- {server['name']}: {server['status']} ({server['reason']})")
            continue
        for level in server["levels"]:
            lines.append(
                f"| {server['name']} | {level['concurrency']} | {_pair(level['ttft_ms'])} "
                f"| {_pair(level['itl_ms'], 2)} | {_f(level['tokens_per_s'])} "
                f"| {level['errors']}/{level['requests']} | {_mib(server['peak_rss_bytes'])} |"
            )
    lines += [
        "",
        "Single stream over the floor, from alternated runs (floor, HTTP, floor, HTTP, …): "
        f"per token from {settings['reps']} full-length runs each, time to first token from "
        f"{settings.get('ttft_probes', 0) or settings['reps']} 1-token requests each"
        f"{'' if settings.get('ttft_probes') else ' (the full-length runs)'}:",
        "",
        "| server | HTTP ms/token | floor ms/token | ratio | HTTP TTFT - floor TTFT (ms) "
        "| events/s per stream |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for server in model["servers"]:
        if server["status"] != "ok":
            continue
        o = server["overhead"]
        lines.append(
            f"| {server['name']} | {_f(o['http_per_token_ms'], 3)} "
            f"| {_f(o['floor_per_token_ms'], 3)} | {_f(o['per_token_ratio'], 3)} "
            f"| {_f(o['ttft_overhead_ms'], 2)} | {_f(o['events_per_s_per_stream'], 0)} |"
        )
    others = [
        f"{server['name']} {_f(server.get('other_processes_cpus'), 2)}"
        for server in model["servers"]
        if server["status"] == "ok"
    ]
    if others:
        lines += [
            "",
            "CPUs kept busy by other processes on the host while each server was measured: "
            + ", ".join(others)
            + ".",
        ]
    if skipped:
        lines += ["", "Not measured:", "", *skipped]
    return lines


# -- plots ------------------------------------------------------------------------------------


def plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Per model: latency CDFs (TTFT, ITL) and throughput against concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for model in results["models"]:
        servers = [s for s in model["servers"] if s["status"] == "ok"]
        if not servers:
            continue
        label = model["label"]
        fig, (ax_ttft, ax_itl) = plt.subplots(1, 2, figsize=(10, 3.8))
        for index, server in enumerate(servers):
            color = f"C{index}"
            levels = server["levels"]
            shown = [levels[0], levels[-1]] if len(levels) > 1 else levels
            for level, style in zip(shown, ("-", "--"), strict=False):
                name = f"{server['name']}, {level['concurrency']} stream(s)"
                for ax, key in ((ax_ttft, "ttft_samples_ms"), (ax_itl, "itl_samples_ms")):
                    values = sorted(level[key])
                    if values:
                        fractions = [(i + 1) / len(values) for i in range(len(values))]
                        ax.step(values, fractions, style, color=color, where="post", label=name)
        floor = model["floor"]
        if floor["per_token_ms"] is not None:
            ax_itl.axvline(floor["per_token_ms"], color="grey", lw=1, ls=":", label="floor")
        if floor["ttft_ms"] is not None:
            ax_ttft.axvline(floor["ttft_ms"], color="grey", lw=1, ls=":", label="floor")
        ax_ttft.set(xscale="log", xlabel="time to first token (ms)", ylabel="fraction")
        ax_itl.set(xscale="log", xlabel="inter-token latency (ms)", ylabel="fraction")
        ax_itl.legend(fontsize=7, loc="lower right")
        fig.suptitle(f"{label}: latency CDFs (solid: fewest streams, dashed: most)", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{label}_latency_cdf.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)

        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for index, server in enumerate(servers):
            xs = [level["concurrency"] for level in server["levels"]]
            ys = [level["tokens_per_s"] or 0.0 for level in server["levels"]]
            ax.plot(xs, ys, "o-", color=f"C{index}", label=server["name"])
        if floor["per_token_ms"]:
            ax.axhline(MS / floor["per_token_ms"], color="grey", ls=":", label="floor, 1 stream")
        ax.set(
            xscale="log",
            xlabel="concurrent streams",
            ylabel="aggregate tokens/s",
            title=f"{label}: throughput",
        )
        ax.set_xticks([level["concurrency"] for level in servers[0]["levels"]])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{label}_throughput.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def _json(results: dict[str, Any]) -> str:
    """Indented JSON with each list of numbers on one line (samples run to thousands)."""
    text = json.dumps(results, indent=1)
    return re.sub(
        r"\[\s*(-?[\d.e+-]+(?:,\s*-?[\d.e+-]+)*)\s*\]",
        lambda m: "[" + ", ".join(m.group(1).replace(",", " ").split()) + "]",
        text,
    )


def write_outputs(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """``results.json``, ``results.md`` and the plots into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    json_path.write_text(_json(results) + "\n")
    md_path = out_dir / "results.md"
    md_path.write_text(markdown(results))
    return [json_path, md_path, *plots(results, out_dir)]


def main(argv: Sequence[str] | None = None) -> int:
    """Rebuild the Markdown table and the plots from a results JSON."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m bench.report RESULTS.json", file=sys.stderr)
        return 2
    path = Path(args[0])
    results = json.loads(path.read_text())
    (path.parent / "results.md").write_text(markdown(results))
    plots(results, path.parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
