"""``/infill`` responses as llama-server writes them (``to_json_non_oaicompat``).

A buffered response is one object: ``content``, ``stop: true``, ``stop_type`` (``eos``: the
model ended the middle; ``limit``: ``n_predict``, ``n_indent`` or ``t_max_predict_ms``;
``word``: a stop string, in ``stopping_word``), ``tokens_predicted``, ``tokens_evaluated`` (the
prompt's tokens), ``tokens_cached`` (prompt tokens served from the KV cache, not decoded),
``truncated`` (the prompt was cut to fit), ``timings`` (llama-server's keys, ``cache_n`` and
``prompt_n`` among them). ``response_fields`` picks keys, flattened (``"timings/prompt_n"``),
as llama-server's ``json_get_nested_values`` does; a path that is not there is left out (the
warm-up's ``[""]`` gives ``{}``). A stream is bare ``data:`` events: ``{"content", "stop":
false}`` per delta, then the final object with an empty ``content``; no ``[DONE]``. With
``n_cmpl`` every object carries its completion's ``index``.

``tokens_cached`` here is what its name and llama-server's README say, the prompt tokens reused;
llama-server's code reports every token its slot holds at the end, completion included.
"""

from __future__ import annotations

import json
from typing import Any

from app.api.http.sse import frame
from app.api.openai.formats import Answer, timings_of
from app.core.prepare import PreparedGeneration
from app.core.results import Event, Finished
from app.errors import ApiError


def compact(value: Any) -> str:
    """JSON without spaces, as llama-server writes it: llama.vim finds the completion in the
    raw text by ``"content":"`` and shows nothing when a space follows the colon."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def generation_settings(job: PreparedGeneration, *, n_ctx: int, model: str) -> dict[str, Any]:
    """What the completion ran with, under llama-server's names (llama.vscode reads
    ``generation_settings.n_ctx`` for its status line)."""
    sampling = job.sampling
    return {
        "n_ctx": n_ctx,
        "n_predict": job.max_tokens,
        "model": model,
        "seed": sampling.seed if sampling.seed is not None else -1,
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "min_p": sampling.min_p,
        "repeat_penalty": sampling.repeat_penalty,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "stop": list(job.text.stop),
        "n_indent": job.text.n_indent,
        "t_max_predict_ms": job.text.t_max_predict_ms,
    }


def timings(finished: Finished) -> dict[str, float | int]:
    """The completion routes' ``timings`` with llama-server's two per-token figures added."""
    t = timings_of(finished)
    return {
        **t.model_dump(),
        "prompt_per_token_ms": round(t.prompt_ms / t.prompt_n, 3) if t.prompt_n else 0.0,
        "predicted_per_token_ms": (
            round(t.predicted_ms / t.predicted_n, 3) if t.predicted_n else 0.0
        ),
    }


def stop_type(finished: Finished) -> str:
    if finished.stop_sequence is not None:
        return "word"
    if finished.finish_reason == "length" or finished.line_limit is not None:
        return "limit"
    return "eos"


def picked(fields: list[str] | None, result: dict[str, Any]) -> dict[str, Any]:
    """``result`` reduced to ``fields`` (slash-separated paths), or whole without them."""
    if fields is None:
        return result
    out: dict[str, Any] = {}
    for path in fields:
        value: Any = result
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            out[path] = value
    return out


class InfillWire:
    """One completion of an ``/infill`` request (``index``) on the wire."""

    def __init__(
        self,
        model: str,
        *,
        index: int,
        response_fields: list[str] | None,
        settings: dict[str, Any],
    ) -> None:
        self._model = model
        self._index = index
        self._settings = settings
        self._fields = response_fields
        self._answer = Answer()
        self._new_line = False

    def keepalive(self) -> None:
        return None

    def waiting(self) -> bytes:
        return b""

    def opening(self) -> bytes:
        return b""

    def event(self, event: Event) -> bytes:
        text = event.delta.content
        self._new_line = self._new_line or "\n" in text
        payload = {"index": self._index, "content": text, "tokens": [], "stop": False}
        return frame(compact(payload))

    def closing(self, finished: Finished) -> bytes:
        result = self._result("", finished)
        return frame(compact(result))

    def failure(self, error: ApiError) -> bytes:
        return frame(compact(error.envelope()))

    def add(self, event: Event) -> None:
        self._answer.add(event)

    def body(self, finished: Finished) -> dict[str, Any]:
        content = "".join(self._answer.content)
        self._new_line = "\n" in content
        return self._result(content, finished)

    def _result(self, content: str, finished: Finished) -> dict[str, Any]:
        result = {
            "index": self._index,
            "content": content,
            "tokens": [],
            "id_slot": -1,
            "stop": True,
            "model": self._model,
            "tokens_predicted": finished.completion_tokens,
            "tokens_evaluated": finished.prompt_tokens,
            "generation_settings": self._settings,
            "has_new_line": self._new_line,
            "truncated": finished.truncated,
            "stop_type": stop_type(finished),
            "stopping_word": finished.stop_sequence or "",
            "tokens_cached": finished.cached_tokens,
            "timings": timings(finished),
        }
        return picked(self._fields, result)
