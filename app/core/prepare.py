"""Preparing a request: from the core's request types to an admitted generation in engine
terms, through a few units with one job each.

Everything that can refuse a request happens here, before any response byte is sent and before
any engine work, so every 4xx is a real HTTP status, never an error in the middle of a stream:
the model name (``model_names``), the request limits (``limits``), the chat prompt
(``chat_prompt``), the grammar of a forced tool call or JSON output (``tool_grammar``), the
prompt's tokens and the context (``context``), the sampling (``engine_sampling``), the
thinking budget (``thinking_budget``) and admission (``admission``: a 429 when the server is
full). Work that grows with the request runs on a worker thread once it is large (``offload``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial

from app.core.admission import Admission, Ticket
from app.core.chat_prompt import ChatPrompt, ChatPrompter, ChatSemantics, thinking_possible
from app.core.context import ContextFit
from app.core.engine_sampling import sampling_params
from app.core.infill import ChunkTokens, FimRequest, FimWindow, fim_prompt
from app.core.limits import Limits
from app.core.model_names import ModelNames
from app.core.offload import INLINE_SCHEMA_BYTES, INLINE_TOKENIZE_CHARS, offloaded
from app.core.requests import ChatRequest, Sampling, TextRequest
from app.core.thinking_budget import ThinkingTags, requested_budget
from app.core.tool_grammar import chat_grammar
from app.engine import Backend, SamplingParams
from app.errors import InvalidRequest
from app.text import TextOptions

FIM_RESERVE = 256
"""Completion tokens a fill-in-the-middle prompt leaves room for, at least: the same for an
editor's warm-up (``n_predict`` 0) as for its completions, so both keep the same extra chunks
and the completion finds the warm-up's cells. A request without ``n_predict`` may generate
until the context is full."""


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
        self._admission = admission
        self._limits = limits or Limits()
        self._semantics = semantics
        self._completions_parse_special = completions_parse_special
        self._fim_window = fim_window
        self._chunk_tokens = ChunkTokens(backend.tokenizer)
        self.names = ModelNames(model_names, accept_any=accept_any_model)
        self.model_id = self.names.model_id
        self._fit = ContextFit(
            backend.tokenizer,
            self._limits,
            n_ctx=backend.info.n_ctx,
            max_tokens_limit=max_tokens_limit,
        )
        self._prompter = ChatPrompter(backend.tokenizer, backend.info, semantics, self._fit)
        self._thinking_tags = ThinkingTags(backend.tokenizer)

    async def chat(self, req: ChatRequest, *, fit_max_tokens: bool = False) -> PreparedGeneration:
        """``fit_max_tokens``: a ``max_tokens`` above what the context (or ``--max-tokens-limit``)
        leaves is lowered to it instead of refused (Anthropic's required ``max_tokens`` is a
        ceiling, and agents send their own model's, e.g. 64000)."""
        schema_bytes = self._checked_chat(req)
        if not fit_max_tokens:
            self._fit.check_max_tokens(req.max_tokens)
        kwargs = self._prompter.template_kwargs(req)
        grammar = await offloaded(
            schema_bytes > INLINE_SCHEMA_BYTES,
            chat_grammar,
            req,
            allow_thinking=thinking_possible(kwargs) and self._prompter.template_thinks,
            check=self._backend.check_grammar,
            tool_call_format=self._prompter.tool_call_format,
            limits=self._limits,
        )
        prompt = await self._prompter.prompt(
            req, kwargs, completion=1 if fit_max_tokens else (req.max_tokens or 1)
        )
        prepared = self._admitted(
            req.sampling,
            prompt.tokens,
            req.max_tokens,
            prompt.text,
            param="messages",
            grammar=grammar,
            top_logprobs=req.top_logprobs,
            fit_max_tokens=fit_max_tokens,
        )
        return self._with_thinking_budget(req, prompt, prepared, grammar)

    def _with_thinking_budget(
        self,
        req: ChatRequest,
        prompt: ChatPrompt,
        prepared: PreparedGeneration,
        grammar: str | None,
    ) -> PreparedGeneration:
        budget = requested_budget(
            req.thinking_budget, req.reasoning_effort, self._semantics.reasoning_budget
        )
        if budget is None or not prompt.thinks or (grammar is not None and prompt.opens_thinking):
            return prepared  # nothing to budget; or a grammar that expects the opening tag first
        limit = self._thinking_tags.budget(
            budget, max_tokens=prepared.max_tokens, inside=prompt.opens_thinking
        )
        return replace(prepared, sampling=replace(prepared.sampling, thinking_budget=limit))

    async def count_chat(self, req: ChatRequest) -> int:
        """The prompt tokens ``chat(req)`` would decode, without admitting a generation."""
        self._checked_chat(req)
        # Counted whatever its length (an agent may count to learn that it must compact).
        kwargs = self._prompter.template_kwargs(req)
        prompt = await self._prompter.prompt(req, kwargs, completion=None)
        return len(prompt.tokens)

    def _checked_chat(self, req: ChatRequest) -> int:
        """The model, the template and the limits; returns the size of the request's schemas."""
        self.names.check(req.model)
        self._prompter.check_template()
        return self._limits.check_chat(req)

    async def completion(self, req: TextRequest) -> PreparedGeneration:
        if req.suffix is not None and (req.suffix or self._backend.tokenizer.fim is not None):
            return await self._completion_with_suffix(req)
        self.names.check(req.model)
        self._limits.check_stop(req.stop)
        self._fit.check_max_tokens(req.max_tokens)
        if isinstance(req.prompt, tuple):
            tokens = list(req.prompt)
            n_vocab = self._backend.info.n_vocab
            if any(t < 0 or t >= n_vocab for t in tokens):
                raise InvalidRequest(f"prompt token ids must be in [0, {n_vocab})", param="prompt")
        else:
            tokens = await offloaded(
                len(req.prompt) > INLINE_TOKENIZE_CHARS,
                self._completion_tokens,
                req.prompt,
                req.max_tokens or 1,
            )
        options = TextOptions(stop=req.stop)
        return self._admitted(req.sampling, tokens, req.max_tokens, options, param="prompt")

    async def _completion_with_suffix(self, req: TextRequest) -> PreparedGeneration:
        """A text completion with OpenAI's ``suffix``: the model's fill-in-the-middle prompt
        around the cursor between ``prompt`` and ``suffix`` (as Ollama honours it)."""
        if not isinstance(req.prompt, str):
            raise InvalidRequest("'suffix' needs a text 'prompt' (not token ids).", param="prompt")
        fim = FimRequest(
            prefix=req.prompt, suffix=req.suffix or "", n_predict=req.max_tokens, stop=req.stop
        )
        self.names.check(req.model)
        (job,) = await self._infill(fim, req.sampling, param="suffix")
        return job

    async def infill(
        self, fim: FimRequest, *, model: str | None, sampling: Sampling
    ) -> list[PreparedGeneration]:
        """Fill-in-the-middle for an editor: one admitted generation per completion asked
        (``n_cmpl``: the batching engine prefills their prompt once; those beyond the free
        slots wait their turn, as llama-server queues them).

        The model a request names is not checked: editors send a name of their own (llama.vim
        an empty one, llama.vscode its chat model's), and llama-server's ``/infill`` ignores
        it too."""
        self.names.note_editor_name(model)
        return await self._infill(fim, sampling, param="input_prefix")

    async def _infill(
        self, fim: FimRequest, sampling: Sampling, *, param: str
    ) -> list[PreparedGeneration]:
        """The model's own FIM prompt (``app.core.infill``), cut to fit."""
        fim_tokens = self._backend.tokenizer.fim
        if fim_tokens is None:
            raise InvalidRequest(
                "This model has no fill-in-the-middle tokens (<|fim_prefix|>, <|fim_suffix|>, "
                "<|fim_middle|>): code completion needs a model trained for it, such as "
                "Qwen3-Coder or Qwen2.5-Coder.",
                param=param,
                code="fim_not_supported",
            )
        self._limits.check_stop(fim.stop)
        self._fit.check_max_tokens(fim.n_predict)
        self._limits.check_prompt_bytes(fim.size, param=param)
        reserve = max(FIM_RESERVE, fim.n_predict or 0)
        window = FimWindow.of(around=self._fim_window, n_ctx=self._fit.n_ctx, reserve=reserve)
        built = await offloaded(
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
                job = self._admitted(sampling, built.tokens, fim.n_predict, options, param=param)
                revising = replace(job.sampling, revision=True)
                jobs.append(replace(job, sampling=revising, truncated=built.truncated))
        except BaseException:
            for job in jobs:
                job.ticket.release()
            raise
        return jobs

    def _completion_tokens(self, text: str, completion: int) -> list[int]:
        """A raw prompt: control token texts are those tokens (``--completions-parse-special``,
        the default) or text."""
        tokenizer = self._backend.tokenizer
        parts = tokenizer.split_control(text) if self._completions_parse_special else [text]
        return self._fit.tokens(parts, completion, param="prompt")

    def _admitted(
        self,
        asked: Sampling,
        tokens: Sequence[int],
        requested_max: int | None,
        text: TextOptions,
        *,
        param: str,
        grammar: str | None = None,
        top_logprobs: int | None = None,
        fit_max_tokens: bool = False,
    ) -> PreparedGeneration:
        max_tokens = self._fit.completion_room(
            tokens, requested_max, param=param, fit=fit_max_tokens
        )
        return PreparedGeneration(
            prompt_tokens=list(tokens),
            sampling=sampling_params(
                asked,
                n_vocab=self._backend.info.n_vocab,
                grammar=grammar,
                top_logprobs=top_logprobs,
            ),
            max_tokens=max_tokens,
            text=text,
            ticket=self._admission.admit(),
        )
