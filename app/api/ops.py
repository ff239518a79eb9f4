"""What clients and operators ask besides generations: ``/v1/models``, ``/health``,
``/metrics``. Each answers HEAD as well as GET (load balancers probe with HEAD)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.api.http.deps import ServiceDep
from app.api.http.metrics import Metrics
from app.api.openai.objects import ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models")
@router.head("/v1/models", include_in_schema=False)
async def list_models(service: ServiceDep, request: Request) -> ModelList:
    created: int = request.app.state.started_at
    n_ctx = service.n_ctx
    card = ModelCard(
        id=service.model_id, created=created, context_length=n_ctx, max_model_len=n_ctx
    )
    return ModelList(data=[card])


@router.get("/metrics", response_model=None)
@router.head("/metrics", response_model=None, include_in_schema=False)
async def metrics(request: Request) -> Response:
    exported: Metrics = request.app.state.metrics
    return Response(exported.exposition(), media_type=exported.content_type)


@router.get("/health", response_model=None)
@router.head("/health", response_model=None, include_in_schema=False)
async def health(request: Request) -> JSONResponse:
    status: str = request.app.state.load_status
    return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)
