"""``python -m bench.many_streams``: many concurrent streams on the fast model, every figure
also a ratio to the batched engine floor.

    python -m bench.many_streams [--streams 1,16,64] [--long 16x2048] [--parallel 64]
        [--variant "qwen3-moe-serve --kv-unified" ...] [--llama-server PATH]
        [--quick] [--out bench/results]

On the *tiny* bench model (``bench.run.BUILT_MODELS["tiny"]``, where serving costs more than
decoding), at every point (1, 16 and 64 streams with ~25-token prompts, and a long-context
point, 16 streams with 2048-token prompts, where the KV layout shows), in turn:

1. the batched engine floor (``bench.engine_floor``) for both KV layouts, unified and split:
   N sequences in one ``llama_decode`` per step, llama.cpp's sampling, no HTTP; and this
   server's own engine with no HTTP (``bench.engine_only``: the same N streams through its
   scheduler and hand-off, in this process), with its default KV layout;
2. the client ceiling: the same load against a trivial SSE endpoint (``bench.sse_stub``)
   that streams as fast as it can, so every server's figure can be read against what the
   client sustains;
3. each server variant, freshly started (``bench.servers``): this server with ``--parallel
   64 --n-ctx <per slot>``, ``llama-server -np 64 -c <64 x per slot>``, and the variants
   with flags of their own (``--kv-unified`` for each), each skipped with the
   reason when its server's ``--help`` lacks the flag.

Each of N clients sends ``--rounds`` requests back to back (the long point:
``--long-rounds``), each on a fresh connection with its own random printable-byte prompt (no
request reuses another's cache), greedy, 128 tokens out. Reported per server and point:
aggregate tokens/s over the window, time to first token and inter-token latency p50/p95,
errors, and the server process's CPU seconds per 1,000 streamed tokens (its own CPU time,
children included, over the window: ``bench.servers.process_cpu_seconds``), each with its
ratio to the floor of the server's KV layout at the same point. Both servers split the KV
cache by default (one stream per slot): this one unless ``--kv-unified``, ``llama-server``
when ``-np`` is given (its ``--kv-unified`` default is on only for an automatic slot count),
and its log says which it used. The floor prefills every
prompt before its first decode step, so a server that decodes running streams inside its
prefill batches can pass its aggregate tokens/s where prompts are long (a ratio above 1 there
is that overlap, not a faster engine).

Writes ``many_streams.json`` (every figure, the machine, the commit) and ``many_streams.md``,
and appends the report to ``many_streams_runs.md``, the record of every run.
``--quick`` (1 and 4 streams, 4 x 256 long, 16 tokens) checks the harness, not the servers.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import client, engine_floor, engine_only, facts, report
from bench.engine_floor import FloorSettings, KvLayout
from bench.model import ensure_bench_model, random_prompt
from bench.run import BUILT_MODELS, SETTLE_S
from bench.servers import (
    LLAMA_SERVER,
    OURS,
    OtherLoad,
    Server,
    ServerSettings,
    process_cpu_seconds,
    serve,
    server,
    stop_servers_on_sigterm,
)

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny"
DEFAULT_VARIANTS = (
    OURS,
    f"{OURS} --kv-unified",
    LLAMA_SERVER,
    f"{LLAMA_SERVER} --kv-unified",
)
DEFAULT_LAYOUT: dict[str, KvLayout] = {OURS: "split", LLAMA_SERVER: "split"}
"""Each server's KV layout without a flag: one stream per slot (app.engine.batched's default,
and llama-server's whenever ``-np`` is given)."""
LAYOUT_FLAGS: dict[str, KvLayout] = {
    "--kv-unified": "unified",
    "-kvu": "unified",
    "--no-kv-unified": "split",
    "-no-kvu": "split",
}
LAYOUTS: tuple[KvLayout, ...] = ("unified", "split")
WARM_UP_TOKENS = 8
CTX_STEP = 256
"""llama.cpp pads a context to 256 cells; the per-slot context is rounded up to it."""
STUB_LABEL = "client ceiling (SSE stub)"
ENGINE_LABEL = f"{OURS} engine, no HTTP"
HISTORY = "many_streams_runs.md"
"""Every run's report, appended, in the output folder."""


@dataclass(frozen=True)
class Point:
    streams: int
    prompt_tokens: int
    rounds: int

    def n_ctx(self, max_tokens: int) -> int:
        """Context per slot: the prompt and the completion, rounded up to ``CTX_STEP``."""
        return -(-(self.prompt_tokens + max_tokens) // CTX_STEP) * CTX_STEP

    def describe(self) -> str:
        return f"{self.streams} streams x {self.prompt_tokens}-token prompts"


@dataclass(frozen=True)
class Variant:
    name: str
    """``OURS`` or ``LLAMA_SERVER``."""
    extra_args: tuple[str, ...]

    @classmethod
    def parse(cls, spec: str) -> Variant:
        name, *extra = shlex.split(spec)
        # "qwen3-moe-serve" and "llama-server" are both single words, so the first word names
        # the server and the rest are its flags.
        if name not in (OURS, LLAMA_SERVER):
            raise ValueError(f"a variant starts with {OURS} or {LLAMA_SERVER}, not {name!r}")
        return cls(name, tuple(extra))

    def label(self, parallel: int) -> str:
        slots = f"--parallel {parallel}" if self.name == OURS else f"-np {parallel}"
        return " ".join([self.name, slots, *self.extra_args])

    def layout(self) -> KvLayout:
        chosen = [LAYOUT_FLAGS[a] for a in self.extra_args if a in LAYOUT_FLAGS]
        return chosen[-1] if chosen else DEFAULT_LAYOUT[self.name]


def logged_layout(log: str) -> KvLayout | None:
    """The layout a server's log reports (llama.cpp's ``kv_unified = true``), if any."""
    found = re.findall(r"kv_unified\s*=\s*'?(true|false)\b", log)
    if not found:
        return None
    return "unified" if found[-1] == "true" else "split"


def _vs(value: float | None, limit: float | None) -> float | None:
    """``value`` as a multiple of ``limit`` (both as reported), to 4 significant digits."""
    if value is None or limit is None or limit <= 0:
        return None
    return float(f"{value / limit:.4g}")


def _load_figures(load: client.Load, max_tokens: int) -> dict[str, Any]:
    """``bench.report.level_figures`` without the sample lists, with their extremes."""
    figures = report.level_figures(load, max_tokens)
    for key in ("ttft", "itl"):
        samples = figures.pop(f"{key}_samples_ms")
        figures[f"{key}_ms"] |= {
            "min": min(samples, default=None),
            "max": max(samples, default=None),
        }
    streams = [client.read_stream(e) for e in load.exchanges]
    figures["failed"] = sum(s.error is not None or len(s.token_times) < max_tokens for s in streams)
    return figures


def _run_load(
    running_host: str, port: int, point: Point, max_tokens: int, rng: random.Random
) -> tuple[client.Load, float]:
    """The point's load; returns it and this process's CPU seconds over it."""
    build = client.streamed_completions(
        running_host, port, lambda: random_prompt(rng, point.prompt_tokens), max_tokens
    )
    cpu_started = time.process_time()
    load = asyncio.run(
        client.run_load(
            running_host, port, build, concurrency=point.streams, requests_per_worker=point.rounds
        )
    )
    return load, time.process_time() - cpu_started


def measure_server(
    candidate: Server,
    settings: ServerSettings,
    point: Point,
    args: argparse.Namespace,
    rng: random.Random,
    log: Path,
) -> dict[str, Any]:
    """Start ``candidate``, warm it up, measure the point, stop it: one row."""
    row: dict[str, Any] = {"label": candidate.label, "name": candidate.name}
    try:
        with serve(candidate, settings, log, args.ready_timeout) as running:
            host, port = running.host, running.port
            warm = client.streamed_completions(
                host, port, lambda: random_prompt(rng, point.prompt_tokens), WARM_UP_TOKENS
            )
            asyncio.run(client.run_load(host, port, warm, concurrency=1, requests_per_worker=1))
            time.sleep(SETTLE_S)
            pid = running.process.pid
            other = OtherLoad(pid)
            cpu_before = process_cpu_seconds(pid)
            load, client_cpu = _run_load(host, port, point, args.max_tokens, rng)
            cpu_after = process_cpu_seconds(pid)
            row["other_processes_cpus"] = other.cores()
            row["ready_s"] = round(running.ready_s, 2)
    except RuntimeError as exc:
        return {**row, "status": "failed", "reason": str(exc)}
    figures = _load_figures(load, args.max_tokens)
    tokens = figures["tokens"]
    server_cpu = (
        cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
    )
    return {
        **row,
        "status": "ok",
        "peak_rss_bytes": running.peak_rss,
        **figures,
        "server_cpu_s": None if server_cpu is None else round(server_cpu, 4),
        "cpu_s_per_1k_tokens": (
            round(1000 * server_cpu / tokens, 4) if server_cpu is not None and tokens else None
        ),
        "client_cpu_s_per_1k_tokens": round(1000 * client_cpu / tokens, 4) if tokens else None,
    }


def measure_point(
    point: Point, variants: list[Variant], args: argparse.Namespace, model: Path, run: int
) -> dict[str, Any]:
    """The floors, the client ceiling and every server variant in turn, at one point."""
    n_ctx = point.n_ctx(args.max_tokens)
    rng = random.Random(f"{run} {point} {time.time()}")
    entry: dict[str, Any] = {
        "run": run,
        "streams": point.streams,
        "prompt_tokens": point.prompt_tokens,
        "rounds": point.rounds,
        "max_tokens": args.max_tokens,
        "n_ctx_per_slot": n_ctx,
        "floors": {},
    }
    for layout in LAYOUTS:
        _progress(f"{point.describe()}: engine floor, {layout} KV")
        floor_settings = FloorSettings(
            model=model,
            parallel=args.parallel,
            n_ctx=n_ctx,
            n_threads=args.n_threads,
            n_batch=args.n_batch,
            flash_attn=args.flash_attn,
            layout=layout,
        )
        time.sleep(SETTLE_S)
        other = OtherLoad(os.getpid())
        floor = engine_floor.measure(
            floor_settings,
            sequences=point.streams,
            prompt_tokens=point.prompt_tokens,
            max_tokens=args.max_tokens,
            rounds=point.rounds,
            seed=rng.getrandbits(32),
        )
        entry["floors"][layout] = {**floor, "other_processes_cpus": other.cores()}
    layout = DEFAULT_LAYOUT[OURS]
    _progress(f"{point.describe()}: {ENGINE_LABEL}, {layout} KV")
    time.sleep(SETTLE_S)
    engine = engine_only.measure(
        replace(floor_settings, layout=layout),
        sequences=point.streams,
        prompt_tokens=point.prompt_tokens,
        max_tokens=args.max_tokens,
        rounds=point.rounds,
        seed=rng.getrandbits(32),
    )
    engine["vs_floor"] = _vs_floor(engine, entry["floors"][layout])
    entry["engine"] = engine
    settings = ServerSettings(
        model=model,
        n_ctx=n_ctx,
        n_threads=args.n_threads,
        n_batch=args.n_batch,
        parallel=args.parallel,
        flash_attn=args.flash_attn,
    )
    logs = args.cache_dir / "logs"
    _progress(f"{point.describe()}: {STUB_LABEL}")
    stub_command = [sys.executable, "-m", "bench.sse_stub", "--host", settings.host]
    stub = Server("sse stub", stub_command, label=STUB_LABEL)
    time.sleep(SETTLE_S)
    ceiling = measure_server(stub, settings, point, args, rng, logs / "many-streams-sse-stub.log")
    ceiling.pop("cpu_s_per_1k_tokens", None)  # the stub's own CPU is not the figure here
    ceiling.pop("server_cpu_s", None)
    entry["client_ceiling"] = ceiling
    rows = []
    for variant in variants:
        label = variant.label(args.parallel)
        candidate = server(
            variant.name,
            settings,
            args.llama_server,
            ROOT,
            extra_args=variant.extra_args,
            label=label,
        )
        if candidate.skipped:  # found before the run, gone since
            rows.append({"label": label, "status": "failed", "reason": candidate.skipped})
            continue
        _progress(f"{point.describe()}: {label}")
        log = logs / f"many-streams-{candidate.label.replace(' ', '_')}.log"
        time.sleep(SETTLE_S)
        row = measure_server(candidate, settings, point, args, rng, log)
        row["command"] = shlex.join(candidate.command)
        declared = variant.layout()
        logged = logged_layout(log.read_text(errors="replace")) if log.is_file() else None
        row["kv_layout_declared"] = declared
        row["kv_layout_logged"] = logged
        row["kv_layout"] = layout = logged or declared
        if row["status"] == "ok":
            row["vs_floor"] = _vs_floor(row, entry["floors"][layout])
            if ceiling["status"] == "ok":
                row["vs_client_ceiling"] = _vs(row["tokens_per_s"], ceiling["tokens_per_s"])
        rows.append(row)
    entry["servers"] = rows
    return entry


def _vs_floor(figures: dict[str, Any], floor: dict[str, Any]) -> dict[str, float | None]:
    """Each figure over the floor's: tokens/s, TTFT and ITL p50/p95, CPU per 1k tokens."""
    return {
        "tokens_per_s": _vs(figures["tokens_per_s"], floor["tokens_per_s"]),
        "ttft_p50": _vs(figures["ttft_ms"]["p50"], floor["ttft_ms"]["p50"]),
        "ttft_p95": _vs(figures["ttft_ms"]["p95"], floor["ttft_ms"]["p95"]),
        "itl_p50": _vs(figures["itl_ms"]["p50"], floor["itl_ms"]["p50"]),
        "itl_p95": _vs(figures["itl_ms"]["p95"], floor["itl_ms"]["p95"]),
        "cpu_s_per_1k_tokens": _vs(figures["cpu_s_per_1k_tokens"], floor["cpu_s_per_1k_tokens"]),
    }


def _progress(text: str) -> None:
    print(f"many_streams: {text}", file=sys.stderr, flush=True)


# -- Markdown ---------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _x(ratio: float | None) -> str:
    return "" if ratio is None else f" ({ratio:.2f}x)"


def _pair(figures: dict[str, float | None], digits: int) -> str:
    return f"{_f(figures['p50'], digits)} / {_f(figures['p95'], digits)}"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def _figures_row(label: str, f: dict[str, Any], errors: str, rss: int | None) -> str:
    """A row of measured figures, each with its ratio to the floor of its KV layout."""
    vs = f["vs_floor"]
    return (
        f"| {label} | {f.get('kv_layout') or f['layout']} "
        f"| {_f(f['tokens_per_s'])}{_x(vs['tokens_per_s'])} "
        f"| {_f(f['ttft_ms']['p50'])}{_x(vs['ttft_p50'])} / {_f(f['ttft_ms']['p95'])} "
        f"| {_f(f['itl_ms']['p50'], 2)}{_x(vs['itl_p50'])} / "
        f"{_f(f['itl_ms']['p95'], 2)}{_x(vs['itl_p95'])} "
        f"| {_f(f['cpu_s_per_1k_tokens'], 3)}{_x(vs['cpu_s_per_1k_tokens'])} "
        f"| {errors} | {'-' if rss is None else _mib(rss)} "
        f"| {_f(f['other_processes_cpus'], 2)} |"
    )


def _point_table(entry: dict[str, Any]) -> list[str]:
    lines = [
        "| | KV | tokens/s | TTFT p50 / p95 (ms) | ITL p50 / p95 (ms) | CPU s per 1k tokens "
        "| errors | peak RSS (MiB) | other CPUs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for layout, floor in entry["floors"].items():
        lines.append(
            f"| engine floor | {layout} | {_f(floor['tokens_per_s'])} "
            f"| {_pair(floor['ttft_ms'], 1)} | {_pair(floor['itl_ms'], 2)} "
            f"| {_f(floor['cpu_s_per_1k_tokens'], 3)} | - | - "
            f"| {_f(floor['other_processes_cpus'], 2)} |"
        )
    engine = entry.get("engine")  # absent from runs recorded before bench.engine_only
    if engine is not None:
        lines.append(_figures_row(ENGINE_LABEL, engine, "-", None))
    ceiling = entry["client_ceiling"]
    if ceiling["status"] == "ok":
        lines.append(
            f"| {STUB_LABEL} | - | {_f(ceiling['tokens_per_s'])} events/s "
            f"| {_pair(ceiling['ttft_ms'], 1)} | {_pair(ceiling['itl_ms'], 2)} "
            f"| client {_f(ceiling['client_cpu_s_per_1k_tokens'], 3)} "
            f"| {ceiling['failed']}/{ceiling['requests']} | - "
            f"| {_f(ceiling['other_processes_cpus'], 2)} |"
        )
    for row in entry["servers"]:
        if row["status"] != "ok":
            continue
        errors = f"{row['failed']}/{row['requests']}"
        lines.append(_figures_row(row["label"], row, errors, row["peak_rss_bytes"]))
    failed = [f"- {r['label']}: {r['reason']}" for r in entry["servers"] if r["status"] != "ok"]
    if ceiling["status"] != "ok":
        failed.append(f"- {STUB_LABEL}: {ceiling['reason']}")
    if failed:
        lines += ["", "Failed at this point:", "", *failed]
    return lines


def _head_to_head(results: dict[str, Any]) -> list[str]:
    """This server against ``llama-server``, both with their default flags, point by point."""
    ours = Variant(OURS, ()).label(results["settings"]["parallel"])
    theirs = Variant(LLAMA_SERVER, ()).label(results["settings"]["parallel"])
    lines = [
        f"`{ours}` against `{theirs}` (each with its default KV layout), the figures of the "
        "tables below and their ratio, ours over llama-server's:",
        "",
        "| streams x prompt | run | tokens/s | ITL p95 (ms) | CPU s per 1k tokens | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for entry in results["runs"]:
        rows = {r["label"]: r for r in entry["servers"] if r["status"] == "ok"}
        if ours not in rows or theirs not in rows:
            continue
        a, b = rows[ours], rows[theirs]

        def cell(x: float | None, y: float | None, digits: int) -> str:
            ratio = _vs(x, y)
            return f"{_f(x, digits)} / {_f(y, digits)} = {_f(ratio, 2)}x"

        lines.append(
            f"| {entry['streams']} x {entry['prompt_tokens']} | {entry['run'] + 1} "
            f"| {cell(a['tokens_per_s'], b['tokens_per_s'], 1)} "
            f"| {cell(a['itl_ms']['p95'], b['itl_ms']['p95'], 2)} "
            f"| {cell(a['cpu_s_per_1k_tokens'], b['cpu_s_per_1k_tokens'], 3)} "
            f"| {a['failed']}/{a['requests']}, {b['failed']}/{b['requests']} |"
        )
    return lines if len(lines) > 4 else []


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    model = results["model"]
    binary = results.get("llama_server")
    lines = [
        *report.head_lines(
            "Many streams on the tiny model",
            results,
            also=f"; llama-server {binary}" if binary else "",
        ),
        "",
        f"Model `{model['file']}` ({model['size_bytes'] / 1e6:.1f} MB, {MODEL}). Every server "
        f"has {s['parallel']} slots, {s['n_threads']} threads, batch {s['n_batch']}, flash "
        f"attention {s['flash_attn']}; each of N clients sends its requests back to back, each "
        "on a fresh connection with its own random printable-byte prompt, greedy, "
        f"{s['max_tokens']} tokens out. The servers take turns at every point, each freshly "
        "started.",
        "",
        "tokens/s: completion tokens of all streams over the whole window. TTFT: request sent "
        "to first token; ITL: gaps between a stream's token events (p50/p95 interpolated, "
        "bench.report.percentile). CPU s per 1k tokens: the server process's own CPU time "
        "(all threads, children included) over the window, per 1,000 streamed tokens. "
        "(rx): the figure over the batched engine floor of the server's KV layout at the same "
        "point (N sequences in one llama_decode per step, llama.cpp's greedy sampling, no "
        "HTTP: bench.engine_floor; its ITL is its step time, its CPU this process's). "
        f"{ENGINE_LABEL}: this server's batching engine in this process, the same streams "
        "as the floor's rounds with an on_token that only notes the time (bench.engine_only); "
        "a server row over it is what HTTP, JSON and SSE cost beside the engine. The "
        "client ceiling is this client against a trivial SSE endpoint streaming as fast as it "
        "can (bench.sse_stub), the same load: the most this client reads. Other CPUs: how "
        "many CPUs other processes on the host kept busy meanwhile (noise to read beside "
        "every figure).",
    ]
    head_to_head = _head_to_head(results)
    if head_to_head:
        lines += ["", *head_to_head]
    for entry in results["runs"]:
        run = f", run {entry['run'] + 1} of {s['repeat']}" if s["repeat"] > 1 else ""
        lines += [
            "",
            f"## {entry['streams']} streams x {entry['prompt_tokens']}-token prompts, "
            f"{entry['rounds']} request(s) each (context {entry['n_ctx_per_slot']} per "
            f"slot{run})",
            "",
            *_point_table(entry),
        ]
    skipped = [f"- {v['label']}: {v['reason']}" for v in results["variants"] if v["skipped"]]
    if skipped:
        lines += ["", "Not measured:", "", *skipped]
    return "\n".join(lines) + "\n"


# -- the command ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.many_streams", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--streams", help="concurrent streams per point (default 1,16,64)")
    parser.add_argument(
        "--long",
        help="the long-context point, STREAMSxPROMPT_TOKENS, or 'none' (default 16x2048)",
    )
    parser.add_argument("--prompt-tokens", type=int, default=25)
    parser.add_argument("--max-tokens", type=int, help="tokens per request (default 128)")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client")
    parser.add_argument(
        "--long-rounds",
        type=int,
        default=1,
        help="requests per client at the long point (default 1: its prefill dominates the "
        "time, and every stream starting at once is its worst case)",
    )
    parser.add_argument("--parallel", type=int, default=64, help="slots of every server")
    parser.add_argument(
        "--variant",
        action="append",
        help='a server and flags of its own, e.g. "qwen3-moe-serve --kv-unified" '
        f"(repeatable; default: {'; '.join(DEFAULT_VARIANTS)})",
    )
    parser.add_argument(
        "--llama-server",
        type=Path,
        help="llama-server binary (else $LLAMA_SERVER, PATH, .cache/llama-server/**/bin)",
    )
    parser.add_argument("--n-threads", type=int, default=2, help="CPU threads of every engine")
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument("--flash-attn", choices=("auto", "on", "off"), default="on")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every point, in turn")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="check the harness: 1 and 4 streams, long point 4x256, 16 tokens",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "bench")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds per start")
    args = parser.parse_args(argv)
    streams = args.streams or ("1,4" if args.quick else "1,16,64")
    long = args.long or ("4x256" if args.quick else "16x2048")
    args.max_tokens = args.max_tokens or (16 if args.quick else 128)
    args.points = [Point(int(n), args.prompt_tokens, args.rounds) for n in streams.split(",")]
    if long != "none":
        n, _, prompt = long.partition("x")
        args.points.append(Point(int(n), int(prompt), args.long_rounds))
    try:
        args.variants = [Variant.parse(v) for v in args.variant or DEFAULT_VARIANTS]
    except ValueError as exc:
        parser.error(str(exc))
    if any(p.streams > args.parallel for p in args.points):
        parser.error("a point has more streams than --parallel slots")
    if min(args.rounds, args.long_rounds, args.repeat, args.max_tokens) < 1:
        parser.error("--rounds, --long-rounds, --repeat and --max-tokens must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop_servers_on_sigterm()
    started = time.perf_counter()
    model = ensure_bench_model(args.cache_dir, **BUILT_MODELS[MODEL])
    probe = ServerSettings(
        model=model,
        n_ctx=CTX_STEP,
        n_threads=args.n_threads,
        n_batch=args.n_batch,
        parallel=args.parallel,
        flash_attn=args.flash_attn,
    )
    variants: list[Variant] = []
    versions: dict[str, str | None] = {}
    described = []
    for variant in args.variants:
        found = server(
            variant.name,
            probe,
            args.llama_server,
            ROOT,
            extra_args=variant.extra_args,
            label=variant.label(args.parallel),
        )
        described.append(
            {
                "label": found.label,
                "name": variant.name,
                "extra_args": list(variant.extra_args),
                "kv_layout": variant.layout(),
                "version": found.version,
                "skipped": found.skipped is not None,
                "reason": found.skipped,
            }
        )
        if found.skipped is None:
            variants.append(variant)
            versions[variant.name] = found.version
        else:
            _progress(f"{found.label}: skipped ({found.skipped})")
    results: dict[str, Any] = {
        "schema": 1,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(
            ["python", "-m", "bench.many_streams", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": facts.run_machine(ROOT),
        "versions": facts.versions(),
        "llama_server": versions.get(LLAMA_SERVER),
        "model": {
            "label": MODEL,
            "file": model.name,
            "size_bytes": model.stat().st_size,
            "generator_shape": BUILT_MODELS[MODEL],
        },
        "settings": {
            "parallel": args.parallel,
            "n_threads": args.n_threads,
            "n_batch": args.n_batch,
            "flash_attn": args.flash_attn,
            "max_tokens": args.max_tokens,
            "repeat": args.repeat,
            "quick": args.quick,
            "points": [vars(p) for p in args.points],
        },
        "variants": described,
        "runs": [],
    }
    for run in range(args.repeat):
        for point in args.points:
            results["runs"].append(measure_point(point, variants, args, model, run))
    results["machine"]["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    text = markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "many_streams.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "many_streams.md").write_text(text)
    # Every run is kept, the ones that miss included: the latest is many_streams.md, and each
    # is appended to the record of all of them.
    with open(args.out / HISTORY, "a", encoding="utf-8") as history:
        history.write(("\n---\n\n" if history.tell() else "") + text)
    print(text)
    print(f"wrote {args.out / 'many_streams.json'}, many_streams.md; appended to {HISTORY}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
