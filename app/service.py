"""The generation service: one generation path for streamed and buffered responses.

A request is first *prepared* on the event loop side (prompt rendered and tokenized on a
helper thread, context length checked) so that every 4xx is decided before a stream starts.
Then ``generate()`` runs the backend on the single engine thread and yields text deltas and
one final ``Finished`` as they happen; the buffered response is that stream collected.

Concurrency: one llama.cpp context decodes one sequence at a time, so the engine is a
one-thread executor. Its queue is the arrival order, a running generation is never
interrupted by a newer request (llama-cpp-python's bundled server does interrupt it), and a
request whose client leaves while it waits is taken out of the queue. Tokens cross from the
engine thread to the response through a bounded channel: a client that reads slowly makes the
engine wait instead of letting text pile up in memory, and a client that leaves makes
``on_token`` return False at the next token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from app.backends import Backend, GenerationResult, SamplingParams
from app.chat_template import ChatTemplate
from app.errors import ContextLengthExceeded, InvalidRequest, NotFound, as_api_error
from app.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, GenerationRequest
from app.textstream import TextStream

logger = logging.getLogger(__name__)

DEFAULT_SAMPLING = SamplingParams()


@dataclass(frozen=True)
class PreparedGeneration:
    """A validated request in engine terms."""

    prompt_tokens: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop: tuple[str, ...]


@dataclass(frozen=True)
class Finished:
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_Item = str | Finished | _Failed


class _Channel:
    """Bounded engine-thread -> event-loop channel.

    ``put`` blocks the engine thread while ``capacity`` items wait unread; ``close`` (the
    consumer left) makes every later ``put`` return False at once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, capacity: int) -> None:
        self._loop = loop
        self._items: deque[_Item] = deque()
        self._ready = asyncio.Event()
        self._free = threading.Semaphore(capacity)
        self._closed = threading.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def put(self, item: _Item) -> bool:
        while not self._free.acquire(timeout=0.05):
            if self._closed.is_set():
                return False
        if self._closed.is_set():
            return False
        try:
            self._loop.call_soon_threadsafe(self._deliver, item)
        except RuntimeError:  # the event loop is gone (shutdown)
            self._closed.set()
            return False
        return True

    def _deliver(self, item: _Item) -> None:
        self._items.append(item)
        self._ready.set()

    async def get(self) -> _Item:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        self._free.release()
        return self._items.popleft()

    def close(self) -> None:
        self._closed.set()


def _sampling(req: GenerationRequest) -> SamplingParams:
    d = DEFAULT_SAMPLING
    return SamplingParams(
        temperature=d.temperature if req.temperature is None else req.temperature,
        top_p=d.top_p if req.top_p is None else req.top_p,
        top_k=d.top_k if req.top_k is None else req.top_k,
        min_p=d.min_p if req.min_p is None else req.min_p,
        repeat_penalty=d.repeat_penalty if req.repeat_penalty is None else req.repeat_penalty,
        presence_penalty=(
            d.presence_penalty if req.presence_penalty is None else req.presence_penalty
        ),
        frequency_penalty=(
            d.frequency_penalty if req.frequency_penalty is None else req.frequency_penalty
        ),
        seed=req.seed,
    )


def _template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates read it (content always a string, as Qwen's expects)."""
    role = "system" if message.role == "developer" else message.role
    out: dict[str, Any] = {"role": role, "content": message.text()}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.reasoning_content is not None:
        out["reasoning_content"] = message.reasoning_content
    return out


class GenerationService:
    def __init__(
        self, backend: Backend, *, model_names: Sequence[str], stream_buffer_tokens: int
    ) -> None:
        self.backend = backend
        self.model_id = model_names[0]
        self._model_names = frozenset(model_names)
        self._buffer = stream_buffer_tokens
        info = backend.info
        self._template = (
            ChatTemplate(info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
            if info.chat_template
            else None
        )
        self._engine = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    def close(self) -> None:
        """Drop queued generations and wait for the running one (its client is gone)."""
        self._engine.shutdown(wait=True, cancel_futures=True)

    def check_model(self, requested: str | None) -> None:
        """404 unless the request names the served model or its alias (or names none)."""
        if requested and requested not in self._model_names:
            raise NotFound(
                f"The model '{requested}' does not exist; this server serves '{self.model_id}'.",
                param="model",
                code="model_not_found",
            )

    async def prepare_chat(self, req: ChatCompletionRequest) -> PreparedGeneration:
        self.check_model(req.model)
        if self._template is None:
            raise InvalidRequest(
                "This model has no chat template; use /v1/completions or start the server "
                "with --chat-template-file."
            )
        prompt = self._template.render(
            [_template_message(m) for m in req.messages],
            add_generation_prompt=True,
            extra=req.chat_template_kwargs,
        )
        tokens = await asyncio.to_thread(self.backend.tokenizer.tokenize, prompt)
        return self._prepared(req, tokens, req.completion_limit(), param="messages")

    async def prepare_completion(self, req: CompletionRequest) -> PreparedGeneration:
        self.check_model(req.model)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            tokens = [int(t) for t in prompt]
            n_vocab = self.backend.info.n_vocab
            if any(t < 0 or t >= n_vocab for t in tokens):
                raise InvalidRequest(f"prompt token ids must be in [0, {n_vocab})", param="prompt")
        else:
            text = prompt if isinstance(prompt, str) else str(prompt[0])
            tokens = await asyncio.to_thread(self.backend.tokenizer.tokenize, text)
        return self._prepared(req, tokens, req.max_tokens, param="prompt")

    def _prepared(
        self,
        req: GenerationRequest,
        tokens: Sequence[int],
        requested_max: int | None,
        *,
        param: str,
    ) -> PreparedGeneration:
        if not tokens:
            raise InvalidRequest("The prompt is empty after tokenization.", param=param)
        n_ctx = self.backend.info.n_ctx
        room = n_ctx - len(tokens)
        if room < 1 or (requested_max is not None and requested_max > room):
            raise ContextLengthExceeded(
                n_ctx=n_ctx,
                prompt_tokens=len(tokens),
                max_tokens=requested_max or 1,
                param=param,
            )
        return PreparedGeneration(
            prompt_tokens=list(tokens),
            sampling=_sampling(req),
            max_tokens=requested_max if requested_max is not None else room,
            stop=tuple(req.stop_list()),
        )

    async def generate(self, job: PreparedGeneration) -> AsyncIterator[str | Finished]:
        """Text deltas as the engine produces them, then exactly one ``Finished``.

        Leaving the iteration early (client gone) cancels the generation: a queued one never
        starts, a running one stops at its next token.
        """
        loop = asyncio.get_running_loop()
        channel = _Channel(loop, self._buffer)
        future = loop.run_in_executor(self._engine, self._run, job, channel)
        try:
            while True:
                item = await channel.get()
                if isinstance(item, _Failed):
                    raise as_api_error(item.error) from item.error
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            channel.close()
            future.cancel()
            future.add_done_callback(_log_engine_failure)

    def _run(self, job: PreparedGeneration, channel: _Channel) -> None:
        """Engine thread: one generation, every outcome delivered through the channel."""
        if channel.closed:
            return
        text = TextStream(self.backend.tokenizer.token_bytes, job.stop)

        def on_token(token_id: int) -> bool:
            delta = text.push(token_id)
            if delta and not channel.put(delta):
                return False
            return not text.stopped and not channel.closed

        try:
            result: GenerationResult = self.backend.generate(
                job.prompt_tokens, job.sampling, job.max_tokens, on_token
            )
        except Exception as exc:
            channel.put(_Failed(exc))
            return
        if result.finish_reason == "cancelled" and not text.stopped:
            return  # the client left; nobody is reading
        tail = text.finish()
        if tail:
            channel.put(tail)
        channel.put(
            Finished(
                finish_reason="stop" if result.finish_reason != "length" else "length",
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                cached_tokens=result.cached_tokens,
            )
        )


def _log_engine_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("engine thread failed", exc_info=future.exception())
