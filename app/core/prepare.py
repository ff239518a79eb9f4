"""Preparing a request: from the wire request to a generation in engine terms.

Everything that can refuse a request happens here, before any response byte is sent and before
any engine work: the model name, the request limits (``app.core.limits``: counts and sizes,
checked before anything is built from them), the chat template's rendering, the prompt's size
(over ``--max-prompt-bytes``, or longer than the context even at the longest token's bytes per
token: refused before it is tokenized), the grammar a forced tool call or a JSON response
format needs (built, held to ``--max-grammar-bytes``, then parsed by the engine itself),
tokenization (``app.core.prompt``: client text is tokenized as text), the context and
``max_tokens`` limits, and admission (a 429 when the server is full). So every 4xx is a real
HTTP status, never an error in the middle of a stream. Work that grows with the request
(rendering, a grammar, tokenizing) runs on a worker thread once the request is large enough to
hold up the event loop.

The tool-call format is decided here too, once per model, from the chat template the model
was trained with: a template that renders ``<function=`` teaches Qwen3-Coder's XML calls, any
other Qwen3's JSON ones (the ``--tool-call-format`` setting overrides it). The alternative
rejected: guessing from the model's name or architecture, which Qwen3 and Qwen3-Coder share.

Request fields are mapped to engine arguments one by one (``sampling``); nothing from a
client is splatted into an engine call.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, ParamSpec, TypeVar

from app.api.openai.requests import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    GenerationRequest,
)
from app.core.admission import Admission, Ticket
from app.core.chat_template import ChatTemplate
from app.core.infill import ChunkTokens, FimRequest, FimWindow, fim_prompt
from app.core.limits import Limits, check_json, lone_surrogate_at
from app.core.prompt import ClientText
from app.core.thinking import ThinkingTags, prompt_opens_thinking, requested_budget
from app.engine import Backend, GrammarError, PromptPart, SamplingParams
from app.engine.grammar import (
    ToolSpec,
    coder_tool_call_grammar,
    json_grammar,
    tool_call_grammar,
)
from app.errors import ContextLengthExceeded, InvalidRequest, NotFound
from app.text import Mode, TextOptions, ToolCallFormat

logger = logging.getLogger(__name__)

DEFAULT_SAMPLING = SamplingParams()
INLINE_TOKENIZE_CHARS = 4096
"""Prompts up to this long are rendered and tokenized on the event loop (well under a
millisecond); longer ones on a worker thread, so they do not hold up other requests."""
INLINE_SCHEMA_BYTES = 16 * 1024
"""Schemas up to this large (all of a request's together) become a grammar on the event loop;
larger ones on a worker thread."""
INFILL_NAMES_LOGGED = 16
FIM_RESERVE = 256
"""Completion tokens a fill-in-the-middle prompt leaves room for, at least: the same for an
editor's warm-up (``n_predict`` 0) as for its completions (128), so both keep the same extra
chunks and the completion finds the warm-up's cells. A request without ``n_predict`` may
generate until the context is full."""
TOOL_WEIGHT_CHARS = 512
"""What one tool counts for, in prompt characters, when deciding where to render a prompt."""

Args = ParamSpec("Args")
Result = TypeVar("Result")


async def _offloaded(
    offload: bool, work: Callable[Args, Result], *args: Args.args, **kwargs: Args.kwargs
) -> Result:
    """``work`` on a worker thread when ``offload``, else right here: a thread hop costs more
    than small work (~0.3 ms of time to first token on a 2-core host)."""
    if offload:
        return await asyncio.to_thread(work, *args, **kwargs)
    return work(*args, **kwargs)


SOFT_SWITCHES = {"/think": True, "/no_think": False}
CODER_TEMPLATE_MARKER = "<function="
"""What Qwen3-Coder's chat template renders (its tool-call examples and history); Qwen3's never
does."""


@dataclass(frozen=True)
class PreparedGeneration:
    """A validated, admitted request in engine terms."""

    prompt_tokens: list[int]
    sampling: SamplingParams
    max_tokens: int
    text: TextOptions
    ticket: Ticket = field(compare=False, repr=False)
    """The request's place in ``app.core.admission``, taken when it was prepared."""
    truncated: bool = False
    """The prompt was cut to fit (``app.core.infill``)."""


@dataclass(frozen=True)
class _ChatPrompt:
    """A chat request rendered and tokenized, with what its text pipeline must do."""

    tokens: list[int]
    text: TextOptions
    thinking_possible: bool
    """The template leaves the model free to think (a grammar must allow a ``<think>``)."""
    thinks: bool = False
    """The request thinks (``thinking_possible`` and no ``/no_think``): a budget applies."""
    opens_thinking: bool = False
    """The rendered prompt ends inside an open ``<think>`` block."""


@dataclass(frozen=True)
class ChatSemantics:
    """How the server treats Qwen3's thinking (from the settings)."""

    reasoning_format: str = "reasoning_content"
    enable_thinking: bool = True
    tool_call_format: str = "auto"
    """``auto`` (from the chat template), ``qwen3`` or ``qwen3_coder``."""
    reasoning_budget: int = -1
    """Thinking budget for requests that set none (``app.core.thinking``); -1: unlimited."""


class Preparer:
    def __init__(
        self,
        backend: Backend,
        admission: Admission,
        *,
        model_names: Sequence[str],
        semantics: ChatSemantics,
        max_tokens_limit: int | None,
        accept_any_model: bool = False,
        limits: Limits | None = None,
        completions_parse_special: bool = True,
        fim_window: int = 1024,
    ) -> None:
        self._backend = backend
        self._accept_any_model = accept_any_model
        self._limits = limits or Limits()
        self._completions_parse_special = completions_parse_special
        self._fim_window = fim_window
        self._chunk_tokens = ChunkTokens(backend.tokenizer)
        self._admission = admission
        self.model_id = model_names[0]
        self._model_names = frozenset(model_names)
        self._infill_names: set[str] = set()
        """Model names editors sent to ``/infill`` that are not this server's (logged once)."""
        self._semantics = semantics
        self._max_tokens_limit = max_tokens_limit
        info = backend.info
        self._template = (
            ChatTemplate(info.chat_template, bos_token=info.bos_token, eos_token=info.eos_token)
            if info.chat_template
            else None
        )
        source = info.chat_template or ""
        self.tool_call_format = detect_tool_call_format(semantics.tool_call_format, source)
        # Qwen3-Coder's template iterates a history call's arguments as a mapping.
        self._arguments_as_object = CODER_TEMPLATE_MARKER in source
        # A template that knows no thinking (Qwen3-Coder's) serves a model that does not
        # think: a forced call or JSON output is not preceded by an optional think block.
        self._template_thinks = "<think>" in source
        self._thinking_tags = ThinkingTags(backend.tokenizer)

    def check_model(self, requested: str | None) -> None:
        """404 unless the request names the served model or its alias (or names none), or the
        server accepts any name (``--accept-any-model``)."""
        if requested and not self._accept_any_model and requested not in self._model_names:
            raise NotFound(
                f"The model '{requested}' does not exist; this server serves '{self.model_id}' "
                "(start it with --accept-any-model to answer any model name with it).",
                param="model",
                code="model_not_found",
            )

    async def chat(
        self, req: ChatCompletionRequest, *, fit_max_tokens: bool = False
    ) -> PreparedGeneration:
        """``fit_max_tokens``: a ``max_tokens`` above what the context (or ``--max-tokens-limit``)
        leaves is lowered to it instead of refused (Anthropic's required ``max_tokens`` is a
        ceiling, and agents send their own model's, e.g. 64000)."""
        schema_bytes = self._checked_chat(req)
        requested_max = req.completion_limit()
        if not fit_max_tokens:
            self._check_max_tokens(requested_max)
        kwargs = self._template_kwargs(req)
        thinking_possible = kwargs.get("enable_thinking", True) is not False
        grammar = await _offloaded(
            schema_bytes > INLINE_SCHEMA_BYTES,
            chat_grammar,
            req,
            allow_thinking=thinking_possible and self._template_thinks,
            check=self._backend.check_grammar,
            tool_call_format=self.tool_call_format,
            limits=self._limits,
        )
        prompt = await self._chat_prompt(
            req, kwargs, completion=1 if fit_max_tokens else (requested_max or 1)
        )
        prepared = self._admitted(
            req,
            prompt.tokens,
            requested_max,
            prompt.text,
            param="messages",
            grammar=grammar,
            top_logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            fit_max_tokens=fit_max_tokens,
        )
        budget = requested_budget(
            req.thinking_budget, req.reasoning_effort, self._semantics.reasoning_budget
        )
        if budget is None or not prompt.thinks or (grammar is not None and prompt.opens_thinking):
            return prepared  # nothing to budget; or a grammar that expects the opening tag first
        limit = self._thinking_tags.budget(
            budget, max_tokens=prepared.max_tokens, inside=prompt.opens_thinking
        )
        return replace(prepared, sampling=replace(prepared.sampling, thinking_budget=limit))

    async def count_chat(self, req: ChatCompletionRequest) -> int:
        """The prompt tokens ``chat(req)`` would decode, without admitting a generation."""
        self._checked_chat(req)
        # Counted whatever its length (an agent may count to learn that it must compact).
        prompt = await self._chat_prompt(req, self._template_kwargs(req), completion=None)
        return len(prompt.tokens)

    def _checked_chat(self, req: ChatCompletionRequest) -> int:
        """The model, the template and the limits; returns the size of the request's schemas."""
        self.check_model(req.model)
        if self._template is None:
            raise InvalidRequest(
                "This model has no chat template; use /v1/completions or start the server "
                "with --chat-template-file."
            )
        return self._check_chat_limits(req)

    def _template_kwargs(self, req: ChatCompletionRequest) -> dict[str, Any]:
        kwargs = dict(req.chat_template_kwargs or {})
        if not self._semantics.enable_thinking:
            kwargs.setdefault("enable_thinking", False)
        return kwargs

    async def _chat_prompt(
        self, req: ChatCompletionRequest, kwargs: dict[str, Any], *, completion: int | None
    ) -> _ChatPrompt:
        """The prompt's tokens (refused early when even its size says that it cannot fit with
        ``completion`` tokens after it; None: no context check) and what its text pipeline
        must do."""
        # With thinking off in the template, Qwen3 ignores the soft switches.
        thinking_possible = kwargs.get("enable_thinking", True) is not False
        soft = soft_switch(req.messages)
        thinking = thinking_possible and soft is not False
        tools = req.offered_tools
        text_chars = sum(len(m.text()) for m in req.messages) + TOOL_WEIGHT_CHARS * len(tools)
        tokens, opens_thinking = await _offloaded(
            text_chars > INLINE_TOKENIZE_CHARS,
            self._chat_tokens,
            req,
            [tool.model_dump(exclude_none=True) for tool in tools],
            kwargs,
            completion,
        )
        reasoning: Mode = (
            "raw"
            if self._semantics.reasoning_format == "none"
            else ("extract" if thinking else "no_thinking")
        )
        text = TextOptions(
            stop=tuple(req.stop_list()),
            reasoning=reasoning,
            tool_calls=bool(tools),
            single_tool_call=req.parallel_tool_calls is False,
            tool_call_format=self.tool_call_format,
            tool_parameters={t.function.name: t.function.parameters for t in tools},
        )
        return _ChatPrompt(tokens, text, thinking_possible, thinking, opens_thinking)

    def _check_chat_limits(self, req: ChatCompletionRequest) -> int:
        """The request's counts and untyped values within the limits; returns the size of its
        schemas (as compact JSON, about)."""
        limits = self._limits
        limits.check_count(
            "The number of messages",
            len(req.messages),
            limits.max_messages,
            param="messages",
            setting="max_messages",
        )
        limits.check_count(
            "The number of tools",
            len(req.tools or []),
            limits.max_tools,
            param="tools",
            setting="max_tools",
        )
        limits.check_stop(req.stop_list())
        schema_bytes = 0
        for i, tool in enumerate(req.tools or []):
            parameters = tool.function.parameters
            if parameters is not None:
                schema_bytes += limits.check_schema(
                    parameters, param=f"tools.{i}.function.parameters"
                )
        fmt = req.response_format
        if fmt is not None and fmt.json_schema is not None and fmt.json_schema.schema_:
            schema_bytes += limits.check_schema(
                fmt.json_schema.schema_, param="response_format.json_schema.schema"
            )
        if req.chat_template_kwargs:
            check_json(req.chat_template_kwargs, param="chat_template_kwargs")
        return schema_bytes

    def _chat_tokens(
        self,
        req: ChatCompletionRequest,
        tools: list[dict[str, Any]],
        kwargs: dict[str, Any],
        completion: int | None,
    ) -> tuple[list[int], bool]:
        """The chat prompt rendered with every client string escaped, then tokenized with the
        template's markup as control tokens and the client's text as text; and whether it ends
        inside an open ``<think>`` block."""
        assert self._template is not None
        client = ClientText(self._backend.tokenizer)
        messages = [
            client.escape(template_message(m, arguments_as_object=self._arguments_as_object))
            for m in req.messages
        ]
        prompt = self._template.render(
            messages,
            tools=client.escape(tools),
            add_generation_prompt=True,
            extra=client.escape(kwargs),
        )
        tokens = self._prompt_tokens(client.prompt_parts(prompt), completion, param="messages")
        return tokens, prompt_opens_thinking(prompt)

    async def completion(self, req: CompletionRequest) -> PreparedGeneration:
        if req.suffix is not None and (req.suffix or self._backend.tokenizer.fim is not None):
            return await self.completion_with_suffix(req)
        self.check_model(req.model)
        self._limits.check_stop(req.stop_list())
        self._check_max_tokens(req.max_tokens)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            tokens = [int(t) for t in prompt]
            n_vocab = self._backend.info.n_vocab
            if any(t < 0 or t >= n_vocab for t in tokens):
                raise InvalidRequest(f"prompt token ids must be in [0, {n_vocab})", param="prompt")
        else:
            text = prompt if isinstance(prompt, str) else str(prompt[0])
            tokens = await _offloaded(
                len(text) > INLINE_TOKENIZE_CHARS,
                self._completion_tokens,
                text,
                req.max_tokens or 1,
            )
        options = TextOptions(stop=tuple(req.stop_list()))
        return self._admitted(req, tokens, req.max_tokens, options, param="prompt")

    async def completion_with_suffix(self, req: CompletionRequest) -> PreparedGeneration:
        """A text completion with OpenAI's ``suffix``: the model's fill-in-the-middle prompt
        around the cursor between ``prompt`` and ``suffix`` (as Ollama honours it)."""
        prompt = req.prompt
        if not isinstance(prompt, str) and not (prompt and isinstance(prompt[0], str)):
            raise InvalidRequest("'suffix' needs a text 'prompt' (not token ids).", param="prompt")
        text = prompt if isinstance(prompt, str) else str(prompt[0])
        fim = FimRequest(
            prefix=text,
            suffix=req.suffix or "",
            n_predict=req.max_tokens,
            stop=tuple(req.stop_list()),
        )
        self.check_model(req.model)
        (job,) = await self.infill(req, fim, param="suffix")
        return job

    async def infill(
        self, req: GenerationRequest, fim: FimRequest, *, param: str = "input_prefix"
    ) -> list[PreparedGeneration]:
        """Fill-in-the-middle: the model's own FIM prompt (``app.core.infill``), one admitted
        generation per completion asked (``n_cmpl``: the batching engine prefills their prompt
        once; those beyond the free slots wait their turn, as llama-server queues them).

        The model a request names is not checked: editors send a name of their own (llama.vim
        an empty one, llama.vscode its chat model's, ``google/gemini-2.5-flash`` by default),
        and llama-server's ``/infill`` ignores it too; a text completion's ``model`` is
        checked by the route that takes it (``completion_with_suffix``)."""
        self._note_infill_model(req.model)
        fim_tokens = self._backend.tokenizer.fim
        if fim_tokens is None:
            raise InvalidRequest(
                "This model has no fill-in-the-middle tokens (<|fim_prefix|>, <|fim_suffix|>, "
                "<|fim_middle|>): code completion needs a model trained for it, such as "
                "Qwen3-Coder or Qwen2.5-Coder.",
                param=param,
                code="fim_not_supported",
            )
        self._limits.check_stop(list(fim.stop))
        self._check_max_tokens(fim.n_predict)
        self._limits.check_prompt_bytes(fim.size, param=param)
        info = self._backend.info
        reserve = max(FIM_RESERVE, fim.n_predict or 0)
        window = FimWindow.of(around=self._fim_window, n_ctx=info.n_ctx, reserve=reserve)
        built = await _offloaded(
            fim.size > INLINE_TOKENIZE_CHARS,
            partial(
                fim_prompt,
                self._backend.tokenizer,
                fim_tokens,
                prefix=fim.prefix,
                suffix=fim.suffix,
                middle=fim.middle,
                extra=fim.extra,
                window=window,
                chunk_tokens=self._chunk_tokens,
            ),
        )
        options = TextOptions(
            stop=fim.stop, n_indent=fim.n_indent, t_max_predict_ms=fim.t_max_predict_ms
        )
        count = 1 if fim.n_predict == 0 else fim.n_cmpl
        jobs: list[PreparedGeneration] = []
        try:
            for _ in range(count):
                job = self._admitted(req, built.tokens, fim.n_predict, options, param=param)
                revising = replace(job.sampling, revision=True)
                jobs.append(replace(job, sampling=revising, truncated=built.truncated))
        except BaseException:
            for job in jobs:
                job.ticket.release()
            raise
        return jobs

    def _note_infill_model(self, name: str | None) -> None:
        """Say once per name (for the first few names) that an editor's model name was not
        this server's and the request was served by it anyway."""
        if not name or name in self._model_names or name in self._infill_names:
            return
        if len(self._infill_names) < INFILL_NAMES_LOGGED:
            self._infill_names.add(name)
            logger.info(
                "/infill named the model '%s'; served by '%s' (editors send names of their own)",
                name[:200],
                self.model_id,
            )

    def _completion_tokens(self, text: str, completion: int) -> list[int]:
        """A raw prompt: control token texts are those tokens (``--completions-parse-special``,
        the default) or text."""
        tokenizer = self._backend.tokenizer
        parts = tokenizer.split_control(text) if self._completions_parse_special else [text]
        return self._prompt_tokens(parts, completion, param="prompt")

    def _prompt_tokens(
        self, parts: Sequence[PromptPart], completion: int | None, *, param: str
    ) -> list[int]:
        """The prompt's token ids, unless its size refuses it first: over ``max_prompt_bytes``,
        or (with ``completion``, the tokens to generate after it) longer than the context even
        if every token stood for the most bytes one can."""
        tokenizer = self._backend.tokenizer
        per_token = tokenizer.max_token_bytes
        size = at_least = 0
        for part in parts:
            if isinstance(part, int):
                size += len(tokenizer.control_texts.get(part, "").encode("utf-8"))
                at_least += 1
            else:
                n = len(part.encode("utf-8"))
                size += n
                at_least += -(-n // per_token)
        self._limits.check_prompt_bytes(size, param=param)
        n_ctx = self._backend.info.n_ctx
        if completion is not None and at_least + completion > n_ctx:
            raise ContextLengthExceeded(
                n_ctx=n_ctx,
                prompt_tokens=at_least,
                max_tokens=completion,
                param=param,
                at_least=True,
            )
        return tokenizer.tokenize_parts(parts)

    def _check_max_tokens(self, requested_max: int | None) -> None:
        limit = self._max_tokens_limit
        if limit is not None and requested_max is not None and requested_max > limit:
            raise InvalidRequest(
                f"max_tokens is {requested_max}, above this server's limit of {limit}.",
                param="max_tokens",
                code="max_tokens_above_limit",
            )

    def _admitted(
        self,
        req: GenerationRequest,
        tokens: Sequence[int],
        requested_max: int | None,
        text: TextOptions,
        *,
        param: str,
        grammar: str | None = None,
        top_logprobs: int | None = None,
        fit_max_tokens: bool = False,
    ) -> PreparedGeneration:
        if not tokens:
            raise InvalidRequest("The prompt is empty after tokenization.", param=param)
        limit = self._max_tokens_limit
        n_ctx = self._backend.info.n_ctx
        room = n_ctx - len(tokens)
        if fit_max_tokens and requested_max is not None and room >= 1:
            requested_max = min(requested_max, room, limit or room)
        self._check_max_tokens(requested_max)
        if room < 1 or (requested_max is not None and requested_max > room):
            raise ContextLengthExceeded(
                n_ctx=n_ctx,
                prompt_tokens=len(tokens),
                max_tokens=requested_max or 1,
                param=param,
            )
        return PreparedGeneration(
            prompt_tokens=list(tokens),
            sampling=sampling(
                req,
                grammar=grammar,
                top_logprobs=top_logprobs,
                logit_bias=logit_bias(req, self._backend.info.n_vocab),
            ),
            max_tokens=requested_max if requested_max is not None else min(room, limit or room),
            text=text,
            ticket=self._admission.admit(),
        )


def logit_bias(req: GenerationRequest, n_vocab: int) -> tuple[tuple[int, float], ...]:
    """The request's ``logit_bias`` as (token id, bias) pairs, every id in the vocabulary."""
    pairs = tuple((int(key), bias) for key, bias in (req.logit_bias or {}).items())
    for token_id, _ in pairs:
        if token_id >= n_vocab:
            raise InvalidRequest(
                f"logit_bias names token {token_id}; token ids are in [0, {n_vocab}).",
                param=f"logit_bias.{token_id}",
                code="invalid_value",
            )
    return pairs


def sampling(
    req: GenerationRequest,
    *,
    grammar: str | None = None,
    top_logprobs: int | None = None,
    logit_bias: tuple[tuple[int, float], ...] = (),
) -> SamplingParams:
    """The request's sampling fields, each one mapped; unset ones take llama.cpp's defaults."""
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
        logit_bias=logit_bias,
    )


def soft_switch(messages: Sequence[ChatMessage]) -> bool | None:
    """Qwen3's ``/think`` or ``/no_think`` in the latest user message (the last one wins)."""
    latest = next((m for m in reversed(messages) if m.role == "user"), None)
    if latest is None:
        return None
    text = latest.text()
    found = [(text.rfind(switch), on) for switch, on in SOFT_SWITCHES.items()]
    position, on = max(found)
    return on if position >= 0 else None


def detect_tool_call_format(setting: str, chat_template: str) -> ToolCallFormat:
    """The setting, or (``auto``) the format the model's chat template teaches."""
    if setting == "auto":
        return "qwen3_coder" if CODER_TEMPLATE_MARKER in chat_template else "qwen3"
    return "qwen3_coder" if setting == "qwen3_coder" else "qwen3"


def template_message(message: ChatMessage, *, arguments_as_object: bool = False) -> dict[str, Any]:
    """A message as chat templates read it (content always a string, as Qwen's expects).

    ``arguments_as_object``: a history tool call's ``arguments``, a JSON string on the wire,
    is passed as the object it encodes (Qwen3-Coder's template iterates it; Qwen3's takes it
    either way, so it gets the client's own text).
    """
    role = "system" if message.role == "developer" else message.role
    out: dict[str, Any] = {"role": role, "content": message.text()}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        if arguments_as_object:
            for call in out["tool_calls"]:
                call["function"]["arguments"] = _arguments_object(call["function"])
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.reasoning_content is not None:
        out["reasoning_content"] = message.reasoning_content
    return out


def _arguments_object(function: dict[str, Any]) -> dict[str, Any]:
    try:
        arguments = json.loads(function["arguments"])
    except (ValueError, RecursionError):  # RecursionError: nested past the parser's stack
        arguments = None
    if not isinstance(arguments, dict):
        raise InvalidRequest(
            f"The arguments of the history tool call to '{function['name']}' must be a JSON "
            "object.",
            param="messages",
        )
    check_json(arguments, param="messages")
    if lone_surrogate_at(arguments) is not None:
        raise InvalidRequest(
            f"The arguments of the history tool call to '{function['name']}' hold a lone UTF-16 "
            "surrogate escape; strings must be valid Unicode.",
            param="messages",
            code="invalid_text",
        )
    return arguments


def chat_grammar(
    req: ChatCompletionRequest,
    *,
    allow_thinking: bool,
    check: Callable[[str], None],
    tool_call_format: ToolCallFormat = "qwen3",
    limits: Limits | None = None,
) -> str | None:
    """The grammar a forced tool call (in the model's format) or a JSON response format needs,
    held to the grammar size limit and checked by the engine (400 if impossible)."""
    param = "tools" if req.forced_tools else "response_format"
    try:
        if req.forced_tools:
            specs = [ToolSpec(t.function.name, t.function.parameters) for t in req.offered_tools]
            build = (
                coder_tool_call_grammar if tool_call_format == "qwen3_coder" else tool_call_grammar
            )
            grammar = build(
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
    (limits or Limits()).check_grammar(grammar, param=param)
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
