"""SIGTERM drains before the server stops.

New requests get 503 (``/health`` says ``draining``), running ones get ``--shutdown-grace-s`` to
finish and then end with an in-band error and ``[DONE]``; only then is the signal handed on to
uvicorn, whose own graceful shutdown would otherwise cancel the streams mid-token after its
timeout.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

from fastapi import FastAPI

from app.core.service import GenerationService

logger = logging.getLogger(__name__)


async def drain(app: FastAPI, grace_s: float) -> None:
    """Stop admitting (503), let running generations finish for ``grace_s``, end the rest."""
    service: GenerationService | None = app.state.service
    if service is None:
        return
    app.state.load_status = "draining"
    logger.info(
        "draining: %d request(s) in flight, grace %.1fs", service.admission.in_flight, grace_s
    )
    await service.admission.drain(grace_s)


def drain_on_sigterm(app: FastAPI, grace_s: float) -> Callable[[], None]:
    """Make SIGTERM drain the app first, then pass it on to the previous handler (uvicorn's).

    Signals reach only the main thread; an app served from another thread (the tests' live
    servers) keeps the server's own handling. A second SIGTERM passes on at once.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)
    signalled: list[int] = []
    draining: list[asyncio.Task[None]] = []

    def pass_on() -> None:
        signal.signal(signal.SIGTERM, previous)
        if callable(previous):
            previous(signal.SIGTERM, None)
        else:
            signal.raise_signal(signal.SIGTERM)

    async def drain_then_pass_on() -> None:
        try:
            await drain(app, grace_s)
        finally:
            pass_on()

    def start_draining() -> None:
        draining.append(loop.create_task(drain_then_pass_on()))

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if signalled:
            pass_on()
            return
        signalled.append(signum)
        loop.call_soon_threadsafe(start_draining)

    signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, previous)

    return restore
