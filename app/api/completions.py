"""``POST /v1/completions``: OpenAI text completions from a raw prompt (text or token ids)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.deps import ServiceDep, SettingsDep
from app.api.formats import CompletionFormat
from app.api.generation import read_body, respond
from app.api.schemas import CompletionRequest
from app.api.wire import ChunkWire

router = APIRouter()


@router.post("/v1/completions", response_model=None)
async def completions(request: Request, service: ServiceDep, settings: SettingsDep) -> Response:
    arrived = time.perf_counter()
    body = await read_body(request, CompletionRequest)
    job = await service.prepare_completion(body)
    return await respond(
        request,
        service,
        settings,
        job,
        ChunkWire(CompletionFormat(service.model_id), include_usage=body.include_usage),
        stream=body.stream,
        arrived=arrived,
    )
