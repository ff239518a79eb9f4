"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: Anthropic's Messages API.

The request is translated into a chat completion request (``app.api.anthropic.requests``),
prepared and generated exactly as ``/v1/chat/completions`` is, and answered through the
Messages wire (``app.api.anthropic.wire``). Errors on these paths, whatever raises them,
take Anthropic's shape (``app.api.http.error_handlers.error_body``). The ``?beta=true``
query Claude Code adds and the ``anthropic-beta`` / ``anthropic-version`` headers are accepted
and ignored.

``count_tokens`` renders and tokenizes the request exactly as a generation would, so its
``input_tokens`` is the prompt a generation of the same request then reports (its
``input_tokens`` plus ``cache_read_input_tokens``). It admits nothing: it is answered even
while every generation slot is busy.
"""

from __future__ import annotations

import time

from anthropic.types import MessageTokensCount
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.api.anthropic.requests import CountTokensRequest, MessagesRequest, messages_as_chat
from app.api.anthropic.wire import MessagesWire
from app.api.http.deps import ServiceDep, SettingsDep
from app.api.http.generation import read_body, respond
from app.api.http.hosted_tools import UnsupportedTools
from app.api.openai.to_core import chat_request

router = APIRouter()


@router.post("/v1/messages", response_model=None)
async def messages(request: Request, service: ServiceDep, settings: SettingsDep) -> Response:
    arrived = time.perf_counter()
    body = await read_body(request, MessagesRequest)
    unsupported = UnsupportedTools(reject=settings.reject_unsupported_tools)
    chat = messages_as_chat(body, unsupported)
    unsupported.report(request, "messages")
    job = await service.prepare_chat(chat_request(chat), fit_max_tokens=True)
    wire = MessagesWire(service.model_id, prompt_tokens=len(job.prompt_tokens))
    return await respond(request, service, settings, job, wire, stream=body.stream, arrived=arrived)


@router.post("/v1/messages/count_tokens", response_model=None)
async def count_tokens(request: Request, service: ServiceDep, settings: SettingsDep) -> Response:
    body = await read_body(request, CountTokensRequest)
    unsupported = UnsupportedTools(reject=settings.reject_unsupported_tools)
    chat = messages_as_chat(body, unsupported)
    unsupported.report(request, "messages_count_tokens")
    counted = MessageTokensCount(input_tokens=await service.count_chat_tokens(chat_request(chat)))
    return JSONResponse(counted.model_dump(mode="json"))
