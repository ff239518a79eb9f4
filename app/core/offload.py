"""Work that grows with a request runs on a worker thread once it is large enough to hold up
the event loop; smaller work runs in place, since a thread hop costs more than it does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, TypeVar

Args = ParamSpec("Args")
Result = TypeVar("Result")

INLINE_TOKENIZE_CHARS = 4096
"""Prompts up to this long are rendered and tokenized on the event loop."""
INLINE_SCHEMA_BYTES = 16 * 1024
"""Schemas up to this large (all of a request's together) become a grammar on the event loop."""


async def offloaded(
    offload: bool, work: Callable[Args, Result], *args: Args.args, **kwargs: Args.kwargs
) -> Result:
    """``work`` on a worker thread when ``offload``, else right here."""
    if offload:
        return await asyncio.to_thread(work, *args, **kwargs)
    return work(*args, **kwargs)
