"""``POST /v1/responses``: OpenAI's Responses API, stateless, streamed or buffered.

The request is translated into a chat completion request (``app.api.responses.requests``),
prepared and generated exactly as ``/v1/chat/completions`` is, and answered through the
Responses wire (``app.api.responses.wire``).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.http.deps import ServiceDep, SettingsDep
from app.api.http.generation import read_body, respond
from app.api.http.hosted_tools import UnsupportedTools
from app.api.openai.to_core import chat_request
from app.api.responses.requests import ResponsesRequest, responses_as_chat
from app.api.responses.wire import ResponsesWire

router = APIRouter()


@router.post("/v1/responses", response_model=None)
async def responses(request: Request, service: ServiceDep, settings: SettingsDep) -> Response:
    arrived = time.perf_counter()
    body = await read_body(request, ResponsesRequest)
    unsupported = UnsupportedTools(reject=settings.reject_unsupported_tools)
    translation = responses_as_chat(body, unsupported)
    unsupported.report(request, "responses")
    job = await service.prepare_chat(chat_request(translation.chat))
    wire = ResponsesWire(service.model_id, body, translation)
    return await respond(request, service, settings, job, wire, stream=body.stream, arrived=arrived)
