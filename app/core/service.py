"""The generation service: one generation path for streamed and buffered responses.

A request is first *prepared* on the event loop side (prompt rendered and tokenized on a
helper thread, context length checked) so that every 4xx is decided before a stream starts.
Then ``generate()`` runs the backend on the single engine thread and yields text deltas and
one final ``Finished`` as they happen; the buffered response is that stream collected.

Concurrency: the engine executor has one thread per generation the backend runs at once
(one for ``LlamaBackend``, one per slot for the batching backend). Its queue is the arrival
order, a running generation is never interrupted by a newer request (llama-cpp-python's
bundled server does interrupt it), and a request whose client leaves while it waits is taken
out of the queue. How many may wait, how long one may run and when the service stops taking
requests is ``app.admission``'s business. Tokens cross from the
engine thread to the response through a bounded channel: a client that reads slowly makes the
engine wait instead of letting text pile up in memory, and a client that leaves makes
``on_token`` return False at the next token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from app.admission import Admission, Ticket, engine_slots, generate_fn
from app.backends import Backend, GenerationResult, SamplingParams, TokenLogprobs
from app.backends.grammar import GrammarError, ToolSpec, json_grammar, tool_call_grammar
from app.chat_template import ChatTemplate
from app.errors import ApiError, ContextLengthExceeded, InvalidRequest, NotFound, as_api_error
from app.output import Delta, OutputParser
from app.reasoning import Mode
from app.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, GenerationRequest
from app.textstream import TextStream

logger = logging.getLogger(__name__)

DEFAULT_SAMPLING = SamplingParams()
INLINE_TOKENIZE_CHARS = 4096
"""Prompts up to this long are tokenized on the event loop (well under a millisecond)."""


@dataclass(frozen=True)
class PreparedGeneration:
    """A validated request in engine terms."""

    prompt_tokens: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop: tuple[str, ...]
    reasoning: Mode = "raw"
    """How to split a ``<think>`` block from the answer (``raw``: no splitting)."""
    parse_tool_calls: bool = False
    single_tool_call: bool = False
    """``parallel_tool_calls: false``: generation ends once the first call is complete."""
    ticket: Ticket | None = field(default=None, compare=False, repr=False)
    """The request's place in ``app.admission``, taken when it was prepared."""


@dataclass(frozen=True)
class Event:
    """One delta of the answer, with the logprobs of the tokens it completed (if asked)."""

    delta: Delta
    logprobs: tuple[TokenLogprobs, ...] = field(default=())


@dataclass(frozen=True)
class Timings:
    """Where a generation's time went, as llama-server's ``timings`` reports it."""

    queue_ms: float
    """Waiting for the engine thread."""
    prompt_ms: float
    """From the start of decoding to the first sampled token: prefill (and, with batching,
    any wait for a free slot)."""
    decode_ms: float
    """From the first sampled token to the last."""


@dataclass(frozen=True)
class Finished:
    finish_reason: Literal["stop", "length", "tool_calls"]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    timings: Timings = field(default=Timings(0.0, 0.0, 0.0))


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_Item = Event | Finished | _Failed


class _Channel:
    """Bounded engine-thread -> event-loop channel.

    ``put`` blocks the engine thread while ``capacity`` items wait unread; ``close`` (the
    consumer left) makes every later ``put`` return False at once.

    Every token crosses it, so it is built to cost little: one ``threading.Lock`` guards the
    queue and its count; the engine waits on ``_space`` only when the queue is full; and the
    event loop is woken (``call_soon_threadsafe``, a write to its self-pipe) only when no
    earlier wake-up is still pending, so a loop that is behind drains a burst of tokens on
    one wake-up instead of one per token. (A ``threading.Semaphore`` per item and a wake-up
    per item were a quarter of the event loop's time per token on the tiny model.)
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, capacity: int) -> None:
        self._loop = loop
        self._capacity = capacity
        self._lock = threading.Lock()
        self._items: deque[_Item] = deque()  # guarded by _lock
        self._wake_pending = False  # guarded by _lock
        self._space = threading.Event()
        self._waiter: asyncio.Future[None] | None = None  # the consumer, waiting in get()
        self._closed = threading.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def put(self, item: _Item) -> bool:
        while True:
            if self._closed.is_set():
                return False
            with self._lock:
                if len(self._items) < self._capacity:
                    self._items.append(item)
                    wake = not self._wake_pending
                    self._wake_pending = True
                    break
                self._space.clear()
            self._space.wait(0.05)
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the event loop is gone (shutdown)
                self._closed.set()
                return False
        return True

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> _Item:
        while True:
            with self._lock:
                if self._items:
                    if len(self._items) == self._capacity:
                        self._space.set()
                    return self._items.popleft()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        self._closed.set()

    def fail(self, error: ApiError) -> None:
        """On the event loop: end the stream with ``error``; the engine stops at its next step."""
        self._closed.set()
        with self._lock:
            self._items.append(_Failed(error))
        self._wake()


def _sampling(
    req: GenerationRequest, *, grammar: str | None = None, top_logprobs: int | None = None
) -> SamplingParams:
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
        grammar=grammar,
        top_logprobs=top_logprobs,
    )


SOFT_SWITCHES = {"/think": True, "/no_think": False}


def _soft_switch(messages: Sequence[ChatMessage]) -> bool | None:
    """Qwen3's ``/think`` or ``/no_think`` in the latest user message (the last one wins)."""
    latest = next((m for m in reversed(messages) if m.role == "user"), None)
    if latest is None:
        return None
    text = latest.text()
    found = [(text.rfind(switch), on) for switch, on in SOFT_SWITCHES.items()]
    position, on = max(found)
    return on if position >= 0 else None


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
        self,
        backend: Backend,
        *,
        model_names: Sequence[str],
        stream_buffer_tokens: int,
        reasoning_format: str = "reasoning_content",
        enable_thinking: bool = True,
        max_queue: int | None = None,
        request_timeout_s: float | None = None,
        max_tokens_limit: int | None = None,
    ) -> None:
        self.backend = backend
        self._max_tokens_limit = max_tokens_limit
        slots = engine_slots(backend)
        self.admission = Admission(slots, max_queue=max_queue, timeout_s=request_timeout_s)
        self.reasoning_format = reasoning_format
        self._enable_thinking = enable_thinking
        self.model_id = model_names[0]
        self._model_names = frozenset(model_names)
        self._buffer = stream_buffer_tokens
        info = backend.info
        self._template = (
            ChatTemplate(info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
            if info.chat_template
            else None
        )
        self._engine = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="engine")

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
        kwargs = dict(req.chat_template_kwargs or {})
        if not self._enable_thinking:
            kwargs.setdefault("enable_thinking", False)
        # With thinking off in the template, Qwen3 ignores the soft switches.
        thinking_possible = kwargs.get("enable_thinking", True) is not False
        soft = _soft_switch(req.messages)
        thinking = thinking_possible and soft is not False
        tools = req.offered_tools
        prompt = self._template.render(
            [_template_message(m) for m in req.messages],
            tools=[tool.model_dump(exclude_none=True) for tool in tools],
            add_generation_prompt=True,
            extra=kwargs,
        )
        grammar = _chat_grammar(
            req, allow_thinking=thinking_possible, check=self.backend.check_grammar
        )
        tokens = await self._tokenize(prompt)
        job = self._prepared(
            req,
            tokens,
            req.completion_limit(),
            param="messages",
            grammar=grammar,
            top_logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        )
        mode: Mode = (
            "raw" if self.reasoning_format == "none" else ("extract" if thinking else "no_thinking")
        )
        return replace(
            job,
            reasoning=mode,
            parse_tool_calls=bool(tools),
            single_tool_call=req.parallel_tool_calls is False,
        )

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
            tokens = await self._tokenize(text)
        return self._prepared(req, tokens, req.max_tokens, param="prompt")

    async def _tokenize(self, text: str) -> list[int]:
        """Tokens of ``text``: on the event loop when it is short (a thread hop costs more
        than tokenizing a few KB, ~0.3 ms of time to first token on a 2-core host), on a
        worker thread when it is long enough to hold up other requests."""
        if len(text) <= INLINE_TOKENIZE_CHARS:
            return self.backend.tokenizer.tokenize(text)
        return await asyncio.to_thread(self.backend.tokenizer.tokenize, text)

    def _prepared(
        self,
        req: GenerationRequest,
        tokens: Sequence[int],
        requested_max: int | None,
        *,
        param: str,
        grammar: str | None = None,
        top_logprobs: int | None = None,
    ) -> PreparedGeneration:
        if not tokens:
            raise InvalidRequest("The prompt is empty after tokenization.", param=param)
        limit = self._max_tokens_limit
        if limit is not None and requested_max is not None and requested_max > limit:
            raise InvalidRequest(
                f"max_tokens is {requested_max}, above this server's limit of {limit}.",
                param="max_tokens",
                code="max_tokens_above_limit",
            )
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
            sampling=_sampling(req, grammar=grammar, top_logprobs=top_logprobs),
            max_tokens=requested_max if requested_max is not None else min(room, limit or room),
            stop=tuple(req.stop_list()),
            ticket=self.admission.admit(),
        )

    async def generate(self, job: PreparedGeneration) -> AsyncIterator[Event | Finished]:
        """Answer deltas as the engine produces them, then exactly one ``Finished``.

        Leaving the iteration early (client gone) cancels the generation: a queued one never
        starts, a running one stops at its next token.
        """
        loop = asyncio.get_running_loop()
        ticket = job.ticket or self.admission.admit()
        channel = _Channel(loop, self._buffer)
        ticket.start(channel.fail)
        future = loop.run_in_executor(self._engine, self._run, job, channel, time.perf_counter())
        try:
            while True:
                item = await channel.get()
                if isinstance(item, _Failed):
                    raise as_api_error(item.error) from item.error
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            ticket.release()
            channel.close()
            future.cancel()
            future.add_done_callback(_log_engine_failure)

    def _run(self, job: PreparedGeneration, channel: _Channel, submitted: float) -> None:
        """Engine thread: one generation, every outcome delivered through the channel."""
        if channel.closed:
            return
        started = time.perf_counter()
        first_token: list[float] = []
        text = TextStream(self.backend.tokenizer.token_bytes, job.stop)
        parser = OutputParser(reasoning=job.reasoning, tools=job.parse_tool_calls)
        enough_calls: list[bool] = []  # set when parallel_tool_calls=false has its one call
        pending: list[TokenLogprobs] = []  # logprobs of tokens whose text is not out yet

        def send(deltas: list[Delta]) -> bool:
            for delta in deltas:
                if not channel.put(Event(delta, tuple(pending))):
                    return False
                pending.clear()
            return True

        def on_token(token_id: int) -> bool:
            if not first_token:
                first_token.append(time.perf_counter())
            released = text.push(token_id)
            if released and not send(parser.push(released)):
                return False
            if job.single_tool_call and parser.completed_tool_calls:
                enough_calls.append(True)
                return False
            return not text.stopped and not channel.closed

        generate = generate_fn(self.backend, cancelled=lambda: channel.closed)
        try:
            result: GenerationResult = generate(
                job.prompt_tokens, job.sampling, job.max_tokens, on_token, pending.append
            )
        except Exception as exc:
            channel.put(_Failed(exc))
            return
        ended = time.perf_counter()
        if result.finish_reason == "cancelled" and not (text.stopped or enough_calls):
            return  # the client left; nobody is reading
        first = first_token[0] if first_token else ended
        timings = Timings(
            queue_ms=(started - submitted) * 1000,
            prompt_ms=(first - started) * 1000,
            decode_ms=(ended - first) * 1000,
        )
        pending.clear()  # end-of-turn and stop-string tokens have no text to carry them
        send(parser.push(text.finish()) + parser.finish())
        finish: Literal["stop", "length", "tool_calls"] = (
            "length" if result.finish_reason == "length" else "stop"
        )
        if finish == "stop" and parser.tool_calls:
            finish = "tool_calls"
        channel.put(
            Finished(
                finish_reason=finish,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                cached_tokens=result.cached_tokens,
                timings=timings,
            )
        )


def _chat_grammar(
    req: ChatCompletionRequest, *, allow_thinking: bool, check: Callable[[str], None]
) -> str | None:
    """The grammar a forced tool call or a JSON response format needs, checked by the engine
    (400 if impossible)."""
    param = "tools" if req.forced_tools else "response_format"
    try:
        if req.forced_tools:
            specs = [ToolSpec(t.function.name, t.function.parameters) for t in req.offered_tools]
            grammar = tool_call_grammar(
                specs,
                parallel=req.parallel_tool_calls is not False,
                allow_thinking=allow_thinking,
            )
        elif req.response_format is not None and req.json_output:
            fmt = req.response_format
            schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
            grammar = json_grammar(schema, allow_thinking=allow_thinking)
        else:
            return None
    except GrammarError as exc:
        raise InvalidRequest(str(exc), param=param, code="unsupported_schema") from exc
    try:
        check(grammar)
    except GrammarError as exc:
        what = "tools' parameter schemas" if req.forced_tools else "JSON schema in response_format"
        raise InvalidRequest(
            f"The {what} cannot be used for constrained decoding: {exc}. Typical causes: an "
            "empty enum or anyOf, a very large maxLength or maxItems, a property name with a "
            "quote in it.",
            param=param,
            code="unsupported_schema",
        ) from exc
    return grammar


def _log_engine_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("engine thread failed", exc_info=future.exception())
