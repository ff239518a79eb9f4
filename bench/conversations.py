"""``python -m bench.conversations``: more agent conversations than slots, their turns
interleaved, on this server and llama-server with their defaults, servers taking turns.

    python -m bench.conversations [--points 8x4,16x3,32x3] [--parallel 4] [--model tiny]
        [--system-tokens 2500] [--distinct-systems] [--user-words 40] [--max-tokens 32]
        [--concurrency 4]
        [--variant "qwen3-moe-serve --cache-ram 0" ...] [--llama-server PATH] [--repeat 1]
        [--long 8192,32768] [--restart 8x4] [--out bench/results]

The load is what a team of coding agents sends (issue 22): every conversation opens with the
same long system prompt (an agent's instructions and tools; ``--distinct-systems``: one of its
own each, agents of different kinds), then its own task; every turn
resends the whole conversation (the answers so far included, as a chat client sends them)
plus a new user message, and asks for ``--max-tokens`` greedy tokens, streamed. ``C x T``
is C conversations of T turns: turn t of every conversation before turn t+1 of any, in
conversation order, ``--concurrency`` requests in flight, so a conversation comes back to a
server whose slots other conversations have used since. Each point starts every server
afresh.

Reported per server and point, over turns 2 and later (a first turn has nothing of its own
to find): the share of prompt tokens served from cache (``usage.prompt_tokens_details.
cached_tokens``, else ``timings.cache_n``), the prompt tokens decoded per turn, time to first
token and turn latency p50/p95; turn 1 apart. ``--long`` adds a cold single-prompt point at
each length (8 tokens answered): the cost of a miss, one prompt decoded whole.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import shlex
import string
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import facts, report
from bench.model import ensure_bench_model
from bench.run import BUILT_MODELS
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
DEFAULT_VARIANTS = (OURS, LLAMA_SERVER)
N_CTX = 33792
"""Context per slot: the longest conversation of a point, and the long point, fit in it."""
READY_TIMEOUT_S = 120.0
BATCH_FLAGS = {OURS: ("--n-batch",), LLAMA_SERVER: ("--batch-size", "--ubatch-size")}
"""The prefill flags ``bench.servers`` sets: left out here, so each server runs its defaults."""


@dataclass(frozen=True)
class Point:
    conversations: int
    turns: int

    @classmethod
    def parse(cls, text: str) -> Point:
        conversations, _, turns = text.partition("x")
        return cls(int(conversations), int(turns))

    @property
    def label(self) -> str:
        return f"{self.conversations}x{self.turns}"


@dataclass(frozen=True)
class Variant:
    name: str
    extra_args: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Variant:
        words = shlex.split(text)
        for name in (OURS, LLAMA_SERVER):
            head = shlex.split(name)
            if words[: len(head)] == head:
                return cls(name, tuple(words[len(head) :]))
        raise argparse.ArgumentTypeError(f"a variant starts with {OURS!r} or {LLAMA_SERVER!r}")

    @property
    def label(self) -> str:
        return " ".join([self.name, *self.extra_args])


@dataclass
class Turn:
    conversation: int
    turn: int
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float = 0.0
    error: str | None = None


@dataclass
class Conversation:
    messages: list[dict[str, str]] = field(default_factory=list)


def words(rng: random.Random, n: int) -> str:
    return " ".join(
        "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8)))
        for _ in range(n)
    )


def system_prompt(rng: random.Random, n_tokens: int) -> str:
    """Random words of about ``n_tokens`` tokens on the bench vocabulary (few merges: about a
    token a character)."""
    return words(rng, max(n_tokens // 6, 1))


def _cached(usage: dict[str, Any] | None, timings: dict[str, Any] | None) -> int:
    details = (usage or {}).get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is not None:
        return int(details["cached_tokens"])
    return int((timings or {}).get("cache_n") or 0)


async def one_turn(
    http: httpx.AsyncClient, messages: list[dict[str, str]], max_tokens: int, turn: Turn
) -> str:
    """Stream one chat turn; fill ``turn``'s figures and return the answer's text."""
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    text: list[str] = []
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            turn.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            return ""
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                turn.error = str(chunk["error"])[:200]
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                piece = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
                if piece and turn.ttft_s is None:
                    turn.ttft_s = time.perf_counter() - started
                text.append(delta.get("content") or "")
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or timings
    turn.latency_s = time.perf_counter() - started
    turn.prompt_tokens = int((usage or {}).get("prompt_tokens") or 0)
    turn.cached_tokens = _cached(usage, timings)
    return "".join(text)


@dataclass
class Team:
    """The conversations of a point, and every user turn they will send (drawn up front, so a
    run in parts sends what a run in one go would)."""

    conversations: list[Conversation]
    user_turns: dict[tuple[int, int], str]
    turns: int


def team(point: Point, args: argparse.Namespace, seed: int) -> Team:
    rng = random.Random(seed)
    shared = system_prompt(rng, args.system_tokens)
    conversations = []
    for _ in range(point.conversations):
        system = system_prompt(rng, args.system_tokens) if args.distinct_systems else shared
        conversations.append(Conversation([{"role": "system", "content": system}]))
    order = [(t, c) for t in range(point.turns) for c in range(point.conversations)]
    return Team(conversations, {key: words(rng, args.user_words) for key in order}, point.turns)


async def run_turns(
    base_url: str, team: Team, args: argparse.Namespace, turns: range | None = None
) -> list[Turn]:
    """Turns ``turns`` (0-based; all by default) of every conversation of ``team``."""
    wanted = turns if turns is not None else range(team.turns)
    count = len(team.conversations)
    done: list[Turn] = []
    queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    for key in [(t, c) for t in wanted for c in range(count)]:
        queue.put_nowait(key)
    ready = {c: asyncio.Event() for c in range(count)}
    for event in ready.values():
        event.set()

    async def worker(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            t, c = queue.get_nowait()
            await ready[c].wait()  # its previous turn has been answered
            ready[c].clear()
            conversation = team.conversations[c]
            conversation.messages.append({"role": "user", "content": team.user_turns[(t, c)]})
            turn = Turn(c, t + 1)
            answer = await one_turn(http, conversation.messages, args.max_tokens, turn)
            conversation.messages.append({"role": "assistant", "content": answer})
            done.append(turn)
            ready[c].set()

    # A fresh connection per turn: llama-server closes a kept-alive connection after a few
    # requests, and a turn sent on one it has just closed would fail.
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=0)
    timeout = httpx.Timeout(600.0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as http:
        await asyncio.gather(*(worker(http) for _ in range(args.concurrency)))
    return done


async def run_point(base_url: str, point: Point, args: argparse.Namespace, seed: int) -> list[Turn]:
    return await run_turns(base_url, team(point, args, seed), args)


async def run_long(base_url: str, n_tokens: int, seed: int) -> Turn:
    """One cold prompt of about ``n_tokens`` tokens, 8 tokens answered."""
    rng = random.Random(seed)
    turn = Turn(0, 1)
    messages = [{"role": "user", "content": system_prompt(rng, n_tokens)}]
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(1200.0)) as http:
        await one_turn(http, messages, 8, turn)
    return turn


def figures(turns: Sequence[Turn]) -> dict[str, Any]:
    ok = [t for t in turns if t.error is None]
    later = [t for t in ok if t.turn >= 2]
    first = [t for t in ok if t.turn == 1]

    def ms(values: Sequence[float], q: float) -> float | None:
        found = report.percentile(values, q / 100)
        return None if found is None else round(found * 1000, 1)

    def block(group: Sequence[Turn]) -> dict[str, Any]:
        prompt = sum(t.prompt_tokens for t in group)
        cached = sum(t.cached_tokens for t in group)
        ttfts = [t.ttft_s for t in group if t.ttft_s is not None]
        latencies = [t.latency_s for t in group]
        return {
            "turns": len(group),
            "prompt_tokens": prompt,
            "cached_tokens": cached,
            "cached_share": round(cached / prompt, 4) if prompt else None,
            "decoded_per_turn": round((prompt - cached) / len(group), 1) if group else None,
            "ttft_ms": {"p50": ms(ttfts, 50), "p95": ms(ttfts, 95)},
            "latency_ms": {"p50": ms(latencies, 50), "p95": ms(latencies, 95)},
        }

    return {
        "later_turns": block(later),
        "first_turns": block(first),
        "errors": [t.error for t in turns if t.error is not None][:5],
        "error_count": sum(t.error is not None for t in turns),
    }


def _without(command: list[str], flags: Sequence[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for part in command:
        if skip:
            skip = False
            continue
        if part in flags:
            skip = True
            continue
        out.append(part)
    return out


def prepare(variant: Variant, settings: ServerSettings, llama_server: Path | None) -> Server:
    found = server(
        variant.name,
        settings,
        llama_server,
        ROOT,
        extra_args=variant.extra_args,
        label=variant.label,
    )
    if found.skipped is None:
        # Each server's own prefill defaults, unless the variant sets them.
        flags = [f for f in BATCH_FLAGS[variant.name] if f not in variant.extra_args]
        found.command = _without(found.command, flags)
    return found


def server_settings(args: argparse.Namespace, model: Path) -> ServerSettings:
    """What every server is started with (``n_batch`` is left out of the commands: each
    server runs its own prefill defaults)."""
    return ServerSettings(
        model=model,
        n_ctx=N_CTX,
        n_threads=args.n_threads,
        n_batch=512,
        parallel=args.parallel,
        flash_attn="auto",
    )


def measure(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    settings = server_settings(args, model)
    servers = [prepare(v, settings, args.llama_server) for v in args.variants]
    rows: list[dict[str, Any]] = []
    logs = args.out / "logs"
    for repeat in range(args.repeat):
        for point in args.points:
            for found in servers:
                if found.skipped:
                    continue
                _progress(f"{point.label} on {found.label} (run {repeat + 1})")
                log = logs / f"conversations-{point.label}-{found.label.replace(' ', '_')}.log"
                with serve(found, settings, log, READY_TIMEOUT_S) as running:
                    url = f"http://{running.host}:{running.port}"
                    turns = asyncio.run(run_point(url, point, args, seed=1000 + repeat))
                row = {"point": point.label, "server": found.label, "run": repeat + 1}
                rows.append(row | figures(turns))
                later = rows[-1]["later_turns"]
                _progress(
                    f"  cached {_pct(later['cached_share'])}, turn p50/p95 "
                    f"{_n(later['latency_ms']['p50'])}/{_n(later['latency_ms']['p95'])} ms"
                )
        for n_tokens in args.long:
            for found in servers:
                if found.skipped:
                    continue
                _progress(f"long {n_tokens} on {found.label} (run {repeat + 1})")
                log = logs / f"conversations-long{n_tokens}-{found.label.replace(' ', '_')}.log"
                with serve(found, settings, log, READY_TIMEOUT_S) as running:
                    url = f"http://{running.host}:{running.port}"
                    turn = asyncio.run(run_long(url, n_tokens, seed=2000 + repeat))
                rows.append(
                    {
                        "point": f"long {n_tokens}",
                        "server": found.label,
                        "run": repeat + 1,
                        "prompt_tokens": turn.prompt_tokens,
                        "latency_ms": round(turn.latency_s * 1000, 1),
                        "ttft_ms": None if turn.ttft_s is None else round(turn.ttft_s * 1000, 1),
                        "error": turn.error,
                    }
                )
                _progress(f"  {turn.prompt_tokens} tokens, {turn.latency_s:.2f} s")
    return {
        "servers": [
            {"label": s.label, "version": s.version, "skipped": s.skipped, "command": s.command}
            for s in servers
        ],
        "rows": rows,
    }


def measure_restart(args: argparse.Namespace, model: Path) -> list[dict[str, Any]]:
    """``--restart CxT``: the first half of the turns, a restart (SIGTERM, then a fresh
    start), the second half; this server without and with ``--prompt-cache-dir``."""
    point = args.restart
    settings = server_settings(args, model)
    store = args.out / "logs" / "prompt-cache"
    variants = [Variant(OURS), Variant(OURS, ("--prompt-cache-dir", str(store)))]
    before = range(point.turns // 2)
    after = range(point.turns // 2, point.turns)
    rows = []
    for variant in variants:
        found = prepare(variant, settings, None)
        label = variant.label.replace(str(store), "DIR")
        found.command[found.command.index("--log-level") + 1] = "info"  # the store's timings
        for stale in store.glob("*"):
            stale.unlink()
        people = team(point, args, seed=3000)
        log = args.out / "logs" / f"conversations-restart-{label.replace(' ', '_')}.log"
        _progress(f"restart {point.label} on {label}")
        with serve(found, settings, log, READY_TIMEOUT_S) as running:
            url = f"http://{running.host}:{running.port}"
            asyncio.run(run_turns(url, people, args, before))
            stopping = time.perf_counter()
        stop_s = time.perf_counter() - stopping
        with serve(found, settings, log.with_suffix(".after.log"), READY_TIMEOUT_S) as running:
            url = f"http://{running.host}:{running.port}"
            turns = asyncio.run(run_turns(url, people, args, after))
            ready_s = running.ready_s
        rows.append(
            {
                "point": f"restart {point.label}",
                "server": label,
                "stop_s": round(stop_s, 2),
                "ready_s": round(ready_s, 2),
                "after_restart": figures(turns)["later_turns"],
                "error_count": sum(t.error is not None for t in turns),
            }
        )
        _progress(f"  cached {_pct(rows[-1]['after_restart']['cached_share'])} after the restart")
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _n(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def markdown(results: dict[str, Any]) -> str:
    lines = report.head_lines("Many conversations on few slots", results)
    settings = results["settings"]
    lines += [
        "",
        f"{settings['parallel']} slots; every conversation: "
        f"{'its own' if settings['distinct_systems'] else 'a shared'} "
        f"~{settings['system_tokens']}-token system prompt, "
        f"{settings['user_words']}-word user turns, "
        f"{settings['max_tokens']} greedy tokens answered, streamed; {settings['concurrency']} "
        f"requests in flight; model `{results['model']['file']}` ({results['model']['label']}). "
        "Each server with its own defaults (prefill batch, prompt cache) unless the row says.",
    ]
    point_rows = [row for row in results["rows"] if not row["point"].startswith("long")]
    if point_rows:
        lines += [
            "",
            "| point | run | server | cached share, turns ≥ 2 | decoded / turn "
            "| TTFT p50 / p95 ms | turn p50 / p95 ms | turn 1: decoded / turn, turn p50 ms "
            "| errors |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
    for row in point_rows:
        later, first = row["later_turns"], row["first_turns"]
        lines.append(
            f"| {row['point']} | {row['run']} | {row['server']} | {_pct(later['cached_share'])} "
            f"| {_n(later['decoded_per_turn'])} "
            f"| {_n(later['ttft_ms']['p50'])} / {_n(later['ttft_ms']['p95'])} "
            f"| {_n(later['latency_ms']['p50'])} / {_n(later['latency_ms']['p95'])} "
            f"| {_n(first['decoded_per_turn'])}, {_n(first['latency_ms']['p50'])} "
            f"| {row['error_count']} |"
        )
    long_rows = [row for row in results["rows"] if row["point"].startswith("long")]
    if long_rows:
        lines += [
            "",
            "A miss: one cold prompt decoded whole, 8 tokens answered.",
            "",
            "| prompt | run | server | prompt tokens | time to first token ms | total ms |",
            "|---|---:|---|---:|---:|---:|",
        ]
        for row in long_rows:
            lines.append(
                f"| {row['point']} | {row['run']} | {row['server']} | {row['prompt_tokens']} "
                f"| {_n(row['ttft_ms'])} | {_n(row['latency_ms'])} |"
                + (f" error: {row['error']}" if row["error"] else "")
            )
    restart_rows = results.get("restart") or []
    if restart_rows:
        lines += [
            "",
            "A restart between the halves of every conversation (SIGTERM, then a fresh start): "
            "the turns after it.",
            "",
            "| point | server | cached share after | decoded / turn | TTFT p50 / p95 ms "
            "| turn p50 / p95 ms | stop s | start s | errors |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in restart_rows:
            after = row["after_restart"]
            lines.append(
                f"| {row['point']} | {row['server']} | {_pct(after['cached_share'])} "
                f"| {_n(after['decoded_per_turn'])} "
                f"| {_n(after['ttft_ms']['p50'])} / {_n(after['ttft_ms']['p95'])} "
                f"| {_n(after['latency_ms']['p50'])} / {_n(after['latency_ms']['p95'])} "
                f"| {row['stop_s']} | {row['ready_s']} | {row['error_count']} |"
            )
    skipped = [s for s in results["servers"] if s["skipped"]]
    for s in skipped:
        lines += ["", f"Skipped {s['label']}: {s['skipped']}."]
    return "\n".join(lines) + "\n"


def _progress(message: str) -> None:
    print(f"[bench.conversations] {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.conversations", description=__doc__)
    parser.add_argument(
        "--points", type=lambda s: [Point.parse(p) for p in s.split(",") if p],
        default=[Point(8, 4), Point(16, 3), Point(32, 3)],
    )  # fmt: skip
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--model", choices=sorted(BUILT_MODELS), default="tiny")
    parser.add_argument("--system-tokens", type=int, default=2500)
    parser.add_argument(
        "--distinct-systems", action="store_true",
        help="every conversation its own system prompt (agents of different kinds), instead "
        "of one shared by all (a team of one agent)",
    )  # fmt: skip
    parser.add_argument("--user-words", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--n-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--long", type=lambda s: [int(n) for n in s.split(",") if n], default=[],
        help="cold single prompts of these lengths (e.g. 8192,32768)",
    )  # fmt: skip
    parser.add_argument("--variant", dest="variants", type=Variant.parse, action="append")
    parser.add_argument(
        "--restart", type=Point.parse, default=None,
        help="also CxT with a restart halfway, this server without and with --prompt-cache-dir",
    )  # fmt: skip
    parser.add_argument("--llama-server", type=Path)
    parser.add_argument(
        "--name", default=None,
        help="the results' file name (default conversations, or conversations_distinct)",
    )  # fmt: skip
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "bench-models")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    args.variants = args.variants or [Variant(name) for name in DEFAULT_VARIANTS]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop_servers_on_sigterm()
    started = time.perf_counter()
    shape = {**BUILT_MODELS[args.model], "n_ctx": N_CTX * 2}
    model = ensure_bench_model(args.cache_dir, **shape)
    results: dict[str, Any] = {
        "schema": 1,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(
            ["python", "-m", "bench.conversations", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": facts.run_machine(ROOT),
        "versions": facts.versions(),
        "model": {"label": args.model, "file": model.name, "generator_shape": shape},
        "settings": {
            "parallel": args.parallel,
            "system_tokens": args.system_tokens,
            "distinct_systems": args.distinct_systems,
            "user_words": args.user_words,
            "max_tokens": args.max_tokens,
            "concurrency": args.concurrency,
            "n_threads": args.n_threads,
            "points": [p.label for p in args.points],
            "long": args.long,
            "restart": None if args.restart is None else args.restart.label,
        },
    }
    results |= measure(args, model)
    if args.restart is not None:
        results["restart"] = measure_restart(args, model)
    results["machine"]["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    text = markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("conversations_distinct" if args.distinct_systems else "conversations")
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
