"""What a generation yields, as the routes and formats see it: deltas, then one ``Finished``.

Plain data: the wires and the metrics read these, not the service; the only engine type here
is the logprobs record a token carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from app.engine.protocol import TokenLogprobs
from app.text import Delta

FinishReason = Literal["stop", "length", "tool_calls"]
"""As OpenAI reports it: ``stop`` (end of turn or a stop string), ``length`` (max_tokens),
``tool_calls`` (the answer is one or more calls)."""


@dataclass(frozen=True)
class Event:
    """One delta of the answer, with the logprobs of the tokens it completed (if asked)."""

    delta: Delta
    logprobs: tuple[TokenLogprobs, ...] = field(default=())


@dataclass(frozen=True)
class PhaseTimes:
    """Where a generation's time went, in milliseconds (llama-server's ``timings``)."""

    queue_ms: float
    """Waiting for the engine: admission to the start of prefill."""
    prompt_ms: float
    """Prefill: from then to the first sampled token."""
    decode_ms: float
    """From the first sampled token to the last."""


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    times: PhaseTimes = field(default=PhaseTimes(0.0, 0.0, 0.0))
    stop_sequence: str | None = None
    """The stop string that ended the generation (``finish_reason`` ``stop``), if one did:
    Anthropic's ``stop_reason`` tells it apart from the end of the model's turn."""
    reasoning_tokens: int = 0
    """Completion tokens spent in the ``<think>`` block (``TextPipeline.reasoning_tokens``)."""
    line_limit: str | None = None
    """The editor's line limit that ended the generation (``n_indent``, ``t_max_predict_ms``)."""
    truncated: bool = False
    """The prompt was cut to fit (a fill-in-the-middle prompt's far context left out)."""
