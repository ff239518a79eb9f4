"""``python -m bench.replicas``: agents' conversations on replicas behind nginx, and how much of
each turn's prompt is already cached on the replica it lands on.

    python -m bench.replicas [--conversations 8] [--turns 6] [--system-tokens 2500]
        [--history-tokens 6000] [--turn-tokens 200] [--max-tokens 32] [--think 1.0]
        [--parallel 4] [--cache-ram 8192] [--quick] [--out bench/results]

Agents resend their whole conversation every turn, so a turn is cheap only where the previous
one was served: that replica holds the conversation's prefix in a slot or in its host-RAM
prompt cache (``--cache-ram``). Each setup runs the same conversations on freshly started
replicas of this server (the *tiny* bench model, ``bench.run.BUILT_MODELS``) behind a real
nginx running the shipped ``deploy/nginx/nginx.conf`` (``bench.nginx``; the bench skips, with
the reason, without an nginx binary):

1. ``least_conn``: two replicas, the shipped file with its balancing line replaced by
   ``least_conn;`` (what the file said before: the fewest open connections);
2. ``consistent hash``: two replicas, the shipped file as it is (a hash of the conversation);
3. ``one replica``: the ceiling, every turn on the replica that served the one before.

The threads are shared out so that every setup uses the same cores: ``--n-threads`` of the
machine's CPUs split over the replicas. Every conversation opens with one shared system
prompt (``--system-tokens`` of random words, as agents share theirs), then a history of its
own (``--history-tokens``: the files and tool output an agent has read), then ``--turns``
turns, each a new user message of ``--turn-tokens`` and a streamed answer of
``--max-tokens``, the answer appended to the conversation as returned. The conversations run
side by side, each with its own ``x-session-id`` header (what opencode sends; nginx keys on it),
pausing ``--think`` seconds between turns (an agent running a tool), so their turns
interleave. On turns 2 and later: the share of prompt tokens the server reports as cached
(``usage.prompt_tokens_details.cached_tokens``), the prompt tokens decoded per turn (prompt
minus cached), time to first token and the whole turn's time (p50/p95,
``bench.report.percentile``), and how often a conversation changed replica (from nginx's
access log, which names the replica and the request id).

Writes ``replicas.json`` (every turn's figures, the machine, the commit) and ``replicas.md``.
``--quick`` (4 short conversations, 3 turns) checks the harness, not the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import os
import random
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import facts, report
from bench.client import Connection, Exchange
from bench.model import ensure_bench_model
from bench.nginx import Nginx, find_nginx, free_port, render
from bench.run import BUILT_MODELS
from bench.servers import OURS, ServerSettings, serve, server, stop_servers_on_sigterm

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny"
CTX_STEP = 256
SESSION_HEADER = "x-session-id"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Setup:
    label: str
    replicas: int
    balance: str | None
    """The upstream's balancing line instead of the shipped one; None: the shipped one."""


SETUPS = (
    Setup("least_conn (before)", 2, "least_conn"),
    Setup("consistent hash (nginx.conf)", 2, None),
    Setup("one replica (ceiling)", 1, None),
)


@dataclass
class Turn:
    conversation: int
    turn: int
    request_id: str
    status: int | None = None
    error: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    replica: str | None = None


@dataclass
class Conversation:
    index: int
    session: str
    messages: list[dict[str, str]] = field(default_factory=list)


def words(rng: random.Random, n_tokens: int) -> str:
    """About ``n_tokens`` tokens of random lowercase words (one token a character on the bench
    models' byte vocabulary, the spaces included)."""
    out: list[str] = []
    length = 0
    while length < n_tokens:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 9)))
        out.append(word)
        length += len(word) + 1
    return " ".join(out)


def conversations(args: argparse.Namespace, seed: int) -> list[Conversation]:
    """The conversations' openings: the shared system prompt and each one's own history."""
    rng = random.Random(seed)
    system = words(rng, args.system_tokens)
    found = []
    for index in range(args.conversations):
        messages = [{"role": "system", "content": system}]
        pieces = max(1, args.history_tokens // 1000)
        for _ in range(pieces):
            messages.append({"role": "user", "content": words(rng, args.history_tokens // pieces)})
            messages.append({"role": "assistant", "content": words(rng, 40)})
        session = f"ses_{uuid.UUID(int=rng.getrandbits(128)).hex[:24]}"
        found.append(Conversation(index, session, messages))
    return found


def chat_request(port: int, body: dict[str, Any], headers: dict[str, str]) -> bytes:
    payload = json.dumps(body).encode()
    head = [
        "POST /v1/chat/completions HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(payload)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


def read_answer(exchange: Exchange) -> tuple[str, float | None, dict[str, Any] | None, str | None]:
    """The streamed answer's text, when its first text arrived, its usage and its error."""
    text: list[str] = []
    first: float | None = None
    usage: dict[str, Any] | None = None
    error = exchange.error
    done = False
    for arrived, event in exchange.events:
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                continue
            try:
                chunk = json.loads(payload)
            except ValueError:
                return "", None, None, "an event that is not JSON"
            if "error" in chunk:
                error = error or f"in-band error: {str(chunk['error'])[:200]}"
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                piece = delta.get("content") or delta.get("reasoning_content") or ""
                if piece and first is None:
                    first = arrived
                text.append(delta.get("content") or "")
    if error is None and exchange.status != 200:
        error = f"HTTP {exchange.status}"
    if error is None and not done:
        error = "no [DONE]"
    return "".join(text), first, usage, error


async def agent(
    conversation: Conversation,
    port: int,
    args: argparse.Namespace,
    rng: random.Random,
    run_id: str,
    turns: list[Turn],
) -> None:
    """One agent: its turns in a row, ``args.think`` seconds apart."""
    for number in range(1, args.turns + 1):
        conversation.messages.append({"role": "user", "content": words(rng, args.turn_tokens)})
        request_id = f"{run_id}-c{conversation.index}-t{number}"
        body = {
            "messages": conversation.messages,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {SESSION_HEADER: conversation.session, "x-request-id": request_id}
        record = Turn(conversation.index, number, request_id)
        connection = await Connection("127.0.0.1", port).open()
        try:
            exchange = await connection.exchange(chat_request(port, body, headers), args.timeout)
        finally:
            connection.close()
        answer, first, usage, error = read_answer(exchange)
        record.status, record.error = exchange.status, error
        if usage is not None:
            record.prompt_tokens = usage.get("prompt_tokens")
            details = usage.get("prompt_tokens_details") or {}
            record.cached_tokens = details.get("cached_tokens", 0)
        record.ttft_s = None if first is None else round(first - exchange.sent, 4)
        if exchange.finished is not None:
            record.latency_s = round(exchange.finished - exchange.sent, 4)
        turns.append(record)
        conversation.messages.append({"role": "assistant", "content": answer})
        if number < args.turns:
            await asyncio.sleep(args.think)


async def play(
    port: int, args: argparse.Namespace, seed: int, run_id: str
) -> tuple[list[Turn], float]:
    """Every conversation's turns, side by side; returns them and the window's seconds."""
    talks = conversations(args, seed)
    turns: list[Turn] = []
    started = time.perf_counter()
    await asyncio.gather(
        *(agent(c, port, args, random.Random(f"{seed}-{c.index}"), run_id, turns) for c in talks)
    )
    return turns, time.perf_counter() - started


_LOGGED = re.compile(r"upstream=(\S+(?:, \S+)*) upstream_status=.* request_id=(\S+)")


def placements(log: str) -> dict[str, str]:
    """The replica (``host:port``) that answered each request id, from nginx's access log (the
    last one a request was handed to)."""
    found = {}
    for line in log.splitlines():
        match = _LOGGED.search(line)
        if match:
            found[match.group(2)] = match.group(1).split(", ")[-1]
    return found


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _pair(values: Sequence[float], digits: int = 3) -> dict[str, float | None]:
    p50, p95 = report.percentile(values, 0.5), report.percentile(values, 0.95)
    return {
        "p50": None if p50 is None else round(p50, digits),
        "p95": None if p95 is None else round(p95, digits),
    }


def figures(turns: Sequence[Turn]) -> dict[str, Any]:
    """The setup's figures over turns 2 and later (turn 1 is every conversation's cold start)."""
    later = [t for t in turns if t.turn >= 2 and t.error is None and t.prompt_tokens]
    prompt = sum(t.prompt_tokens or 0 for t in later)
    cached = sum(t.cached_tokens or 0 for t in later)
    decoded = [float((t.prompt_tokens or 0) - (t.cached_tokens or 0)) for t in later]
    by_conversation: dict[int, list[Turn]] = {}
    for t in sorted(turns, key=lambda t: (t.conversation, t.turn)):
        by_conversation.setdefault(t.conversation, []).append(t)
    moves = sum(
        1
        for talk in by_conversation.values()
        for a, b in itertools.pairwise(talk)
        if a.replica is not None and b.replica is not None and a.replica != b.replica
    )
    first_turns = [t for t in turns if t.turn == 1]
    per_replica: dict[str, int] = {}
    for t in first_turns:
        per_replica[t.replica or "?"] = per_replica.get(t.replica or "?", 0) + 1
    return {
        "turns_measured": len(later),
        "errors": sum(t.error is not None for t in turns),
        "error_examples": sorted({t.error for t in turns if t.error})[:3],
        "cached_share": _share(cached, prompt),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "decoded_per_turn": {
            "mean": round(sum(decoded) / len(decoded), 1) if decoded else None,
            **_pair(decoded, 1),
        },
        "prompt_tokens_per_turn_mean": round(prompt / len(later), 1) if later else None,
        "ttft_s": _pair([t.ttft_s for t in later if t.ttft_s is not None]),
        "latency_s": _pair([t.latency_s for t in later if t.latency_s is not None]),
        "replica_changes": moves,
        "turn_pairs": sum(max(len(talk) - 1, 0) for talk in by_conversation.values()),
        "conversations_per_replica": sorted(per_replica.values(), reverse=True),
    }


def n_ctx_per_slot(args: argparse.Namespace) -> int:
    """Room for a whole conversation: its opening, every turn and answer, template tokens."""
    history = args.history_tokens + 60 * max(1, args.history_tokens // 1000)
    tokens = args.system_tokens + history + args.turns * (args.turn_tokens + args.max_tokens + 16)
    return -(-int(tokens * 1.1 + 256) // CTX_STEP) * CTX_STEP


@contextlib.contextmanager
def replicas_behind_nginx(
    setup: Setup, args: argparse.Namespace, model: Path, binary: Path, folder: Path
) -> Iterator[Nginx]:
    threads = max(1, args.n_threads // setup.replicas)
    settings = ServerSettings(
        model=model,
        n_ctx=n_ctx_per_slot(args),
        n_threads=threads,
        n_batch=args.n_batch,
        parallel=args.parallel,
        flash_attn=args.flash_attn,
    )
    candidate = server(OURS, settings, None, ROOT, extra_args=("--cache-ram", str(args.cache_ram)))
    if candidate.skipped:
        raise RuntimeError(candidate.skipped)
    with contextlib.ExitStack() as stack:
        running = [
            stack.enter_context(
                serve(candidate, settings, folder / f"replica-{i}.log", args.ready_timeout)
            )
            for i in range(setup.replicas)
        ]
        port = free_port()
        config = render(
            [f"127.0.0.1:{r.port}" for r in running], port, folder / "nginx", balance=setup.balance
        )
        yield stack.enter_context(Nginx(binary, config, folder / "nginx", port))


def measure(
    setup: Setup, args: argparse.Namespace, model: Path, binary: Path, seed: int
) -> dict[str, Any]:
    folder = args.cache_dir / "replicas" / re.sub(r"\W+", "-", setup.label).strip("-")
    threads = max(1, args.n_threads // setup.replicas)
    row: dict[str, Any] = {**asdict(setup), "n_threads_per_replica": threads}
    _progress(f"{setup.label}: {setup.replicas} replica(s)")
    try:
        with replicas_behind_nginx(setup, args, model, binary, folder) as balancer:
            run_id = uuid.uuid4().hex[:8]
            turns, window = asyncio.run(play(balancer.port, args, seed, run_id))
            time.sleep(0.2)  # nginx writes a request's line once the response is sent
            log = balancer.log()
    except RuntimeError as exc:
        return {**row, "status": "failed", "reason": str(exc)}
    placed = placements(log)
    for t in turns:
        t.replica = placed.get(t.request_id)
    return {
        **row,
        "status": "ok",
        "window_s": round(window, 2),
        **figures(turns),
        "turns": [asdict(t) for t in sorted(turns, key=lambda t: (t.conversation, t.turn))],
    }


# -- Markdown ---------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        *report.head_lines(
            "Conversations on replicas behind nginx",
            results,
            also=f"; {results['nginx']}" if results.get("nginx") else "",
        ),
        "",
        f"Model `{results['model']['file']}` ({MODEL}). {s['conversations']} conversations "
        f"side by side, each a shared {s['system_tokens']}-token system prompt, "
        f"{s['history_tokens']} tokens of history of its own, then {s['turns']} turns of a "
        f"{s['turn_tokens']}-token user message and a streamed {s['max_tokens']}-token answer "
        f"(appended as returned), {s['think']} s apart, each conversation with its own "
        f"`{SESSION_HEADER}` header. Every replica: `--parallel {s['parallel']} --cache-ram "
        f"{s['cache_ram']}`, n_ctx {s['n_ctx_per_slot']} per slot, {s['n_threads']} threads "
        "shared out over the replicas, behind nginx with the shipped deploy/nginx/nginx.conf "
        "(its balancing line replaced by `least_conn` for the first row).",
        "",
        "On turns 2 and later: cached = the prompt tokens the server reported as cached "
        "(`usage.prompt_tokens_details.cached_tokens`) over all prompt tokens; decoded = prompt "
        "minus cached tokens per turn; TTFT = request sent to first token; turn = request sent "
        "to the last byte; replica changes = consecutive turns of a conversation on different "
        "replicas (nginx's access log), of all such pairs.",
        "",
        "| setup | cached, turns >= 2 | decoded per turn: mean (p50 / p95) | TTFT p50 / p95 (s) "
        "| turn p50 / p95 (s) | replica changes | conversations per replica | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["setups"]:
        if row["status"] != "ok":
            lines.append(f"| {row['label']} | failed: {row['reason'][:200]} | | | | | | |")
            continue
        d = row["decoded_per_turn"]
        lines.append(
            f"| {row['label']} | {_pct(row['cached_share'])} "
            f"| {_f(d['mean'], 0)} ({_f(d['p50'], 0)} / {_f(d['p95'], 0)}) "
            f"| {_f(row['ttft_s']['p50'], 2)} / {_f(row['ttft_s']['p95'], 2)} "
            f"| {_f(row['latency_s']['p50'], 2)} / {_f(row['latency_s']['p95'], 2)} "
            f"| {row['replica_changes']} of {row['turn_pairs']} "
            f"| {', '.join(str(n) for n in row['conversations_per_replica'])} "
            f"| {row['errors']} |"
        )
    return "\n".join(lines) + "\n"


# -- the command ------------------------------------------------------------------------------


def _progress(text: str) -> None:
    print(f"replicas: {text}", file=sys.stderr, flush=True)


def nginx_version(binary: Path) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            [str(binary), "-v"], capture_output=True, text=True, timeout=10, check=False
        )
        return (done.stderr or done.stdout).strip() or None
    return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.replicas", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--conversations", type=int)
    parser.add_argument("--turns", type=int)
    parser.add_argument("--system-tokens", type=int)
    parser.add_argument("--history-tokens", type=int)
    parser.add_argument("--turn-tokens", type=int)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--think", type=float, default=1.0, help="seconds between turns")
    parser.add_argument("--parallel", type=int, default=4, help="slots of every replica")
    parser.add_argument("--cache-ram", type=int, default=8192, help="MiB, every replica")
    parser.add_argument(
        "--n-threads",
        type=int,
        default=os.cpu_count() or 2,
        help="CPU threads of every setup, shared out over its replicas (default: all CPUs)",
    )
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--seed", type=int, default=0, help="the conversations' words")
    parser.add_argument("--quick", action="store_true", help="check the harness: short talks")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "bench")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per turn")
    args = parser.parse_args(argv)
    defaults = (
        {"conversations": 4, "turns": 3, "system_tokens": 300, "history_tokens": 600,
         "turn_tokens": 50, "max_tokens": 8}
        if args.quick
        else {"conversations": 8, "turns": 6, "system_tokens": 2500, "history_tokens": 6000,
              "turn_tokens": 200, "max_tokens": 32}
    )  # fmt: skip
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick:
        args.think = min(args.think, 0.1)
    if min(args.conversations, args.turns, args.max_tokens, args.parallel) < 1:
        parser.error("--conversations, --turns, --max-tokens and --parallel must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    binary = find_nginx()
    if binary is None:
        _progress("skipped: no nginx binary ($NGINX, PATH, /usr/sbin/nginx): apt-get install nginx")
        return 0
    stop_servers_on_sigterm()
    started = time.perf_counter()
    model = ensure_bench_model(args.cache_dir, **BUILT_MODELS[MODEL])
    results: dict[str, Any] = {
        "schema": 1,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(
            ["python", "-m", "bench.replicas", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": facts.run_machine(ROOT),
        "versions": facts.versions(),
        "nginx": nginx_version(binary),
        "model": {
            "label": MODEL,
            "file": model.name,
            "size_bytes": model.stat().st_size,
            "generator_shape": BUILT_MODELS[MODEL],
        },
        "settings": {
            "conversations": args.conversations,
            "turns": args.turns,
            "system_tokens": args.system_tokens,
            "history_tokens": args.history_tokens,
            "turn_tokens": args.turn_tokens,
            "max_tokens": args.max_tokens,
            "think": args.think,
            "parallel": args.parallel,
            "cache_ram": args.cache_ram,
            "n_threads": args.n_threads,
            "n_batch": args.n_batch,
            "flash_attn": args.flash_attn,
            "n_ctx_per_slot": n_ctx_per_slot(args),
            "seed": args.seed,
            "quick": args.quick,
        },
        "setups": [],
    }
    for setup in SETUPS:
        results["setups"].append(measure(setup, args, model, binary, args.seed))
    results["machine"]["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    text = markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "replicas.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "replicas.md").write_text(text)
    print(text)
    print(f"wrote {args.out / 'replicas.json'}, replicas.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
