"""The one response path of every generating route: parse the body, then stream the
generation as SSE or collect the very same events into one JSON body.

A route only names its request model and its ``Wire`` (``app.api.http.wire``: the API's shape of
streams and bodies); streaming, buffering, in-band errors, keep-alives, metrics and the access
log's facts are written once, here, for every API.

The body is parsed from the raw bytes whatever the Content-Type: ``curl -d`` sends JSON as
``application/x-www-form-urlencoded``, and refusing that would fail the most common first try.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from contextlib import suppress
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from app.api.http.access_log import request_facts
from app.api.http.error_handlers import CLIENT_CLOSED_REQUEST, record_error
from app.api.http.metrics import Metrics
from app.api.http.sse import event_stream
from app.api.http.wire import Wire
from app.core.limits import lone_surrogate_at
from app.core.prepare import PreparedGeneration
from app.core.results import Event, Finished
from app.core.service import GenerationService
from app.errors import InvalidRequest, as_api_error, validation_error
from app.settings import Settings

Body = TypeVar("Body", bound=BaseModel)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def read_body(request: Request, model: type[Body]) -> Body:
    """The body parsed into ``model``; every way a body can be unreadable is a 400 here.

    Beyond malformed JSON: numbers Python will not parse (an integer of more than 4,300
    digits), ``NaN`` and infinities, nesting past the parser's stack, and strings that are
    not Unicode text (a lone UTF-16 surrogate escape, ``"\\ud800"``, which nothing can encode
    as UTF-8 later: not the tokenizer, not the error message that would quote it).
    """
    raw = await request.body()
    if len(raw) > INLINE_BODY_BYTES:  # ~0.5 s for 7 MiB of tiny messages: off the event loop
        return await asyncio.to_thread(_parsed, raw, model)
    return _parsed(raw, model)


INLINE_BODY_BYTES = 256 * 1024
"""Bodies up to this large are parsed on the event loop (a few milliseconds); larger ones on a
worker thread, so the streams the loop serves go on meanwhile."""


def _parsed(raw: bytes, model: type[Body]) -> Body:
    try:
        data = json.loads(raw, parse_constant=_non_finite, parse_float=_finite_float)
    except RecursionError as exc:
        raise InvalidRequest(
            "The request body is nested too deeply to parse.", code="invalid_json"
        ) from exc
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidRequest(_unparsable(exc), code="invalid_json") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    if _SURROGATE_ESCAPE.search(raw):  # else no string in it can hold a surrogate
        where = lone_surrogate_at(data)
        if where is not None:
            raise InvalidRequest(
                f"The string at '{where[:200]}' holds a lone UTF-16 surrogate escape; strings "
                "must be valid Unicode.",
                param=where[:200],
                code="invalid_text",
            )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from exc


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
"""A UTF-16 surrogate's escape in JSON (a pair encodes one character; one alone, nothing), or
a surrogate encoded as if it were a character (which Python's JSON decoder lets through)."""


class _NotJson(ValueError):
    pass


def _non_finite(constant: str) -> Any:
    raise _NotJson(f"{constant} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(f"the number {text[:40]} is too large")
    return value


def _unparsable(exc: ValueError | UnicodeDecodeError) -> str:
    """What is wrong with a body that does not parse, without the parser's own wording."""
    if isinstance(exc, UnicodeDecodeError):
        return "The request body is not valid UTF-8."
    if isinstance(exc, json.JSONDecodeError):
        return f"The request body is not valid JSON (line {exc.lineno}, column {exc.colno})."
    if isinstance(exc, _NotJson):
        return f"The request body is not valid JSON: {exc}."
    return "The request body holds a number too large to read (more than 4,300 digits)."


async def observed(
    request: Request, service: GenerationService, job: PreparedGeneration, arrived: float
) -> AsyncIterator[list[Event | Finished]]:
    """The service's generation, measured for /metrics and noted for the access log."""
    metrics: Metrics = request.app.state.metrics
    async for batch in metrics.observe(service.generate(job), arrived):
        item = batch[-1]
        if isinstance(item, Finished):
            request_facts(request.scope).update(
                finish_reason=item.finish_reason,
                prompt_tokens=item.prompt_tokens,
                cached_tokens=item.cached_tokens,
                completion_tokens=item.completion_tokens,
                queue_ms=round(item.times.queue_ms, 2),
                prompt_ms=round(item.times.prompt_ms, 2),
                decode_ms=round(item.times.decode_ms, 2),
            )
        yield batch


async def _stream_events(
    request: Request,
    batches: AsyncIterator[list[Event | Finished]],
    wire: Wire,
    keepalive_s: float,
) -> AsyncGenerator[bytes, None]:
    opening = wire.opening()
    if opening:
        yield opening
    first = asyncio.ensure_future(anext(batches))
    try:
        # The first token may be long in coming (a long prompt, a queue): meanwhile the wire
        # may keep the stream alive with events of its own, in order with all the others.
        while not (await asyncio.wait({first}, timeout=keepalive_s))[0]:
            waiting = wire.waiting()
            if waiting:
                yield waiting
        yield _frames(wire, first.result())
        async for batch in batches:
            yield _frames(wire, batch)
    except Exception as exc:
        # Headers are gone: the error travels in-band, in the API's own shape.
        error = as_api_error(exc)
        record_error(request, error)
        yield wire.failure(error)
    finally:
        first.cancel()  # the client left while waiting: the generation goes with it


def _frames(wire: Wire, batch: list[Event | Finished]) -> bytes:
    """A batch's events, framed: one send for them all, each still its own SSE event."""
    if len(batch) == 1:
        item = batch[0]
        return wire.event(item) if isinstance(item, Event) else wire.closing(item)
    return b"".join(
        wire.event(item) if isinstance(item, Event) else wire.closing(item) for item in batch
    )


async def _collect(batches: AsyncIterator[list[Event | Finished]], wire: Wire) -> dict[str, Any]:
    async for batch in batches:
        for item in batch:
            if isinstance(item, Event):
                wire.add(item)
            else:
                return wire.body(item)
    raise RuntimeError("generation ended without a finish")  # the service always finishes


async def respond(
    request: Request,
    service: GenerationService,
    settings: Settings,
    job: PreparedGeneration,
    wire: Wire,
    *,
    stream: bool,
    arrived: float,
) -> Response:
    """One generation path: streamed as SSE, or the same events collected into JSON."""
    items = observed(request, service, job, arrived)
    if not stream:
        collected = await _unless_disconnected(request, _collect(items, wire))
        if collected is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(collected)
    return event_stream(
        _stream_events(request, items, wire, settings.sse_keepalive_s),
        keepalive_s=settings.sse_keepalive_s,
        headers=SSE_HEADERS,
        keepalive=wire.keepalive,
    )


async def _unless_disconnected(
    request: Request, collecting: Coroutine[Any, Any, dict[str, Any]]
) -> dict[str, Any] | None:
    """The collected response, or None if the client left first.

    A buffered request has no stream whose send would fail, so its client's disconnect is
    watched for here: a client that gives up on a queued or running request cancels it (it
    leaves the queue, or its slot is freed within a step) instead of it running to the end
    for nobody.
    """
    collect = asyncio.ensure_future(collecting)
    disconnect = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (collect, disconnect):
            if not task.done():
                task.cancel()
    if collect.done() and not collect.cancelled():
        return collect.result()
    with suppress(asyncio.CancelledError):
        await collect
    return None


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read before the route ran)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def respond_each(
    request: Request,
    service: GenerationService,
    settings: Settings,
    jobs: list[PreparedGeneration],
    wires: list[Wire],
    *,
    stream: bool,
    arrived: float,
) -> Response:
    """Several generations of one request (``/infill``'s ``n_cmpl``), each on its own wire:
    buffered, a JSON array of their bodies in order; streamed, their events as they come,
    interleaved (each carries its own index)."""
    if len(jobs) == 1:
        return await respond(
            request, service, settings, jobs[0], wires[0], stream=stream, arrived=arrived
        )
    if not stream:
        collecting = asyncio.gather(
            *(
                _collect(observed(request, service, job, arrived), wire)
                for job, wire in zip(jobs, wires, strict=True)
            )
        )
        bodies = await _unless_disconnected(request, _as_list(collecting))
        if bodies is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(bodies)
    return event_stream(
        _interleaved(request, service, settings, jobs, wires, arrived),
        keepalive_s=settings.sse_keepalive_s,
        headers=SSE_HEADERS,
        keepalive=wires[0].keepalive,
    )


async def _as_list(gathering: asyncio.Future[list[dict[str, Any]]]) -> Any:
    try:
        return list(await gathering)
    finally:
        gathering.cancel()


async def _interleaved(
    request: Request,
    service: GenerationService,
    settings: Settings,
    jobs: list[PreparedGeneration],
    wires: list[Wire],
    arrived: float,
) -> AsyncGenerator[bytes, None]:
    """The streams of several generations merged: each is framed by its own wire as in
    ``respond``; the merged stream ends when the last of them has."""
    frames: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def pump(job: PreparedGeneration, wire: Wire) -> None:
        try:
            events = _stream_events(
                request, observed(request, service, job, arrived), wire, settings.sse_keepalive_s
            )
            async for chunk in events:
                await frames.put(chunk)
        finally:
            await frames.put(None)

    pumps = [asyncio.ensure_future(pump(job, wire)) for job, wire in zip(jobs, wires, strict=True)]
    try:
        running = len(pumps)
        while running:
            chunk = await frames.get()
            if chunk is None:
                running -= 1
            else:
                yield chunk
    finally:
        for task in pumps:
            task.cancel()
