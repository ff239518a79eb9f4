"""``POST /infill`` request bodies, as llama-server takes them from editors.

The fields are llama-server's (``tools/server``: ``post_infill``, ``params_from_json_cmpl``),
which llama.vim and llama.vscode send. What is honoured: ``input_prefix``, ``input_suffix``,
``input_extra`` (``[{text, filename}]``; other keys such as llama.vim's ``time`` ignored),
``prompt`` (the text typed on the cursor's line: it follows the prefix, as llama-server's code
puts it), ``n_predict`` (-1: no limit; 0: fill the cache only, the editors' warm-up),
``n_indent``, ``t_max_predict_ms``, ``stop``, the sampling fields, ``samplers``, ``n_cmpl``,
``stream`` and ``response_fields``. Accepted and left to the server: ``cache_prompt`` (the
cache is always used: under greedy decoding a completion over reused cells equals one over a
fresh prefill), ``id_slot`` (slots are chosen by what they hold), ``t_max_prompt_ms``
(llama-server takes it and does not apply it either).

``samplers`` names the sampling stages that run: a stage not named is off (top-k 0, top-p 1,
min-p 0, temperature 1: llama.cpp's chain without that sampler). llama-server's ``infill``
sampler (which llama.vim asks for) has no counterpart here; it is left out of the chain, and
the request otherwise served.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from pydantic import Field, field_validator

from app.api.openai.requests import INT32_MAX, GenerationRequest, RequestModel
from app.api.openai.to_core import sampling_of
from app.core.infill import EXTRA_FILE, ExtraChunk, FimRequest
from app.core.requests import Sampling

logger = logging.getLogger(__name__)

MAX_N_CMPL = 64
"""Most completions one request may ask for (more than any slot count)."""

_NEUTRAL: dict[str, Any] = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "temperature": 1.0}
"""Each optional sampling stage's value that turns it off."""


class InfillChunk(RequestModel):
    text: str
    filename: str = EXTRA_FILE


class InfillRequest(GenerationRequest):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[InfillChunk] = Field(default_factory=list)
    prompt: str = ""
    n_predict: int | None = Field(None, ge=-1, le=INT32_MAX)
    n_indent: int = Field(0, ge=0, le=INT32_MAX)
    t_max_predict_ms: float = Field(0.0, ge=0.0)
    t_max_prompt_ms: float | None = None
    samplers: list[str] | str | None = None
    cache_prompt: bool = True
    id_slot: int = -1
    n_cmpl: int = Field(1, ge=1, le=MAX_N_CMPL)
    response_fields: list[str] | None = None

    @field_validator("samplers")
    @classmethod
    def _sampler_names(cls, value: list[str] | str | None) -> list[str] | None:
        """llama-server takes the chain as a list, or as one string of its one-letter codes."""
        if isinstance(value, str):
            codes = {"k": "top_k", "p": "top_p", "m": "min_p", "t": "temperature"}
            return [codes.get(code, code) for code in value]
        return value

    def sampling(self) -> Sampling:
        """The request's sampling, the stages ``samplers`` leaves out turned off."""
        if not self.samplers:  # absent: llama.cpp's default chain; empty: the warm-up's
            return sampling_of(self)
        named = set(self.samplers)
        off = {name: value for name, value in _NEUTRAL.items() if name not in named}
        return replace(sampling_of(self), **off)

    def fim(self) -> FimRequest:
        return FimRequest(
            prefix=self.input_prefix,
            suffix=self.input_suffix,
            middle=self.prompt,
            extra=tuple(ExtraChunk(chunk.text, chunk.filename) for chunk in self.input_extra),
            n_predict=None if self.n_predict is None or self.n_predict < 0 else self.n_predict,
            stop=tuple(self.stop_list()),
            n_indent=self.n_indent,
            t_max_predict_ms=self.t_max_predict_ms,
            n_cmpl=self.n_cmpl,
        )
