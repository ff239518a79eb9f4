"""``python -m bench.batching``: continuous batching, this server's ``--parallel`` against
``llama-server -np N``, many clients at once.

    python -m bench.batching [--model PATH] [--clients 1,2,4,8] [--parallel 1,4]
        [--llama-server PATH] [--llama-server-np 4] [--flash-attn auto|on|off]
        [--repeat 2] [--out bench/results]

Without ``--model`` it builds the default random-weight bench model (``bench.model``: 12
layers, d=1024, 32 experts / 8 active, F16). Every request streams ``/v1/completions`` with
its own random prompt of ``--prompt-tokens`` printable-byte token ids (so no request reuses
another's KV cache) and ``--max-tokens`` tokens (the bench model never ends a generation
early). Each of C clients sends ``--rounds`` requests back to back, each on a fresh
connection. Reported per server and C: aggregate completion tokens/s over the whole window,
per-stream inter-token latency p50/p95 (gaps between consecutive token events of one stream),
time to first token p50/p95, and errors (a non-200, an error event, a missing ``[DONE]`` or
fewer tokens than asked).

The servers take turns for every client count (each turn starts its server afresh), R times
with ``--repeat R``; each cell of the table is the median of its R runs, errors summed, and
every run is kept in the JSON. Servers are started by ``bench.servers``, requests sent by
``bench.client`` and percentiles computed by ``bench.report``, as in ``make bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench import client, facts, report
from bench.model import ensure_bench_model, random_prompt
from bench.servers import (
    LLAMA_SERVER,
    OURS,
    Server,
    ServerSettings,
    serve,
    server,
    stop_servers_on_sigterm,
)

ROOT = Path(__file__).resolve().parent.parent
WARM_UP_TOKENS = 8


@dataclass
class Row:
    server: str
    clients: int
    tokens_per_s: float | None
    itl_p50_ms: float | None
    itl_p95_ms: float | None
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    requests: int
    errors: int


def failed(load: client.Load, max_tokens: int) -> int:
    """Requests that errored or streamed fewer tokens than asked."""
    streams = [client.read_stream(e) for e in load.exchanges]
    return sum(s.error is not None or len(s.token_times) < max_tokens for s in streams)


def _ms(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def measure(
    host: str,
    port: int,
    label: str,
    clients: int,
    rounds: int,
    prompt_tokens: int,
    max_tokens: int,
) -> Row:
    rng = random.Random(f"{label} {clients} {time.time()}")
    build = client.streamed_completions(
        host, port, lambda: random_prompt(rng, prompt_tokens), max_tokens
    )
    load = asyncio.run(
        client.run_load(host, port, build, concurrency=clients, requests_per_worker=rounds)
    )
    figures = report.level_figures(load, max_tokens)
    return Row(
        server=label,
        clients=clients,
        tokens_per_s=figures["tokens_per_s"],
        itl_p50_ms=_ms(figures["itl_ms"]["p50"]),
        itl_p95_ms=_ms(figures["itl_ms"]["p95"]),
        ttft_p50_ms=_ms(figures["ttft_ms"]["p50"]),
        ttft_p95_ms=_ms(figures["ttft_ms"]["p95"]),
        requests=figures["requests"],
        errors=failed(load, max_tokens),
    )


def run_server(
    candidate: Server, settings: ServerSettings, clients: int, args: argparse.Namespace
) -> Row | str:
    """Start ``candidate`` afresh, warm it up, measure ``clients`` clients, stop it; or why
    it could not be measured."""
    log = args.cache_dir / "logs" / f"batching-{candidate.label.replace(' ', '_')}.log"
    try:
        with serve(candidate, settings, log, args.ready_timeout) as running:
            host, port = running.host, running.port
            rng = random.Random(0)
            warm = client.streamed_completions(
                host, port, lambda: random_prompt(rng, args.prompt_tokens), WARM_UP_TOKENS
            )
            asyncio.run(client.run_load(host, port, warm, concurrency=1, requests_per_worker=1))
            row = measure(
                host,
                port,
                candidate.label,
                clients,
                args.rounds,
                args.prompt_tokens,
                args.max_tokens,
            )
    except RuntimeError as exc:
        print(f"{candidate.label}, {clients} clients: {exc}", file=sys.stderr)
        return str(exc)
    print(json.dumps(asdict(row)), flush=True)
    return row


def medians(rows: list[Row]) -> list[Row]:
    """One row per (server, clients): the median of every figure, errors and requests summed."""
    groups: dict[tuple[str, int], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.server, row.clients), []).append(row)
    out = []
    for (name, clients), runs in groups.items():

        def mid(field: str, runs: list[Row] = runs) -> float | None:
            values = [v for r in runs if (v := getattr(r, field)) is not None]
            return float(statistics.median(values)) if values else None

        out.append(
            Row(
                server=name,
                clients=clients,
                tokens_per_s=mid("tokens_per_s"),
                itl_p50_ms=mid("itl_p50_ms"),
                itl_p95_ms=mid("itl_p95_ms"),
                ttft_p50_ms=mid("ttft_p50_ms"),
                ttft_p95_ms=mid("ttft_p95_ms"),
                requests=sum(r.requests for r in runs),
                errors=sum(r.errors for r in runs),
            )
        )
    return out


def _f(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(rows: list[Row]) -> str:
    baseline = {r.server: r.tokens_per_s for r in rows if r.clients == 1}
    lines = [
        "| server | clients | tokens/s | vs 1 client | ITL p50 / p95 (ms) "
        "| TTFT p50 / p95 (ms) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = baseline.get(r.server)
        scale = r.tokens_per_s / base if base and r.tokens_per_s is not None else None
        lines.append(
            f"| {r.server} | {r.clients} | {_f(r.tokens_per_s, 1)} | {_f(scale, 2)} "
            f"| {_f(r.itl_p50_ms, 0)} / {_f(r.itl_p95_ms, 0)} | {_f(r.ttft_p50_ms, 0)} / "
            f"{_f(r.ttft_p95_ms, 0)} | {r.errors}/{r.requests} |"
        )
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    model = results["model"]
    lines = [
        *report.head_lines("Many clients: continuous batching against llama-server", results),
        "",
        f"Model `{model['file']}` ({model['size_bytes'] / 1e6:.1f} MB). Each client sends "
        f"{s['rounds']} streamed requests back to back, each on a fresh connection with its own "
        f"{s['prompt_tokens']}-token prompt of random printable-byte token ids, "
        f"{s['max_tokens']} tokens out, greedy; context {s['n_ctx']} per slot, "
        f"{s['n_threads']} threads, flash attention {s['flash_attn']}. The servers took turns "
        "at every client count, each on a freshly started server; each cell is the median of "
        f"{s['repeat']} run(s), errors summed (every run in batching.json). Percentiles "
        "interpolate between samples (bench.report.percentile).",
        "",
        table([Row(**r) for r in results["medians"]]),
    ]
    skipped = [f"- {e['label']}: {e['reason']}" for e in results["not_measured"]]
    if skipped:
        lines += ["", "Not measured:", "", *skipped]
    failed_runs = [
        f"- {e['label']}, {e['clients']} clients: {e['reason']}" for e in results["failed_runs"]
    ]
    if failed_runs:
        lines += ["", "Runs that failed (not in the table):", "", *failed_runs]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.batching", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--model", type=Path, help="GGUF to serve (default: the bench model)")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "bench")
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--parallel", default="1,4", help="--parallel values of this server")
    parser.add_argument(
        "--llama-server",
        type=Path,
        help="llama-server binary (else $LLAMA_SERVER, PATH, .cache/llama-server/**/bin)",
    )
    parser.add_argument("--llama-server-np", type=int, default=4)
    parser.add_argument("--n-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--n-ctx", type=int, default=1024, help="context per slot")
    parser.add_argument("--prompt-tokens", type=int, default=253)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="requests per client")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every server, in turn")
    parser.add_argument(
        "--flash-attn",
        choices=("auto", "on", "off"),
        default="auto",
        help="flash attention in every server (auto: each server's and llama.cpp's default)",
    )
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds per start")
    parser.add_argument("--out", type=Path, help="write batching.json and batching.md here")
    args = parser.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    args.parallel = [int(p) for p in args.parallel.split(",")]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop_servers_on_sigterm()
    started = time.perf_counter()
    results: dict[str, Any] = {
        "schema": 2,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(
            ["python", "-m", "bench.batching", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": facts.run_machine(ROOT),
        "versions": facts.versions(),
    }
    model = args.model
    if model is None:
        model = ensure_bench_model(args.cache_dir)
    settings = ServerSettings(
        model=model,
        n_ctx=args.n_ctx,
        n_threads=args.n_threads,
        n_batch=512,
        parallel=1,
        flash_attn=args.flash_attn,
        max_queue=64,
    )
    candidates: list[tuple[Server, ServerSettings]] = []
    for parallel in args.parallel:
        ours = replace(settings, parallel=parallel)
        label = f"{OURS} --parallel {parallel}"
        candidates.append((server(OURS, ours, None, ROOT, label=label), ours))
    theirs = replace(settings, parallel=args.llama_server_np)
    label = f"{LLAMA_SERVER} -np {args.llama_server_np}"
    candidates.append((server(LLAMA_SERVER, theirs, args.llama_server, ROOT, label=label), theirs))
    runnable = [(c, s) for c, s in candidates if not c.skipped]
    rows: list[Row] = []
    failures: list[dict[str, Any]] = []
    # Servers take turns per client count, so a noisy neighbour on a shared machine tends
    # to hit them alike; each turn starts the server afresh (no KV cache carried over).
    for _ in range(args.repeat):
        for clients in args.clients:
            for candidate, candidate_settings in runnable:
                row = run_server(candidate, candidate_settings, clients, args)
                if isinstance(row, Row):
                    rows.append(row)
                else:
                    failures.append({"label": candidate.label, "clients": clients, "reason": row})
    results["machine"]["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    results |= {
        "model": {"file": model.name, "path": str(model), "size_bytes": model.stat().st_size},
        "settings": {
            "n_ctx": args.n_ctx,
            "n_threads": args.n_threads,
            "flash_attn": args.flash_attn,
            "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "repeat": args.repeat,
            "clients": args.clients,
        },
        "servers": [
            {"label": c.label, "command": shlex.join(c.command), "version": c.version}
            for c, _ in runnable
        ],
        "not_measured": [
            {"label": c.label, "reason": c.skipped} for c, _ in candidates if c.skipped
        ],
        "failed_runs": failures,
        "rows": [asdict(r) for r in rows],
        "medians": [asdict(r) for r in medians(rows)],
    }
    text = markdown(results)
    print()
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "batching.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "batching.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
