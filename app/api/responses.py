"""``POST /v1/responses``: OpenAI's Responses API, stateless, streamed or buffered.

The request is translated into a chat completion request (``app.api.responses_request``),
prepared and generated exactly as ``/v1/chat/completions`` is, and answered through the
Responses wire (``app.api.responses_format``).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.deps import ServiceDep, SettingsDep
from app.api.generation import read_body, respond
from app.api.hosted_tools import UnsupportedTools
from app.api.responses_format import ResponsesWire
from app.api.responses_request import ResponsesRequest, to_chat

router = APIRouter()


@router.post("/v1/responses", response_model=None)
async def responses(request: Request, service: ServiceDep, settings: SettingsDep) -> Response:
    arrived = time.perf_counter()
    body = await read_body(request, ResponsesRequest)
    unsupported = UnsupportedTools(reject=settings.reject_unsupported_tools)
    translation = to_chat(body, unsupported)
    unsupported.report(request, "responses")
    job = await service.prepare_chat(translation.chat)
    wire = ResponsesWire(service.model_id, body, translation)
    return await respond(request, service, settings, job, wire, stream=body.stream, arrived=arrived)
