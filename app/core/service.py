"""The generation service: one generation path for streamed and buffered responses.

A request is first prepared (``app.core.prepare``: every 4xx decided, a place admitted), then
``generate()`` runs it on the backend and yields the answer's deltas as they are decoded,
then exactly one ``Finished``; the buffered response is that stream collected, so the two
cannot disagree. The engine calls ``on_token`` on the event loop for every sampled token;
``on_token`` runs the text pipeline (``app.text``) and puts the deltas into the generation's
``Output``, from which the response takes them. A client that reads slowly pauses its own
generation (``app.core.output``), one that leaves makes ``on_token`` answer False at the next
token, and a request still queued or prefilling when its client leaves is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence

from app.core.admission import Admission
from app.core.chat_prompt import ChatSemantics
from app.core.infill import FimRequest
from app.core.limits import Limits
from app.core.output import Failed, Output
from app.core.prepare import PreparedGeneration, Preparer
from app.core.requests import ChatRequest, Sampling, TextRequest
from app.core.results import Event, Finished, FinishReason, PhaseTimes
from app.engine import Backend, Flow, TokenLogprobs
from app.errors import ApiError, as_api_error
from app.settings import ReasoningFormat, Settings
from app.text import TextPipeline

logger = logging.getLogger(__name__)


class GenerationService:
    """What routes call: prepare a request, then generate it; and the few facts about the
    served model that responses carry. Routes never reach into the engine."""

    def __init__(
        self,
        backend: Backend,
        *,
        model_names: Sequence[str],
        stream_buffer_tokens: int,
        semantics: ChatSemantics | None = None,
        max_queue: int | None = None,
        request_timeout_s: float | None = None,
        max_tokens_limit: int | None = None,
        limits: Limits | None = None,
        completions_parse_special: bool = True,
        accept_any_model: bool = False,
        fim_window: int = 1024,
    ) -> None:
        self.backend = backend
        self.semantics = semantics or ChatSemantics()
        self.admission = Admission(
            backend.max_concurrency, max_queue=max_queue, timeout_s=request_timeout_s
        )
        self._preparer = Preparer(
            backend,
            self.admission,
            model_names=model_names,
            semantics=self.semantics,
            max_tokens_limit=max_tokens_limit,
            limits=limits,
            completions_parse_special=completions_parse_special,
            accept_any_model=accept_any_model,
            fim_window=fim_window,
        )
        self.model_id = self._preparer.model_id
        self._buffer = stream_buffer_tokens
        self._running: set[asyncio.Task[None]] = set()

    @classmethod
    def from_settings(
        cls, backend: Backend, settings: Settings, model_names: Sequence[str]
    ) -> GenerationService:
        return cls(
            backend,
            model_names=model_names,
            stream_buffer_tokens=settings.stream_buffer_tokens,
            semantics=ChatSemantics(
                reasoning_format=settings.reasoning_format,
                enable_thinking=settings.enable_thinking,
                tool_call_format=settings.tool_call_format,
                reasoning_budget=settings.reasoning_budget,
            ),
            max_queue=settings.max_queue,
            request_timeout_s=settings.request_timeout_s,
            max_tokens_limit=settings.max_tokens_limit,
            limits=Limits.from_settings(settings),
            completions_parse_special=settings.completions_parse_special,
            fim_window=settings.fim_window,
            accept_any_model=settings.accept_any_model,
        )

    @property
    def n_ctx(self) -> int:
        """Tokens one request may use, prompt and completion together."""
        return self.backend.info.n_ctx

    @property
    def reasoning_format(self) -> ReasoningFormat:
        return self.semantics.reasoning_format

    def token_bytes(self, token_id: int) -> bytes:
        """A token's bytes, for logprobs."""
        return self.backend.tokenizer.token_bytes(token_id)

    async def prepare_chat(
        self, req: ChatRequest, *, fit_max_tokens: bool = False
    ) -> PreparedGeneration:
        return await self._preparer.chat(req, fit_max_tokens=fit_max_tokens)

    async def count_chat_tokens(self, req: ChatRequest) -> int:
        """The prompt tokens the request would decode (nothing is admitted or generated)."""
        return await self._preparer.count_chat(req)

    async def prepare_completion(self, req: TextRequest) -> PreparedGeneration:
        return await self._preparer.completion(req)

    async def prepare_infill(
        self, fim: FimRequest, *, model: str | None, sampling: Sampling
    ) -> list[PreparedGeneration]:
        """One prepared generation per completion asked (``fim.n_cmpl``), of one prompt."""
        return await self._preparer.infill(fim, model=model, sampling=sampling)

    async def aclose(self) -> None:
        """Cancel this service's generations still on the engine (the app is shutting down)."""
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.wait(list(self._running))

    async def generate(self, job: PreparedGeneration) -> AsyncIterator[list[Event | Finished]]:
        """Answer deltas as the engine produces them, then exactly one ``Finished``, in
        batches: each batch is everything decoded since the consumer last asked (one item
        while it keeps up with the engine).

        Leaving the iteration early (client gone) cancels the generation: a queued one never
        starts, a running one stops within one decode step.
        """
        flow = Flow()
        output: Output[Event | Finished] = Output(self._buffer, flow)
        task = asyncio.create_task(self._run(job, output, flow, time.perf_counter()))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

        def abort(error: ApiError) -> None:
            output.fail(error)
            task.cancel()

        job.ticket.start(abort)
        try:
            while True:
                batch = await output.get()
                items = [item for item in batch if not isinstance(item, Failed)]
                if items:
                    yield items
                if len(items) < len(batch):
                    failure = next(item for item in batch if isinstance(item, Failed))
                    raise as_api_error(failure.error) from failure.error
                if isinstance(items[-1], Finished):
                    return
        finally:
            job.ticket.release()
            output.close()
            task.cancel()

    async def _run(
        self,
        job: PreparedGeneration,
        output: Output[Event | Finished],
        flow: Flow,
        submitted: float,
    ) -> None:
        """One generation on the engine, every outcome put into ``output``."""
        pipeline = TextPipeline(self.backend.tokenizer.token_bytes, job.text)
        first_token: list[float] = []
        pending: list[TokenLogprobs] = []  # logprobs of tokens whose text is not out yet

        def on_token(token_id: int) -> bool:
            if not first_token:
                first_token.append(time.perf_counter())
            for delta in pipeline.push(token_id):
                output.put(Event(delta, tuple(pending)))
                pending.clear()
            return not pipeline.finished and not output.closed

        try:
            result = await self.backend.generate(
                job.prompt_tokens,
                job.sampling,
                job.max_tokens,
                on_token,
                on_logprobs=pending.append if job.sampling.top_logprobs is not None else None,
                flow=flow,
            )
        except Exception as exc:
            output.fail(exc)
            return
        ended = time.perf_counter()
        if result.finish_reason == "cancelled" and not pipeline.finished:
            return  # the client left (or the request was aborted): nobody is reading
        pending.clear()  # end-of-turn and stop-string tokens have no text to carry them
        for delta in pipeline.finish(cut=result.finish_reason == "length"):
            output.put(Event(delta))
        finish: FinishReason = "length" if result.finish_reason == "length" else "stop"
        if finish == "stop" and pipeline.tool_calls:
            finish = "tool_calls"
        first = first_token[0] if first_token else ended
        output.put(
            Finished(
                finish_reason=finish,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                cached_tokens=result.cached_tokens,
                times=PhaseTimes(
                    queue_ms=(result.started - submitted) * 1000,
                    prompt_ms=(first - result.started) * 1000,
                    decode_ms=(ended - first) * 1000,
                ),
                stop_sequence=pipeline.stop_sequence,
                reasoning_tokens=min(pipeline.reasoning_tokens, result.completion_tokens),
                line_limit=pipeline.line_limit,
                truncated=job.truncated,
            )
        )
