"""Where this server's CPU goes per streamed token: ``python -m bench.profile``.

On a 2-core host every microsecond the server spends outside llama.cpp is taken from the
decode threads, so the figure that matters is CPU time per token, and it can be measured
even on a busy host (unlike wall-clock latency). The server runs on the tiny model (the
HTTP/SSE path dominates there) under one long stream at a time:

* CPU per token of the server's main thread (uvicorn's event loop: routing, serialization,
  SSE framing) and of its other threads (the engine thread, which runs llama-cpp-python's
  sampling and our per-token callback, and llama.cpp's workers), from ``/proc/PID/task``;
* CPU per token of this process as the client;
* with ``--py-spy``, a sampled profile of the server (``py-spy record --format raw``),
  summarized as the functions holding the most samples in each thread, inclusive.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import client, report
from bench.floor import Floor
from bench.run import ROOT, resolve_models
from bench.servers import OURS, ServerSettings, serve, servers

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """CPU seconds (user, system) of each thread of ``pid``."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        out[int(task.name)] = (int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS)
    return out


def _spent(
    before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]], main: bool
) -> tuple[float, float]:
    """User and system seconds between two readings, of the main thread or of the others."""
    pid = min(after)  # the main thread's id is the process id, the lowest of its threads
    user = system = 0.0
    for tid, (u, s) in after.items():
        if (tid == pid) == main:
            u0, s0 = before.get(tid, (0.0, 0.0))
            user, system = user + u - u0, system + s - s0
    return user, system


def summarize_raw(path: Path, top: int = 12) -> dict[str, list[tuple[str, float]]]:
    """From py-spy's raw (collapsed) output: per thread, the functions in most samples."""
    per_thread: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    totals: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith(("thread", "process")) else "all"
        totals[thread] += int(count)
        for frame in set(frames[1:]):
            per_thread[thread][frame] += int(count)
    return {
        f"{thread} ({totals[thread]} samples)": [
            (frame, round(100 * n / totals[thread], 1)) for frame, n in counter.most_common(top)
        ]
        for thread, counter in per_thread.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--model", default="tiny", help="bench, tiny or a GGUF path")
    parser.add_argument("--max-tokens", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--n-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--py-spy", action="store_true", help="also sample with py-spy")
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench" / "profile")
    args = parser.parse_args(argv)
    ((_, model, _),) = resolve_models(args.model, ROOT / ".cache" / "bench")
    settings = ServerSettings(
        model=model,
        n_ctx=args.max_tokens + 512,
        n_threads=args.n_threads,
        n_batch=512,
        parallel=1,
        flash_attn="on",
    )
    floor = Floor(
        model, n_ctx=settings.n_ctx, n_threads=args.n_threads, n_batch=512, flash_attn=True
    )
    prompt, _ = floor.prompt(253)
    tokens = floor.tokenize(prompt)
    floor.run(tokens, 4)
    cpu_before = time.process_time()
    produced = sum(len(floor.run(tokens, args.max_tokens).token_times) for _ in range(3))
    floor_cpu = (time.process_time() - cpu_before) / produced
    floor.close()

    (server,) = servers((OURS,), settings, None, ROOT)
    args.out.mkdir(parents=True, exist_ok=True)
    body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0, "stream": True}
    figures: dict[str, Any] = {"model": model.name, "floor_cpu_us_per_token": floor_cpu * 1e6}
    with serve(server, settings, args.out / "server.log", 300) as running:
        request = client.post_request(running.host, running.port, "/v1/completions", body)

        def load(n: int) -> client.Load:
            return asyncio.run(
                client.run_load(
                    running.host, running.port, request, concurrency=1, requests_per_worker=n
                )
            )

        load(1)
        spy = None
        if args.py_spy:
            binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            spy = subprocess.Popen(
                [binary, "record", "--pid", str(running.process.pid), "--rate", "1000",
                 "--format", "raw", "--threads", "--nonblocking",
                 "--output", str(args.out / "py-spy.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            )  # fmt: skip
            time.sleep(1.0)
        pid = running.process.pid
        before, client_before = thread_cpu(pid), time.process_time()
        done = load(args.requests)
        after, client_after = thread_cpu(pid), time.process_time()
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
            spy.wait(timeout=60)
    streams = [client.read_stream(e) for e in done.exchanges]
    produced = sum(len(s.token_times) for s in streams)
    main_user, main_system = _spent(before, after, main=True)
    other_user, other_system = _spent(before, after, main=False)
    per_token = [(s.token_times[-1] - s.token_times[0]) / (len(s.token_times) - 1) for s in streams]
    figures |= {
        "tokens": produced,
        "errors": sum(s.error is not None for s in streams),
        "http_ms_per_token": round(1000 * (report.percentile(per_token, 0.5) or 0.0), 4),
        "server_main_thread_user_us_per_token": round(main_user / produced * 1e6, 1),
        "server_main_thread_system_us_per_token": round(main_system / produced * 1e6, 1),
        "server_other_threads_user_us_per_token": round(other_user / produced * 1e6, 1),
        "server_other_threads_system_us_per_token": round(other_system / produced * 1e6, 1),
        "client_cpu_us_per_token": round((client_after - client_before) / produced * 1e6, 1),
        "floor_cpu_us_per_token": round(floor_cpu * 1e6, 1),
    }
    for key, value in figures.items():
        print(f"{key}: {value}")
    if args.py_spy and (args.out / "py-spy.txt").is_file():
        for thread, frames in summarize_raw(args.out / "py-spy.txt").items():
            print(f"\n{thread}")
            for frame, share in frames:
                print(f"  {share:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
