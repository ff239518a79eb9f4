"""Route dependencies: the service and settings of the app serving the request.

They are ``async`` though they never wait: FastAPI runs a plain ``def`` dependency on a worker
thread, a hop per dependency in every request's time to first token.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.core.service import GenerationService
from app.errors import Unavailable
from app.settings import Settings


async def get_service(request: Request) -> GenerationService:
    service: GenerationService | None = getattr(request.app.state, "service", None)
    if service is None:
        raise Unavailable("The model is still loading; retry shortly.", code="model_loading")
    return service


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


ServiceDep = Annotated[GenerationService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
