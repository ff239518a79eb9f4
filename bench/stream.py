"""``python -m bench.stream``: time streamed chat completions against a running server.

    python -m bench.stream --url http://127.0.0.1:8000 [--requests 3] [--max-tokens 256]

Prints one JSON object: per request the time to the first content token, the decode rate after
it (``usage.completion_tokens`` over the time from the first content event to the last) and
the number of content events; then the medians. It is the quick check of a deployed server
(``scripts/gpu_check.sh`` streams one request through the server it started): the numbers
include HTTP, SSE and the server's own work, which is what a deployment is judged by.

The requests go through ``bench.client``, the raw-socket client of ``make bench``, one at a
time, each on a fresh connection; a request that fails (a non-200, an error event, no
``[DONE]``) is reported with its error and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import urllib.parse
from collections.abc import Sequence
from typing import Any

from bench import client

PROMPT = "Count from 1 to 1000, one number per line, and nothing else."


def usage(exchange: client.Exchange) -> dict[str, Any]:
    """The ``usage`` object of a stream's last event that has one (``include_usage``)."""
    found: dict[str, Any] = {}
    for _, event in exchange.events:
        for line in event.split(b"\n"):
            if line.startswith(b"data:") and b'"usage"' in line:
                try:
                    chunk = json.loads(line[5:])
                except ValueError:
                    continue
                if isinstance(chunk, dict) and chunk.get("usage"):
                    found = chunk["usage"]
    return found


def one_run(exchange: client.Exchange) -> dict[str, Any]:
    stream = client.read_stream(exchange)
    times = stream.token_times
    completion_tokens = int(usage(exchange).get("completion_tokens", len(times)))
    decode_s = times[-1] - times[0] if times else 0.0
    finished = exchange.finished if exchange.finished is not None else exchange.sent
    run: dict[str, Any] = {
        "ttft_s": round(stream.ttft, 4) if stream.ttft is not None else None,
        "completion_tokens": completion_tokens,
        "content_events": len(times),
        "decode_tokens_per_s": (
            round((completion_tokens - 1) / decode_s, 2) if decode_s > 0 else None
        ),
        "total_s": round(finished - exchange.sent, 4),
    }
    if stream.error is not None:
        run["error"] = stream.error
    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.stream", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    args = parser.parse_args(argv)
    url = urllib.parse.urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request = client.post_request(host, port, "/v1/chat/completions", body)
    load = asyncio.run(
        client.run_load(
            host,
            port,
            request,
            concurrency=1,
            requests_per_worker=args.requests,
            timeout_s=args.timeout,
        )
    )
    runs = [one_run(e) for e in load.exchanges]

    def median(key: str) -> float | None:
        values = [run[key] for run in runs if run[key] is not None]
        return round(statistics.median(values), 4) if values else None

    result = {
        "url": args.url,
        "max_tokens": args.max_tokens,
        "runs": runs,
        "median_ttft_s": median("ttft_s"),
        "median_decode_tokens_per_s": median("decode_tokens_per_s"),
    }
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0 if all(run["content_events"] > 0 and "error" not in run for run in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
