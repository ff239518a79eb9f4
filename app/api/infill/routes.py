"""``POST /infill``: fill-in-the-middle code completion for editors, llama-server's API.

llama.vim and llama.vscode post here (``app.api.infill.requests`` for the fields, and
``app.api.infill.wire`` for the answer); the prompt is the model's own FIM format
(``app.core.infill``). ``/v1/completions`` with OpenAI's ``suffix`` builds the same prompt.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.http.deps import ServiceDep, SettingsDep
from app.api.http.generation import read_body, respond_each
from app.api.http.wire import Wire
from app.api.infill.requests import InfillRequest
from app.api.infill.wire import InfillWire, generation_settings

router = APIRouter()


@router.post("/infill", response_model=None)
async def infill(request: Request, service: ServiceDep, settings: SettingsDep) -> Response:
    arrived = time.perf_counter()
    body = await read_body(request, InfillRequest)
    jobs = await service.prepare_infill(body.fim(), model=body.model, sampling=body.sampling())
    n_ctx = service.n_ctx
    wires: list[Wire] = [
        InfillWire(
            service.model_id,
            index=index,
            response_fields=body.response_fields,
            settings=generation_settings(job, n_ctx=n_ctx, model=service.model_id),
        )
        for index, job in enumerate(jobs)
    ]
    return await respond_each(
        request, service, settings, jobs, wires, stream=body.stream, arrived=arrived
    )
