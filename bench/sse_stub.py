"""A trivial SSE endpoint that streams as fast as it can: the ceiling of the bench client.

    python -m bench.sse_stub --port PORT [--host 127.0.0.1]

``POST`` (any path) answers a completion stream: ``max_tokens`` of the request body (default
16) pre-rendered ``text_completion`` chunks, each the size of a real server's, then a final
chunk with ``finish_reason`` and ``data: [DONE]``, chunked, and closes the connection (as
``llama-server`` does after a stream). ``GET`` answers 200 with a model list, so
``bench.servers.serve`` starts and waits for it like any server.

Decision: each event is written on its own and the handler yields to the event loop after
each one, so that with N connections the stub sends like a batching server does, one event
per stream per step, rather than one large write per stream that the client would read in a
single call. What the client then reads per second is what it can sustain against a server
that is never the bottleneck: the figure to compare every server's against. The stub runs
on uvloop where it is installed, to be the faster side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence

CHUNK = (
    b'data: {"id":"cmpl-0123456789abcdef01234567","object":"text_completion",'
    b'"created":1764633600,"model":"qwen3moe-bench-0102a490e303db3e",'
    b'"choices":[{"index":0,"text":"x","logprobs":null,"finish_reason":null}]}\n\n'
)
LAST = (
    b'data: {"id":"cmpl-0123456789abcdef01234567","object":"text_completion",'
    b'"created":1764633600,"model":"qwen3moe-bench-0102a490e303db3e",'
    b'"choices":[{"index":0,"text":"","logprobs":null,"finish_reason":"length"}]}\n\n'
    b"data: [DONE]\n\n"
)
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
)
MODELS = b'{"object":"list","data":[{"id":"sse-stub","object":"model","owned_by":"bench"}]}'


def _chunked(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


EVENT = _chunked(CHUNK)
END = _chunked(LAST) + b"0\r\n\r\n"


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        length = 0
        for line in header_lines:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        body = await reader.readexactly(length) if length else b""
        if request_line.startswith("GET"):
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(MODELS), MODELS)
            )
        else:
            events = int(json.loads(body or b"{}").get("max_tokens", 16))
            writer.write(STREAM_HEAD)
            for _ in range(events):
                writer.write(EVENT)
                await writer.drain()
                await asyncio.sleep(0)  # one event per stream per turn of the loop
            writer.write(END)
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def serve(host: str, port: int) -> None:
    server = await asyncio.start_server(handle, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sse_stub", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
