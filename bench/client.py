"""The load client: HTTP/1.1 over a raw asyncio protocol, timing every byte as it arrives.

Decision: no HTTP library on the measuring side. A benchmark client must not add latency of
its own, and on a 2-core host every microsecond it spends on the CPU is taken from the
server's decode threads. So every request goes out on a connection opened before its clock
starts (an httpx transport would build an SSL context per client: tens of milliseconds that
land in the first request's time to first token), with ``TCP_NODELAY``, as bytes prepared
once, and the arrival time of each read is taken in ``data_received`` itself, with no task
wake-up between the socket and the clock. The connection is a fresh one per request:
llama-server closes a connection after a streamed response, so a reused one would fail or
time a reconnect, and the same rule for every server keeps them comparable. Event bodies are
kept as raw bytes with their arrival times; JSON is parsed only after the load is over
(``read_stream``).

The alternative rejected: httpx with ``aiter_raw()``. It times well enough when built once per
worker, but its per-chunk async iterators cost CPU inside the measurement window, and
``iter_text()`` adds an incremental decoder on top. ``bench.run`` checks this client once
against ``curl -w %{time_starttransfer}`` and records both figures.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Exchange:
    """One request and everything that came back for it, timed with ``time.perf_counter``."""

    sent: float
    status: int | None = None
    first_byte: float | None = None
    finished: float | None = None
    events: list[tuple[float, bytes]] = field(default_factory=list)
    """Each SSE event (or a whole non-SSE body) with the arrival time of its last byte."""
    error: str | None = None


class _Protocol(asyncio.Protocol):
    """One keep-alive connection; one exchange at a time; chunked or sized bodies."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reusable = True
        self._buffer = bytearray()
        self._body = bytearray()
        self._state = "idle"
        self._remaining = 0
        self._exchange: Exchange | None = None
        self._done: asyncio.Future[Exchange] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, request: bytes) -> asyncio.Future[Exchange]:
        assert self.transport is not None and self._state == "idle"
        self._done = asyncio.get_running_loop().create_future()
        self._state = "head"
        self._exchange = Exchange(sent=time.perf_counter())
        self.transport.write(request)
        return self._done

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        exchange = self._exchange
        if exchange is None:
            return
        if exchange.first_byte is None:
            exchange.first_byte = now
        self._buffer += data
        try:
            self._parse(exchange, now)
        except ValueError as exc:
            self._fail(f"malformed response: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        if self._state == "until_close" and self._exchange is not None:
            self._finish(self._exchange, time.perf_counter())
        elif self._exchange is not None:
            self._fail("connection closed mid-response")

    def _parse(self, exchange: Exchange, now: float) -> None:
        buffer = self._buffer
        while True:
            if self._state == "head":
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                self._head(exchange, bytes(buffer[:end]))
                del buffer[: end + 4]
            elif self._state == "size":
                end = buffer.find(b"\r\n")
                if end < 0:
                    return
                self._remaining = int(bytes(buffer[:end]).split(b";")[0], 16)
                del buffer[: end + 2]
                self._state = "data" if self._remaining else "trailer"
            elif self._state in ("data", "sized"):
                if not buffer:
                    return
                piece = buffer[: self._remaining]
                del buffer[: len(piece)]
                self._remaining -= len(piece)
                self._feed(exchange, piece, now)
                if self._remaining:
                    return
                if self._state == "sized":
                    self._finish(exchange, now)
                    return
                self._state = "data_end"
            elif self._state == "data_end":
                if len(buffer) < 2:
                    return
                del buffer[:2]
                self._state = "size"
            elif self._state == "trailer":
                end = buffer.find(b"\r\n")
                if end < 0:
                    return
                del buffer[: end + 2]
                if end == 0:
                    self._finish(exchange, now)
                    return
            elif self._state == "until_close":
                self._feed(exchange, bytes(buffer), now)
                buffer.clear()
                return
            else:
                return

    def _head(self, exchange: Exchange, head: bytes) -> None:
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        exchange.status = int(status_line.split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if headers.get("connection") == "close":
            self.reusable = False
        if "chunked" in headers.get("transfer-encoding", ""):
            self._state = "size"
        elif "content-length" in headers:
            self._remaining = int(headers["content-length"])
            self._state = "sized" if self._remaining else "idle"
            if not self._remaining:
                self._finish(exchange, time.perf_counter())
        else:
            self.reusable = False
            self._state = "until_close"

    def _feed(self, exchange: Exchange, piece: bytes | bytearray, now: float) -> None:
        # JSON never holds a raw CR, so dropping them turns CRLF event separators into LF.
        self._body += piece.replace(b"\r", b"")
        body = self._body
        while (end := body.find(b"\n\n")) >= 0:
            exchange.events.append((now, bytes(body[:end])))
            del body[: end + 2]

    def _finish(self, exchange: Exchange, now: float) -> None:
        if self._body:
            exchange.events.append((now, bytes(self._body)))
            self._body.clear()
        exchange.finished = now
        self._settle(exchange)

    def _fail(self, error: str) -> None:
        assert self._exchange is not None
        self._exchange.error = error
        self.reusable = False
        if self.transport is not None:
            self.transport.close()
        self._settle(self._exchange)

    def _settle(self, exchange: Exchange) -> None:
        self._state = "idle"
        self._exchange = None
        self._body.clear()
        if self._done is not None and not self._done.done():
            self._done.set_result(exchange)


class Connection:
    """A keep-alive HTTP/1.1 connection to ``host:port`` (reopened when the server closes it)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._protocol: _Protocol | None = None

    async def open(self) -> Connection:
        if self._protocol is None or not self._protocol.reusable:
            self.close()
            loop = asyncio.get_running_loop()
            _, protocol = await loop.create_connection(_Protocol, self.host, self.port)
            self._protocol = protocol
        return self

    async def exchange(self, request: bytes, timeout_s: float) -> Exchange:
        """Send ``request`` (a whole HTTP/1.1 request) and wait for the whole response."""
        await self.open()
        protocol = self._protocol
        assert protocol is not None
        sent = time.perf_counter()
        try:
            return await asyncio.wait_for(protocol.send(request), timeout_s)
        except TimeoutError:
            self.close()
            return Exchange(sent=sent, error=f"no complete response within {timeout_s:g} s")

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None


def post_request(host: str, port: int, path: str, body: dict[str, Any]) -> bytes:
    """A complete ``POST`` request with a JSON body, ready to write as is."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Content-Type: application/json\r\n"
        "Accept: text/event-stream\r\n"
        f"Content-Length: {len(payload)}\r\n"
        "\r\n"
    )
    return head.encode() + payload


def streamed_completions(
    host: str, port: int, prompt: Callable[[], list[int]], max_tokens: int
) -> Callable[[int, int], bytes]:
    """For ``run_load``: each request a greedy, streamed ``/v1/completions`` of its own
    ``prompt()`` (token ids), ``max_tokens`` long."""

    def build(worker: int, index: int) -> bytes:
        body = {"prompt": prompt(), "max_tokens": max_tokens, "temperature": 0, "stream": True}
        return post_request(host, port, "/v1/completions", body)

    return build


@dataclass
class Load:
    """The exchanges of one load level and the wall-clock window they ran in."""

    concurrency: int
    started: float
    finished: float
    exchanges: list[Exchange]


async def run_load(
    host: str,
    port: int,
    request: bytes | Callable[[int, int], bytes],
    *,
    concurrency: int,
    requests_per_worker: int,
    timeout_s: float = 600.0,
    on_done: Callable[[Exchange], None] | None = None,
) -> Load:
    """``concurrency`` workers, each sending ``requests_per_worker`` requests in a row.

    ``request`` is the same request for all, or a function of ``(worker, index)`` giving each
    its own (a prompt of its own); every request is built before the window starts. The first
    connections are open before the window starts and each later one before its request is
    sent, so connecting is never part of a request's time.
    """
    if callable(request):
        build = request
        requests = [[build(w, i) for i in range(requests_per_worker)] for w in range(concurrency)]
    else:
        requests = [[request] * requests_per_worker for _ in range(concurrency)]
    connections = [await Connection(host, port).open() for _ in range(concurrency)]
    exchanges: list[Exchange] = []

    async def worker(connection: Connection, own: list[bytes]) -> None:
        for index, payload in enumerate(own):
            if index:
                connection.close()
                await connection.open()
            exchange = await connection.exchange(payload, timeout_s)
            exchanges.append(exchange)
            if on_done is not None:
                on_done(exchange)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker(c, r) for c, r in zip(connections, requests, strict=True)))
    finally:
        for connection in connections:
            connection.close()
    return Load(concurrency, started, time.perf_counter(), exchanges)


@dataclass
class Stream:
    """One streamed completion, read from its exchange after the fact."""

    sent: float
    token_times: list[float]
    """Arrival time of every event that carried text, in order."""
    done: bool
    error: str | None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def gaps(self) -> list[float]:
        times = self.token_times
        return [b - a for a, b in itertools.pairwise(times)]


def _carries_text(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        if choice.get("text"):
            return True
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
            return True
    return False


def read_stream(exchange: Exchange) -> Stream:
    """Token arrival times, ``[DONE]`` and the first error of an SSE completion exchange."""
    error = exchange.error
    if error is None and exchange.status != 200:
        error = f"HTTP {exchange.status}"
    times: list[float] = []
    done = False
    for arrived, event in exchange.events:
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue  # comments (keep-alives), event names, ids
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                continue
            try:
                chunk = json.loads(payload)
            except ValueError:
                error = error or "an event that is not JSON"
                continue
            if isinstance(chunk, dict) and "error" in chunk:
                error = error or f"in-band error: {str(chunk['error'])[:200]}"
            elif isinstance(chunk, dict) and _carries_text(chunk):
                times.append(arrived)
    if error is None and not done:
        error = "no [DONE]"
    return Stream(sent=exchange.sent, token_times=times, done=done, error=error)
