#!/usr/bin/env python3
"""Concurrent streaming clients against this server (``--parallel 1`` and ``N``) and,
when given, llama.cpp's ``llama-server`` on the same model, in one run.

    .venv/bin/python bench/batching.py [--model PATH] [--clients 1,2,4,8] [--parallel 1,4]
        [--llama-server .cache/llama-server/build/bin/llama-server] [--flash-attn auto|on|off]
        [--repeat 2] [--json out.json]

Without ``--model`` it builds the default random-weight bench model (``app.demo_model``:
12 layers, d=1024, 32 experts / 8 active, F16). Every request streams ``/v1/completions`` with
its own random prompt of ``--prompt-tokens`` printable-byte token ids (so no request reuses
another's KV cache) and ``--max-tokens`` tokens (the bench model never ends a generation early).
Each of C clients sends ``--rounds`` requests back to back. Reported per server and C:
aggregate completion tokens/s over the whole window, per-stream inter-token latency p50/p95
(gaps between consecutive token events of one stream), time to first token p50/p95, and
errors (a non-200, an error event, a missing ``[DONE]`` or fewer tokens than asked).
The servers take turns for every client count (each turn starts its server afresh), R times
with ``--repeat R``; each cell is the median of its R runs, errors summed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

PRINTABLE_BYTE_TOKENS = 94
"""Token ids 0..93 of the bench vocabulary are the bytes ``!``..``~`` (GPT-2 byte order)."""


@dataclass
class Stream:
    started: float
    events: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class Row:
    server: str
    clients: int
    tokens_per_s: float
    itl_p50_ms: float
    itl_p95_ms: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    requests: int
    errors: int


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_stream(
    http: httpx.AsyncClient, prompt: list[int], max_tokens: int, stream: Stream
) -> None:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    done = False
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                stream.error = f"HTTP {response.status_code}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line.removeprefix("data: ")
                if payload == "[DONE]":
                    done = True
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    stream.error = str(chunk["error"].get("message"))
                    return
                if any(choice.get("text") for choice in chunk.get("choices", [])):
                    stream.events.append(time.perf_counter())
    except httpx.HTTPError as exc:
        stream.error = type(exc).__name__
        return
    if not done:
        stream.error = "no [DONE]"
    elif len(stream.events) < max_tokens:
        stream.error = f"{len(stream.events)} of {max_tokens} tokens"


async def measure(
    url: str, name: str, clients: int, rounds: int, prompt_tokens: int, max_tokens: int
) -> Row:
    rng = random.Random(f"{name} {clients} {time.time()}")
    streams: list[Stream] = []

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            for _ in range(rounds):
                prompt = [rng.randrange(PRINTABLE_BYTE_TOKENS) for _ in range(prompt_tokens)]
                stream = Stream(started=time.perf_counter())
                streams.append(stream)
                await one_stream(http, prompt, max_tokens, stream)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    tokens = sum(len(s.events) for s in streams)
    gaps = [b - a for s in streams for a, b in zip(s.events, s.events[1:], strict=False)]
    ttfts = [s.events[0] - s.started for s in streams if s.events]
    return Row(
        server=name,
        clients=clients,
        tokens_per_s=round(tokens / elapsed, 2),
        itl_p50_ms=round(1000 * percentile(gaps, 0.5), 1),
        itl_p95_ms=round(1000 * percentile(gaps, 0.95), 1),
        ttft_p50_ms=round(1000 * percentile(ttfts, 0.5), 1),
        ttft_p95_ms=round(1000 * percentile(ttfts, 0.95), 1),
        requests=len(streams),
        errors=sum(s.error is not None for s in streams),
    )


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError("server did not become ready")


def run_server(
    name: str, command: list[str], port: int, clients_list: list[int], args: argparse.Namespace
) -> list[Row]:
    url = f"http://127.0.0.1:{port}"
    log = open(Path(args.logs) / f"{name.replace(' ', '_')}.log", "ab")  # noqa: SIM115
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    rows = []
    try:
        wait_ready(url, process)
        asyncio.run(measure(url, name, 1, 1, args.prompt_tokens, 8))  # warm-up
        for clients in clients_list:
            row = asyncio.run(
                measure(url, name, clients, args.rounds, args.prompt_tokens, args.max_tokens)
            )
            print(json.dumps(asdict(row)), flush=True)
            rows.append(row)
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
    return rows


def medians(rows: list[Row]) -> list[Row]:
    """One row per (server, clients): the median of every figure, errors and requests summed."""
    groups: dict[tuple[str, int], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.server, row.clients), []).append(row)
    out = []
    for (server, clients), runs in groups.items():

        def mid(name: str, runs: list[Row] = runs) -> float:
            return float(statistics.median(getattr(r, name) for r in runs))

        out.append(
            Row(
                server=server,
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


def table(rows: list[Row]) -> str:
    baseline = {r.server: r.tokens_per_s for r in rows if r.clients == 1}
    lines = [
        "| server | clients | tokens/s | vs 1 client | ITL p50 / p95 (ms) "
        "| TTFT p50 / p95 (ms) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        scale = r.tokens_per_s / baseline[r.server] if baseline.get(r.server) else float("nan")
        lines.append(
            f"| {r.server} | {r.clients} | {r.tokens_per_s:.1f} | {scale:.2f} "
            f"| {r.itl_p50_ms:.0f} / {r.itl_p95_ms:.0f} | {r.ttft_p50_ms:.0f} / "
            f"{r.ttft_p95_ms:.0f} | {r.errors}/{r.requests} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="GGUF to serve (default: the bench model)")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/bench"))
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--parallel", default="1,4", help="--parallel values of this server")
    parser.add_argument("--llama-server", type=Path, help="llama-server binary to compare")
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
    parser.add_argument("--port", type=int, default=8470)
    parser.add_argument("--logs", default=".cache/bench")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        from bench.model import ensure_bench_model

        model = ensure_bench_model(args.cache_dir)
    threads = str(args.n_threads)
    servers: list[tuple[str, list[str]]] = []
    for parallel in (int(p) for p in args.parallel.split(",")):
        command = [
            sys.executable, "-m", "app.cli", "--model", str(model), "--port", str(args.port),
            "--parallel", str(parallel), "--n-ctx", str(args.n_ctx), "--n-threads", threads,
            "--max-queue", "64", "--flash-attn", args.flash_attn, "--log-level", "warning",
        ]  # fmt: skip
        servers.append((f"qwen3-moe-serve --parallel {parallel}", command))
    if args.llama_server is not None:
        np_ = args.llama_server_np
        command = [
            str(args.llama_server), "-m", str(model), "--port", str(args.port),
            "-np", str(np_), "-c", str(args.n_ctx * np_), "-t", threads, "-tb", threads,
            "-b", "512", "-ub", "512", "-fa", args.flash_attn, "--no-webui",
        ]  # fmt: skip
        servers.append((f"llama-server -np {np_}", command))
    rows: list[Row] = []
    # Servers take turns per client count, so a noisy neighbour on a shared machine tends
    # to hit them alike; each turn starts the server afresh (no KV cache carried over).
    for _ in range(args.repeat):
        for clients in args.clients:
            for name, command in servers:
                rows += run_server(name, command, args.port, [clients], args)
    print()
    print(f"model {model.name}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {threads} threads, flash attention "
          f"{args.flash_attn}; {args.prompt_tokens}-token prompts, "
          f"{args.max_tokens} tokens per request, {args.rounds} requests per client, "
          f"median of {args.repeat} run(s)")  # fmt: skip
    print(table(medians(rows)))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
