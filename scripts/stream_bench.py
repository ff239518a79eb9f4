#!/usr/bin/env python3
"""Time streamed chat completions against a running server, as a client sees them.

    python scripts/stream_bench.py --url http://127.0.0.1:8000 [--requests 3] [--max-tokens 256]

Prints one JSON object: per request the time to the first content token, the decode rate after
it (usage.completion_tokens over the time from the first content event to the last) and the
number of content events; then the medians. It is the fallback benchmark of
scripts/gpu_check.sh when the project has no ``make bench``: the numbers include HTTP, SSE and
the server's own work, which is what a deployment is judged by.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import httpx

PROMPT = "Count from 1 to 1000, one number per line, and nothing else."


def one_request(client: httpx.Client, max_tokens: int) -> dict[str, Any]:
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = last = None
    events = 0
    usage: dict[str, Any] = {}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {})
                if delta.get("content") or delta.get("reasoning_content"):
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last = now
                    events += 1
    completion_tokens = int(usage.get("completion_tokens", events))
    decode_s = (last - first) if first is not None and last is not None else 0.0
    return {
        "ttft_s": round(first - started, 4) if first is not None else None,
        "completion_tokens": completion_tokens,
        "content_events": events,
        "decode_tokens_per_s": (
            round((completion_tokens - 1) / decode_s, 2) if decode_s > 0 else None
        ),
        "total_s": round(time.perf_counter() - started, 4),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args(argv)
    with httpx.Client(base_url=args.url, timeout=httpx.Timeout(600.0, connect=10.0)) as client:
        runs = [one_request(client, args.max_tokens) for _ in range(args.requests)]

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
    return 0 if all(run["content_events"] > 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
