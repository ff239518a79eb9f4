"""``make bench``: this server against its peers, on the same GGUF, machine and load.

For each model (default: the random-weight bench model, then a tiny one where the HTTP path
dominates), in this process:

1. the floor: llama-cpp-python's token iterator, no HTTP (``bench.floor``);
2. each server in turn on a loopback port, with matching context, threads and batch
   (``bench.servers``): this project, llama-cpp-python's bundled server and llama.cpp's
   ``llama-server`` when a binary is found (skipped, with the reason, when not);
3. against each server: a warm-up, then single streams alternated with floor runs (floor,
   HTTP, floor, HTTP, ...) so that both see the same machine at the same moment and their
   ratio is the server's overhead; then the same streaming request from 2, 4, 8 concurrent
   workers (``bench.client``).

Every request is the same greedy ``/v1/completions`` stream of the same prompt, so the prompt
is warm in the KV cache and the time to first token is one decode step plus the server. The
concurrency-1 row of the table is made of the alternated single streams.

Outputs (``bench.report``): ``results.json`` with every sample, the machine and the versions;
``results.md``; PNG latency CDFs and throughput plots.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import client, facts, report
from bench.floor import Floor, FloorRun
from bench.servers import (
    ALL_SERVERS,
    OtherLoad,
    Running,
    Server,
    ServerSettings,
    serve,
    servers,
    stop_servers_on_sigterm,
)

ROOT = Path(__file__).resolve().parent.parent

BUILT_MODELS: dict[str, dict[str, int]] = {
    "bench": {},  # bench.model's defaults: 12 layers, d=1024, 32 experts / 8 active
    # The demo model's shapes with random weights: greedy decoding never ends, ~0.2 ms/token.
    "tiny": {
        "n_layer": 2,
        "n_embd": 128,
        "n_expert": 4,
        "n_expert_used": 2,
        "n_ff_exp": 64,
        "n_head": 4,
        "n_head_kv": 2,
        "head_dim": 32,
    },
}
DEFAULT_MAX_TOKENS = {"bench": 128, "tiny": 256}
WARM_UP_TOKENS = 4
SETTLE_S = 0.2
"""Pause between alternated floor and HTTP runs: the one that just ended still has work in
flight for a moment (llama.cpp's OpenMP threads spin before they sleep; a server logs and
tidies up after its last byte), which would otherwise land in the next one's first token."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark this server against llama-cpp-python's server and "
        "llama.cpp's llama-server on the same model (make bench).",
    )
    parser.add_argument(
        "--models",
        default="bench,tiny",
        help="comma-separated: 'bench' (random 12-layer qwen3moe), 'tiny' (random, demo-sized) "
        "or a GGUF path (default: %(default)s)",
    )
    parser.add_argument(
        "--servers",
        default=",".join(ALL_SERVERS),
        help="comma-separated subset of: %(default)s",
    )
    parser.add_argument(
        "--llama-server",
        type=Path,
        help="llama-server binary (else $LLAMA_SERVER, PATH, .cache/llama-server/**/bin)",
    )
    parser.add_argument("--concurrency", default="1,2,4,8", help="streams at once per level")
    parser.add_argument("--prompt-tokens", type=int, default=253)
    parser.add_argument(
        "--max-tokens",
        type=int,
        help="tokens per request (default: 128 for bench and paths, 256 for tiny)",
    )
    parser.add_argument(
        "--reps", type=int, default=4, help="alternated floor/HTTP single-stream runs"
    )
    parser.add_argument(
        "--ttft-probes",
        type=int,
        default=16,
        help="alternated floor/HTTP 1-token requests that time the first token",
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="requests per worker at concurrency > 1"
    )
    parser.add_argument("--n-ctx", type=int, default=1024, help="context per sequence")
    parser.add_argument("--n-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="sequences decoded at once (this server, llama-server)",
    )
    parser.add_argument(
        "--flash-attn",
        choices=("on", "off"),
        default="on",
        help="flash attention in the floor and every server (llama-cpp-python's takes on/off "
        "only, so auto is not offered; on is what auto resolves to on CPU and CUDA)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "bench")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds per start")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",")})
    args.servers = tuple(s.strip() for s in args.servers.split(",") if s.strip())
    unknown = set(args.servers) - set(ALL_SERVERS)
    if unknown:
        parser.error(f"unknown server(s) {', '.join(sorted(unknown))}")
    if args.reps < 1 or args.rounds < 1 or min(args.concurrency) < 1 or args.ttft_probes < 0:
        parser.error("--reps, --rounds and --concurrency must be at least 1, --ttft-probes 0")
    return args


# -- models -----------------------------------------------------------------------------------


def resolve_models(spec: str, cache_dir: Path) -> list[tuple[str, Path, dict[str, int] | None]]:
    """``(label, path, generator shape or None)`` for each entry of ``--models``."""
    out: list[tuple[str, Path, dict[str, int] | None]] = []
    for entry in (e.strip() for e in spec.split(",") if e.strip()):
        if entry in BUILT_MODELS:
            from bench.model import ensure_bench_model

            shape = BUILT_MODELS[entry]
            out.append((entry, ensure_bench_model(cache_dir, **shape), shape))
            continue
        path = Path(entry).expanduser()
        if not path.is_file():
            raise SystemExit(f"bench: --models entry {entry!r} is neither bench, tiny nor a file")
        out.append((path.stem, path, None))
    return out


# -- measuring --------------------------------------------------------------------------------


class Progress:
    """A tqdm bar over every request of the run (or nothing, with --no-progress)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm  # type: ignore[import-untyped]

            self._bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True)

    def phase(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description(text)

    def step(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _requests_per_server(args: argparse.Namespace) -> int:
    reps: int = args.reps
    rounds: int = args.rounds
    concurrency: list[int] = args.concurrency
    sweep = sum(c * rounds for c in concurrency if c > 1)
    probes: int = args.ttft_probes
    # warm-up, alternated floor/HTTP runs and first-token probes, the sweep
    return 1 + 2 * reps + 2 * probes + sweep


def _completion(prompt: str, max_tokens: int, *, stream: bool = True) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def _load(
    running: Running, request: bytes, concurrency: int, per_worker: int, bar: Progress
) -> client.Load:
    return asyncio.run(
        client.run_load(
            running.host,
            running.port,
            request,
            concurrency=concurrency,
            requests_per_worker=per_worker,
            on_done=lambda _: bar.step(),
        )
    )


def client_check(running: Running, prompt: str, runs: int = 5) -> dict[str, Any]:
    """This client's time to first byte against curl's, alternated, on a 1-token completion.

    The client's connection is open before its clock starts; curl's ``time_starttransfer``
    includes its connect, so ``time_starttransfer - time_pretransfer`` is the like figure.
    """
    curl = shutil.which("curl")
    if curl is None:
        return {"skipped": "curl is not on PATH"}
    body = _completion(prompt, 1, stream=False)
    request = client.post_request(running.host, running.port, "/v1/completions", body)
    url = f"http://{running.host}:{running.port}/v1/completions"
    ours: list[float] = []
    theirs: list[float] = []
    theirs_after_connect: list[float] = []
    with tempfile.NamedTemporaryFile("wb", suffix=".json") as payload:
        payload.write(request.split(b"\r\n\r\n", 1)[1])
        payload.flush()
        for _ in range(runs):
            load = asyncio.run(
                client.run_load(
                    running.host, running.port, request, concurrency=1, requests_per_worker=1
                )
            )
            exchange = load.exchanges[0]
            if exchange.first_byte is not None and exchange.status == 200:
                ours.append(exchange.first_byte - exchange.sent)
            write_out = "%{http_code} %{time_pretransfer} %{time_starttransfer}"
            done = subprocess.run(
                [curl, "-s", "-o", "/dev/null", "-w", write_out,
                 "-H", "Content-Type: application/json", "--data-binary", f"@{payload.name}",
                 url],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            code, pretransfer, starttransfer = [*done.stdout.split(), "", "", ""][:3]
            if code == "200":
                theirs.append(float(starttransfer))
                theirs_after_connect.append(float(starttransfer) - float(pretransfer))
    if not ours or not theirs:
        return {"skipped": "the check requests failed"}
    return {
        "server": running.name,
        "runs": runs,
        "client_ttfb_ms": round(statistics.median(ours) * 1000, 3),
        "curl_ttfb_ms": round(statistics.median(theirs) * 1000, 3),
        "curl_ttfb_after_connect_ms": round(statistics.median(theirs_after_connect) * 1000, 3),
        "client_samples_ms": [round(s * 1000, 3) for s in ours],
        "curl_samples_ms": [round(s * 1000, 3) for s in theirs],
    }


def measure_server(
    running: Running,
    floor: Floor,
    prompt: str,
    prompt_tokens: list[int],
    max_tokens: int,
    args: argparse.Namespace,
    bar: Progress,
) -> tuple[dict[str, Any], list[FloorRun]]:
    """Warm-up, alternated single streams against the floor, then the concurrency sweep."""
    host, port = running.host, running.port
    path = "/v1/completions"
    request = client.post_request(host, port, path, _completion(prompt, max_tokens))
    warm = client.post_request(host, port, path, _completion(prompt, WARM_UP_TOKENS))
    bar.phase(f"{running.name}: warm-up")
    _load(running, warm, args.parallel, 1, bar)

    bar.phase(f"{running.name}: 1 stream vs floor")
    floor_runs: list[FloorRun] = []
    singles: list[client.Exchange] = []
    for _ in range(args.reps):
        time.sleep(SETTLE_S)
        floor_runs.append(floor.run(prompt_tokens, max_tokens))
        bar.step()
        time.sleep(SETTLE_S)
        singles += _load(running, request, 1, 1, bar).exchanges
    streams = [client.read_stream(e) for e in singles]

    # The first token, timed apart: one long run per rep gives too few samples to see a few
    # ms through this host's noise, and 1-token requests are cheap. Without probes, the long
    # runs' own first tokens stand in.
    floor_ttft = [r.ttft for r in floor_runs]
    http_ttft: list[float] | None = None
    if args.ttft_probes:
        bar.phase(f"{running.name}: first token vs floor")
        probe = client.post_request(host, port, path, _completion(prompt, 1))
        floor_ttft, http_ttft = [], []
        for _ in range(args.ttft_probes):
            time.sleep(SETTLE_S)
            floor_ttft.append(floor.run(prompt_tokens, 1).ttft)
            bar.step()
            time.sleep(SETTLE_S)
            for exchange in _load(running, probe, 1, 1, bar).exchanges:
                if (ttft := client.read_stream(exchange).ttft) is not None:
                    http_ttft.append(ttft)
    overhead = report.overhead_figures(
        floor_ttft, [r.per_token for r in floor_runs], streams, http_ttft=http_ttft
    )

    levels = []
    if 1 in args.concurrency:
        window = sum((e.finished or e.sent) - e.sent for e in singles)
        alternated = client.Load(1, 0.0, window, singles)
        levels.append(report.level_figures(alternated, max_tokens, window_s=window))
    for concurrency in (c for c in args.concurrency if c > 1):
        bar.phase(f"{running.name}: {concurrency} streams")
        time.sleep(SETTLE_S)
        load = _load(running, request, concurrency, args.rounds, bar)
        levels.append(report.level_figures(load, max_tokens))
    return {"overhead": overhead, "levels": levels}, floor_runs


def measure_model(
    label: str,
    path: Path,
    shape: dict[str, int] | None,
    args: argparse.Namespace,
    bar: Progress,
    results: dict[str, Any],
) -> dict[str, Any]:
    max_tokens = args.max_tokens or DEFAULT_MAX_TOKENS.get(label, 128)
    settings = ServerSettings(
        model=path,
        n_ctx=args.n_ctx,
        n_threads=args.n_threads,
        n_batch=args.n_batch,
        parallel=args.parallel,
        flash_attn=args.flash_attn,
    )
    bar.phase(f"{label}: loading the floor")
    floor = Floor(
        path,
        n_ctx=args.n_ctx,
        n_threads=args.n_threads,
        n_batch=args.n_batch,
        flash_attn=args.flash_attn == "on",
    )
    try:
        prompt, prompt_count = floor.prompt(args.prompt_tokens)
        prompt_tokens = floor.tokenize(prompt)
        floor.run(prompt_tokens, WARM_UP_TOKENS)  # decodes the prompt once: it is warm
        entries: list[dict[str, Any]] = []
        all_floor: list[FloorRun] = []
        for server in servers(args.servers, settings, args.llama_server, ROOT):
            entries.append(
                _measure_one(server, settings, floor, prompt, prompt_tokens, max_tokens, args, bar,
                             results, label, all_floor)
            )  # fmt: skip
    finally:
        floor.close()
    return {
        "label": label,
        "file": path.name,
        "path": str(path),
        "size_bytes": path.stat().st_size,
        "generator_shape": shape,
        "prompt_tokens": prompt_count,
        "max_tokens": max_tokens,
        "floor": {
            "ttft_ms": _median_ms([r.ttft for r in all_floor]),
            "per_token_ms": _median_ms([r.per_token for r in all_floor]),
            "runs": len(all_floor),
        },
        "servers": entries,
    }


def _median_ms(values: list[float]) -> float | None:
    return round(statistics.median(values) * 1000, 4) if values else None


def _measure_one(
    server: Server,
    settings: ServerSettings,
    floor: Floor,
    prompt: str,
    prompt_tokens: list[int],
    max_tokens: int,
    args: argparse.Namespace,
    bar: Progress,
    results: dict[str, Any],
    label: str,
    all_floor: list[FloorRun],
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": server.name,
        "version": server.version,
        "command": shlex.join(server.command) if server.command else None,
    }
    if server.skipped:
        bar.step(_requests_per_server(args))
        return {**entry, "status": "skipped", "reason": server.skipped}
    log = args.out / "logs" / f"{label}-{server.name.replace(' ', '_')}.log"
    bar.phase(f"{server.name}: starting")
    try:
        with serve(server, settings, log, args.ready_timeout) as running:
            entry["ready_s"] = round(running.ready_s, 2)
            entry["load_average_1m"] = round(os.getloadavg()[0], 2)
            if "client_check" not in results:
                bar.phase("client check against curl")
                results["client_check"] = client_check(running, prompt)
            other = OtherLoad(running.process.pid)
            figures, floor_runs = measure_server(
                running, floor, prompt, prompt_tokens, max_tokens, args, bar
            )
            entry["other_processes_cpus"] = other.cores()
        all_floor += floor_runs
    except RuntimeError as exc:
        return {**entry, "status": "failed", "reason": str(exc)}
    return {**entry, "status": "ok", "peak_rss_bytes": running.peak_rss, **figures}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop_servers_on_sigterm()
    started = time.perf_counter()
    results: dict[str, Any] = {
        "schema": 1,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)]),
        "machine": facts.run_machine(ROOT),
        "versions": facts.versions(),
        "settings": {
            "n_ctx": args.n_ctx,
            "n_threads": args.n_threads,
            "n_batch": args.n_batch,
            "parallel": args.parallel,
            "flash_attn": args.flash_attn,
            "prompt_tokens_asked": args.prompt_tokens,
            "reps": args.reps,
            "ttft_probes": args.ttft_probes,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "servers": list(args.servers),
        },
        "models": [],
    }
    load_1m = results["machine"]["load_average"]["start"][0]
    if load_1m > 0.5 * (os.cpu_count() or 1):
        print(
            f"bench: the load average is {load_1m:.2f} on {os.cpu_count()} CPUs; other work "
            "on this host will show in the figures",
            file=sys.stderr,
        )
    models = resolve_models(args.models, args.cache_dir)
    per_server = _requests_per_server(args)
    bar = Progress(len(models) * len(args.servers) * per_server, not args.no_progress)
    try:
        for label, path, shape in models:
            results["models"].append(measure_model(label, path, shape, args, bar, results))
    finally:
        bar.close()
    results["machine"]["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    written = report.write_outputs(results, args.out)
    print(report.markdown(results))
    for path in written:
        print(f"wrote {path}")
    print(f"bench: done in {results['elapsed_s']:.0f} s")
    return 0
