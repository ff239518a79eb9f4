"""Per-token delivery, proven at the HTTP level for any streaming route.

The engine is held after every token that completes text until the client has *received*
that token's event (through the generation's ``Flow``). A server that held events back would
never be released and the client would wait in vain (a read timeout); one that ran ahead
would show a token reaching ``on_token`` before the client had the event two tokens earlier.
Each API tells ``deliver`` which of its events carry text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.engine import Backend, Flow, OnToken
from app.main import create_app
from app.text import TextOptions, TextPipeline
from tests.support.injection import InjectedBackend, Seen
from tests.support.servers import LiveServer, settings_for

TextOf = Callable[[Iterator[str]], Iterator[str]]
"""The text of each text-carrying event in a stream's lines, as it arrives ("" for events
that carry none: the caller reads the stream through it)."""


class DeliveryGate(InjectedBackend):
    """Pauses the engine after each token that completes text until the client has its event,
    and notes, whenever a token reaches ``on_token``, how far behind the client was."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.gate = Flow()
        self.oracle = TextPipeline(inner.tokenizer.token_bytes, TextOptions())
        self.text = ""
        self.text_tokens: list[bool] = []  # per token: did it complete text?
        self.received = 0  # events the client has (written by the client's thread)
        self.ahead: list[tuple[int, int, int]] = []  # (token, events owed, events received)

    def flow(self, seen: Seen, flow: Flow | None) -> Flow:
        return self.gate

    def watch(self, seen: Seen, on_token: OnToken) -> OnToken:
        def gated(token_id: int) -> bool:
            # Every text token up to two before this one must have reached the client.
            owed = sum(self.text_tokens[: max(len(self.text_tokens) - 1, 0)])
            if self.received < owed:
                self.ahead.append((len(self.text_tokens), owed, self.received))
            text = "".join(d.content for d in self.oracle.push(token_id))
            self.text += text
            self.text_tokens.append(bool(text))
            keep = on_token(token_id)
            if text and self.received < sum(self.text_tokens):
                self.gate.pause()
            return keep

        return gated

    def client_received(self, seen: Seen) -> None:
        """On the client's thread: one more event arrived."""
        self.received += 1

        def resume() -> None:
            if self.received >= sum(self.text_tokens):
                self.gate.resume()

        seen.loop.call_soon_threadsafe(resume)


@dataclass
class Delivered:
    gate: DeliveryGate
    texts: list[str] = field(default_factory=list)
    """The text of every text event, in arrival order."""
    lines: list[str] = field(default_factory=list)
    """Every line of the stream."""
    headers: httpx.Headers = field(default_factory=httpx.Headers)

    @property
    def tail(self) -> str:
        """Text the oracle still held when the engine stopped (sent after the last token)."""
        return "".join(d.content for d in self.gate.oracle.finish())


def deliver(model: Backend, path: str, body: dict[str, Any], text_of: TextOf) -> Delivered:
    """Streams ``body`` to ``path`` on a real uvicorn over the gated engine."""
    gated = DeliveryGate(model)
    delivered = Delivered(gated)
    with (
        LiveServer(create_app(settings_for(), backend=gated)) as server,
        # A server that holds an event back leaves the client waiting: a read timeout.
        httpx.Client(base_url=server.url, timeout=10) as http,
        http.stream("POST", path, json=body) as response,
    ):
        assert response.status_code == 200, response.read()
        delivered.headers = response.headers

        def recorded() -> Iterator[str]:
            for line in response.iter_lines():
                delivered.lines.append(line)
                yield line

        for text in text_of(recorded()):
            if text:
                delivered.texts.append(text)
                gated.client_received(gated.seen[0])
    return delivered


def check_per_token_delivery(delivered: Delivered) -> None:
    """The invariants of per-token delivery (contract falsifiers name them)."""
    gated = delivered.gate
    assert gated.ahead == [], "a token reached on_token before the client had the one two back"
    tail = delivered.tail
    assert delivered.texts and "".join(delivered.texts) == gated.text + tail
    assert len(delivered.texts) == sum(gated.text_tokens) + bool(tail), "one event per token"
