"""OpenAI's chat and text completions on the wire: they differ only in their chunk shapes
(``app.api.openai.formats``), so one adapter puts either on the wire: bare ``data:`` chunks,
``[DONE]`` last, errors in the OpenAI envelope."""

from __future__ import annotations

import json
from typing import Any

from app.api.http.sse import frame
from app.api.openai.formats import Answer, Format, usage_of
from app.core.results import Event, Finished
from app.errors import ApiError

DONE = frame("[DONE]")


class ChunkWire:
    """An OpenAI chunk format on the wire: ``data:`` chunks, then ``[DONE]``."""

    def __init__(self, fmt: Format, *, include_usage: bool) -> None:
        self._fmt = fmt
        self._include_usage = include_usage
        self._answer = Answer()

    def keepalive(self) -> None:
        return None

    def waiting(self) -> bytes:
        return b""

    def opening(self) -> bytes:
        first = self._fmt.first_chunk()
        return b"" if first is None else frame(first.model_dump_json())

    def event(self, event: Event) -> bytes:
        return frame(self._fmt.event_json(event))

    def closing(self, finished: Finished) -> bytes:
        frames = frame(self._fmt.finish_chunk(finished).model_dump_json())
        if self._include_usage:
            frames += frame(self._fmt.usage_chunk(usage_of(finished)).model_dump_json())
        return frames + DONE

    def failure(self, error: ApiError) -> bytes:
        # Headers are gone: the error travels in-band, then the stream ends normally.
        return frame(json.dumps(error.envelope())) + DONE

    def add(self, event: Event) -> None:
        self._answer.add(event)

    def body(self, finished: Finished) -> dict[str, Any]:
        return self._fmt.response(self._answer, finished).model_dump()
