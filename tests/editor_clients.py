"""The requests real editor plugins send for code completion, built as their sources build them.

Tests of ``POST /infill`` and of ``suffix`` on ``POST /v1/completions`` use these instead of
bodies of their own: a tidy body written for the test would pass against a server the editors
cannot use. Each builder follows one client's source at a named commit, field for field,
quirks included: llama.vim always sends ``"model": ""`` and an ``Authorization`` header, even
with no key set; llama.vscode names its chat model (``google/gemini-2.5-flash`` unless the user
changes it) on every completion and asks for three completions at once (``n_cmpl``); Continue's
llama.cpp provider sends ``Authorization: Bearer undefined``; Tabby cuts its prompt to its last
1536 bytes before splitting it into ``prompt`` and ``suffix``. Running the editors themselves
(Vim, VS Code, a Tabby server) would need hosts and downloads a test run does not have; these
functions are the part of each editor the server sees.

What is left out, because it is the editor's own business and never reaches the server: the
cache of earlier answers each plugin keeps, the debounce timers, the random choice of which
lines of a file become a ring chunk (a builder takes the chunks as they stand), Continue's
token-count pruning of prefix and suffix (its builder takes them pruned) and how the suggestion
is filtered before it is shown.

Sources read (a builder's docstring names the functions it follows):

- llama.vim: ggml-org/llama.vim ``autoload/llama.vim`` at a1c8e6e40cb45df59b78add5b65d575386832465
  (2026-01-31).
- llama.vscode: ggml-org/llama.vscode v0.0.63 (3938fb3568b98e3ddfcf2ce3dd52d9570552b579):
  ``src/llama-server.ts``, ``src/completion.ts``, ``src/utils.ts``, ``src/extra-context.ts``,
  ``src/configuration.ts``, ``src/statusbar.ts``, ``package.json``.
- Continue: continuedev/continue at d0a3c0b626b5bebc3bef4742eec05a0242be0bab
  (v1.3.40-vscode, 2026-06-18): ``core/autocomplete/templating/AutocompleteTemplate.ts``,
  ``templating/index.ts``, ``templating/getStopTokens.ts``, ``CompletionProvider.ts``,
  ``generation/CompletionStreamer.ts``, ``core/llm/index.ts``, ``core/llm/llms/OpenAI.ts``,
  ``core/llm/llms/LlamaCpp.ts``, ``core/llm/openaiTypeConverters.ts``.
- Tabby: TabbyML/tabby at 21b29048d7bcf6b94f9f482f2d0fd05efadfd19f (2026-06-30):
  ``crates/http-api-bindings/src/completion/{mod,openai}.rs``,
  ``crates/tabby/src/services/completion/completion_prompt.rs``,
  ``crates/tabby-inference/src/{code,completion,lib}.rs``, ``crates/tabby-common/src/config.rs``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ClientRequest:
    """One request as a client sends it: ``POST path`` with ``body`` as JSON, and the headers
    the client sets itself (its HTTP library adds others: ``Content-Length``, ``User-Agent``,
    and ``Content-Type: application/json`` where the client leaves it to the library)."""

    path: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Chunk:
    """Lines of another file (or another part of this one) that llama.vim and llama.vscode
    keep in their ring of extra context. Both send a chunk's lines joined with newlines plus a
    final newline; ``time`` is when it was picked, which the server ignores."""

    lines: tuple[str, ...]
    filename: str
    time: int = 0

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


@dataclass(frozen=True)
class Snippet:
    """A piece of another file that Continue or Tabby put into the prompt, under ``path`` (the
    path relative to the workspace, as the client shortens it)."""

    path: str
    content: str


# -- llama.vim ------------------------------------------------------------------------------

LLAMA_VIM_RESPONSE_FIELDS = (
    "content",
    "timings/prompt_n",
    "timings/prompt_ms",
    "timings/prompt_per_token_ms",
    "timings/prompt_per_second",
    "timings/predicted_n",
    "timings/predicted_ms",
    "timings/predicted_per_token_ms",
    "timings/predicted_per_second",
    "truncated",
    "tokens_cached",
)
"""What llama.vim asks ``/infill`` to return (``response_fields``): llama-server then answers
with only these keys, each nested path flattened into one key (``"timings/prompt_n": 12``)."""


@dataclass(frozen=True)
class VimLocalContext:
    """``s:fim_ctx_local``'s result: the text before the cursor's line, the cursor's line up to
    the cursor, the rest, and the indentation llama.vim sends as ``n_indent``."""

    prefix: str
    middle: str
    suffix: str
    indent: int
    line_cur_suffix: str


def _vim_getline(lines: Sequence[str], start: int, end: int) -> list[str]:
    """Vim's ``getline(start, end)`` on a buffer numbered from 1: empty when ``end < start``."""
    return list(lines[start - 1 : end]) if end >= start else []


def _vim_strpart(text: str, start: int, length: int | None = None) -> str:
    """Vim's ``strpart``: counted in bytes of UTF-8, as Vim's columns are."""
    data = text.encode()
    return data[start : None if length is None else start + length].decode()


def _vim_blank(line: str) -> bool:
    """``match(line, '^\\s*$') >= 0``: Vim's ``\\s`` is a space or a tab, nothing else."""
    return re.fullmatch(r"[ \t]*", line) is not None


def llama_vim_local_context(
    lines: Sequence[str],
    line: int,
    col: int,
    *,
    prev: Sequence[str] = (),
    indent_last: int = -1,
    n_prefix: int = 256,
    n_suffix: int = 64,
) -> VimLocalContext:
    """llama.vim's ``s:fim_ctx_local(pos_x, pos_y, prev)`` for the buffer ``lines``, the cursor
    on ``line`` (numbered from 1, Vim's ``line('.')``) at byte ``col`` (from 0,
    ``col('.') - 1``).

    The prefix is the ``n_prefix`` lines above the cursor's line, each ended by a newline; the
    middle the cursor's line up to the cursor; the suffix the rest of that line, a newline, and
    the ``n_suffix`` lines below, joined and ended by a newline (so on the last line the suffix
    ends in two newlines, and on the first line the prefix is a lone ``"\\n"``). A line of
    only spaces and tabs gives an empty middle and suffix-start and indentation 0 (the
    whitespace is dropped); otherwise ``indent`` is the number of leading spaces and tabs, a
    tab counting one (``strlen(matchstr(line, '^\\s*'))``, not the ``&tabstop``-aware
    ``s:get_indent``).

    With ``prev`` (the lines of the suggestion being shown), the context is built as if the
    suggestion were accepted, for the speculative request llama.vim sends while it is shown;
    ``indent`` is then ``indent_last``, the previous request's.
    """
    max_y = len(lines)
    if not prev:
        line_cur = lines[line - 1]
        line_cur_prefix = _vim_strpart(line_cur, 0, col)
        line_cur_suffix = _vim_strpart(line_cur, col)
        lines_prefix = _vim_getline(lines, max(1, line - n_prefix), line - 1)
        lines_suffix = _vim_getline(lines, line + 1, min(max_y, line + n_suffix))
        if _vim_blank(line_cur):
            indent = 0
            line_cur_prefix = line_cur_suffix = ""
        else:
            indent = len(line_cur) - len(line_cur.lstrip(" \t"))
    else:
        line_cur = lines[line - 1] + prev[0] if len(prev) == 1 else prev[-1]
        line_cur_prefix, line_cur_suffix = line_cur, ""
        lines_prefix = _vim_getline(lines, max(1, line - n_prefix + len(prev) - 1), line - 1)
        if len(prev) > 1:
            lines_prefix.append(lines[line - 1] + prev[0])
            lines_prefix.extend(prev[1:-1])  # Vim's a:prev[1:-2], whose end is inclusive
        lines_suffix = _vim_getline(lines, line + 1, min(max_y, line + n_suffix))
        indent = indent_last
    return VimLocalContext(
        prefix="\n".join(lines_prefix) + "\n",
        middle=line_cur_prefix,
        suffix=line_cur_suffix + "\n" + "\n".join(lines_suffix) + "\n",
        indent=indent,
        line_cur_suffix=line_cur_suffix,
    )


def _vim_extra(ring: Sequence[Chunk]) -> list[dict[str, Any]]:
    """``s:ring_get_extra``: ``time`` is Vim's ``reltime()``, a list of two numbers."""
    return [{"text": c.text, "time": [c.time, 0], "filename": c.filename} for c in ring]


def _vim_headers(api_key: str) -> dict[str, str]:
    # llama.vim tests len("g:llama_config.api_key"), the length of that literal name, so the
    # header goes out on every request, "Bearer " and nothing else when no key is set.
    return {"Content-Type": "application/json", "Authorization": "Bearer " + api_key}


def llama_vim_fim(
    lines: Sequence[str],
    line: int,
    col: int,
    *,
    ring: Sequence[Chunk] = (),
    prev: Sequence[str] = (),
    indent_last: int = -1,
    n_prefix: int = 256,
    n_suffix: int = 64,
    n_predict: int = 128,
    stop_strings: Sequence[str] = (),
    t_max_prompt_ms: int = 500,
    t_max_predict_ms: int = 1000,
    model_fim: str = "",
    api_key: str = "",
) -> ClientRequest:
    """``llama#fim``: the completion llama.vim asks for at the cursor (``POST /infill``, its
    ``endpoint_fim`` default being ``http://127.0.0.1:8012/infill``), its defaults from
    ``s:default_config``.

    A first request at a place (no ``prev``) gets ``t_max_predict_ms`` 250 whatever the
    setting, since llama.vim follows a shown suggestion with a speculative request (``prev``
    = the suggestion's lines) that gets the configured time. ``ring`` is the ring of chunks
    as it stands when the request is sent (llama.vim first drops the chunks too similar to the
    text around the cursor). ``model`` is sent even when empty (the test guarding it is, like
    the key's, on the literal name's length). llama.vim does not send a request when it was
    triggered automatically and more than ``max_line_suffix`` (8) bytes follow the cursor.

    Of the answer llama.vim reads ``content`` (split on newlines, trailing empty lines
    dropped), ``tokens_cached`` and the six ``timings/...`` keys it asked for; it ignores any
    body that fails :func:`llama_vim_accepts_response`.
    """
    ctx = llama_vim_local_context(
        lines, line, col, prev=prev, indent_last=indent_last, n_prefix=n_prefix, n_suffix=n_suffix
    )
    body: dict[str, Any] = {
        "id_slot": 0,
        "input_prefix": ctx.prefix,
        "input_suffix": ctx.suffix,
        "input_extra": _vim_extra(ring),
        "prompt": ctx.middle,
        "n_predict": n_predict,
        "stop": list(stop_strings),
        "n_indent": ctx.indent,
        "top_k": 40,
        "top_p": 0.90,
        "samplers": ["top_k", "top_p", "infill"],
        "stream": False,
        "cache_prompt": True,
        "t_max_prompt_ms": t_max_prompt_ms,
        "t_max_predict_ms": t_max_predict_ms if prev else 250,
        "response_fields": list(LLAMA_VIM_RESPONSE_FIELDS),
        "model": model_fim,
    }
    return ClientRequest("/infill", body, _vim_headers(api_key))


def llama_vim_ring_update(
    ring: Sequence[Chunk], *, model_fim: str = "", api_key: str = ""
) -> ClientRequest:
    """``s:ring_update``: every ``ring_update_ms`` (1000) while the user is in normal mode (or
    has not moved for 3 s), llama.vim moves one queued chunk into the ring and sends the whole
    ring with nothing to complete, so the server has the chunks decoded before the next
    completion needs them. Nothing is generated (``n_predict`` 0, no samplers) and nothing of
    the answer is wanted (``response_fields: [""]``); llama.vim does not read it."""
    body: dict[str, Any] = {
        "id_slot": 0,
        "input_prefix": "",
        "input_suffix": "",
        "input_extra": _vim_extra(ring),
        "prompt": "",
        "n_predict": 0,
        "temperature": 0.0,
        "samplers": [],
        "stream": False,
        "cache_prompt": True,
        "t_max_prompt_ms": 1,
        "t_max_predict_ms": 1,
        "response_fields": [""],
        "model": model_fim,
    }
    return ClientRequest("/infill", body, _vim_headers(api_key))


def llama_vim_accepts_response(raw: str) -> bool:
    """Whether ``s:fim_on_response`` uses a response body at all: it must start with ``{``
    after spaces or tabs, hold ``"content"`` followed directly by ``:"`` (spaces or tabs may
    come before the colon, none after it, so pretty-printed JSON is ignored), and decode.
    Anything else is dropped without a word to the user."""
    if not raw or re.match(r"[ \t]*\{", raw) is None:
        return False
    if re.search(r'"content"[ \t]*:"', raw) is None:
        return False
    try:
        json.loads(raw)
    except ValueError:
        return False
    return True


# -- llama.vscode ---------------------------------------------------------------------------

LLAMA_VSCODE_DEFAULT_AI_MODEL = "google/gemini-2.5-flash"
"""The ``llama-vscode.ai_model`` default (package.json): the model named on every completion
unless a selected completion model carries its own ``aiModel``."""


@dataclass(frozen=True)
class VscodeLocalContext:
    """What ``LlamaCompletionProvider`` gathers around the cursor."""

    input_prefix: str
    input_suffix: str
    prompt: str
    nindent: int
    line_suffix: str


def _utf16_slice(text: str, start: int, end: int | None = None) -> str:
    """JavaScript's ``String.prototype.slice``: counted in UTF-16 code units, as VS Code's
    ``Position.character`` is."""
    units = text.encode("utf-16-le")
    return units[2 * start : None if end is None else 2 * end].decode("utf-16-le")


def llama_vscode_local_context(
    lines: Sequence[str], line: int, character: int, *, n_prefix: int = 256, n_suffix: int = 64
) -> VscodeLocalContext:
    """``provideInlineCompletionItems`` (src/completion.ts) with ``Utils.getPrefixLines`` and
    ``getSuffixLines``, the cursor at ``Position(line, character)`` (both from 0; ``character``
    in UTF-16 code units).

    As llama.vim: the ``n_prefix`` lines above, each ended by a newline; the cursor's line up
    to the cursor as ``prompt``; the rest of the line, a newline, the ``n_suffix`` lines below
    and a newline as the suffix. Unlike llama.vim, only the text before the cursor is checked
    for blankness: when it is only spaces and tabs the prompt is empty, but the rest of the line
    stays in the suffix. ``nindent`` is the cursor line's leading whitespace, every character
    counting one (``text.length - text.trimStart().length``).
    """
    start = max(0, line - n_prefix)
    end = min(len(lines) - 1, line + n_suffix)
    text = lines[line]
    line_prefix = _utf16_slice(text, 0, character)
    line_suffix = _utf16_slice(text, character)
    prompt = "" if re.fullmatch(r"[ \t]*", line_prefix) else line_prefix
    return VscodeLocalContext(
        input_prefix="\n".join(lines[start:line]) + "\n",
        input_suffix=line_suffix + "\n" + "\n".join(lines[line + 1 : end + 1]) + "\n",
        prompt=prompt,
        nindent=len(text) - len(text.lstrip()),
        line_suffix=line_suffix,
    )


def _vscode_extra(chunks: Sequence[Chunk]) -> list[dict[str, Any]]:
    """``ExtraContext.chunks``: ``time`` is ``Date.now()`` (ms), ``filename`` the document's
    ``fileName``, an absolute path."""
    return [{"text": c.text, "time": c.time, "filename": c.filename} for c in chunks]


def _vscode_headers(api_key: str) -> dict[str, str]:
    """``Configuration.setLlamaRequestConfig``: headers only when a key is set."""
    key = api_key.strip()
    if not key:
        return {}
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


def llama_vscode_fim(
    lines: Sequence[str],
    line: int,
    character: int,
    *,
    chunks: Sequence[Chunk] = (),
    n_prefix: int = 256,
    n_suffix: int = 64,
    n_predict: int = 128,
    max_parallel_completions: int = 3,
    t_max_prompt_ms: int = 500,
    t_max_predict_ms: int = 500,
    ai_model: str = LLAMA_VSCODE_DEFAULT_AI_MODEL,
    api_key: str = "",
) -> ClientRequest:
    """``LlamaServer.getFIMCompletion`` with ``createRequestPayload(false, ...)``: ``POST
    {endpoint}/infill``, defaults from package.json (``t_max_predict_ms`` is 500 there; the
    2500 in configuration.ts is overwritten by the setting's default when the settings load).

    ``n_cmpl`` asks for ``max_parallel_completions`` completions in one request (the user
    steps through them with Alt+] and Alt+[). ``n_indent`` is left out when the cursor's line is
    not indented. ``model`` is ``ai_model`` unless it is blank: the chat model's setting, sent
    whatever the completion server is.

    Of the answer it reads, through :func:`llama_vscode_suggestions`, ``content`` of the one
    object, or of each object of an array (what llama-server returns for ``n_cmpl`` > 1); for
    its status line, when the answer is one object with text, ``tokens_cached``,
    ``generation_settings.n_ctx`` (an object without ``generation_settings`` makes that code
    throw, which also skips the speculative requests it would send next), and ``timings``'
    ``prompt_n``, ``prompt_ms``, ``prompt_per_second``, ``predicted_n``, ``predicted_ms`` and
    ``predicted_per_second``.
    """
    ctx = llama_vscode_local_context(lines, line, character, n_prefix=n_prefix, n_suffix=n_suffix)
    body: dict[str, Any] = {
        "id_slot": 0,
        "input_prefix": ctx.input_prefix,
        "input_suffix": ctx.input_suffix,
        "input_extra": _vscode_extra(chunks),
        "prompt": ctx.prompt,
        "n_predict": n_predict,
        "n_cmpl": max_parallel_completions,
        "top_k": 40,
        "top_p": 0.99,
        "stream": False,
        "samplers": ["top_k", "top_p", "infill"],
        "cache_prompt": True,
    }
    if ctx.nindent:
        body["n_indent"] = ctx.nindent
    body["t_max_prompt_ms"] = t_max_prompt_ms
    body["t_max_predict_ms"] = t_max_predict_ms
    if ai_model.strip():
        body["model"] = ai_model
    return ClientRequest("/infill", body, _vscode_headers(api_key))


def llama_vscode_warmup(
    chunks: Sequence[Chunk], *, t_max_prompt_ms: int = 500, api_key: str = ""
) -> ClientRequest:
    """``LlamaServer.updateExtraContext`` with ``createRequestPayload(true, ...)``: sent each
    time ``periodicRingBufferUpdate`` moves a queued chunk into the ring, the whole ring with
    nothing to complete (``n_predict`` 0, no samplers). Unlike llama.vim's it names no model,
    sends no ``stream`` and no ``response_fields``, and keeps the configured
    ``t_max_prompt_ms``; the answer is not read."""
    body: dict[str, Any] = {
        "id_slot": 0,
        "input_prefix": "",
        "input_suffix": "",
        "input_extra": _vscode_extra(chunks),
        "prompt": "",
        "n_predict": 0,
        "samplers": [],
        "cache_prompt": True,
        "t_max_prompt_ms": t_max_prompt_ms,
        "t_max_predict_ms": 1,
    }
    return ClientRequest("/infill", body, _vscode_headers(api_key))


def llama_vscode_suggestions(response: Any) -> list[str]:
    """``LlamaCompletionProvider.getComplFromContent``: one object gives its ``content``; an
    array gives each element's ``content``, duplicates removed, in order; anything else
    none."""
    if isinstance(response, dict) and "content" in response:
        return [response["content"] or ""]
    if isinstance(response, list):
        return list(dict.fromkeys(item.get("content") or "" for item in response))
    return []


LLAMA_VSCODE_OPENAI_TEMPLATE = (
    "<|fim_prefix|>{inputPrefix}{prompt}<|fim_suffix|>{inputSuffix}<|fim_middle|>"
)
"""The ``llama-vscode.openai_prompt_template`` default."""


def llama_vscode_openai_completion(
    lines: Sequence[str],
    line: int,
    character: int,
    *,
    chunks: Sequence[Chunk] = (),
    n_prefix: int = 256,
    n_suffix: int = 64,
    n_predict: int = 128,
    openai_client_model: str = "",
    openai_prompt_template: str = LLAMA_VSCODE_OPENAI_TEMPLATE,
    api_key: str = "",
) -> ClientRequest:
    """``LlamaServer.handleOpenAICompletion``, used instead of ``/infill`` when
    ``llama-vscode.use_openai_endpoint`` is set (marked experimental in its settings): the
    ``openai`` SDK's ``completions.create`` on ``{endpoint}/completions`` (``endpoint`` is the
    base URL, so ``http://host:port/v1``) with a raw FIM prompt, not buffered, no ``suffix``.

    The prompt is the template with the prefix cut to its last ``n_prefix`` characters and the
    suffix to its first ``n_suffix`` (characters here, where ``/infill`` counts lines). The ring
    chunks are joined as JavaScript turns objects into text, ``[object Object]`` each, under a
    ``Context:`` line. No warm-up request is sent in this mode; the answer's
    ``choices[0].text`` is the suggestion.
    """
    ctx = llama_vscode_local_context(lines, line, character, n_prefix=n_prefix, n_suffix=n_suffix)
    context = "Context:\n\n" + "\n".join("[object Object]" for _ in chunks) if chunks else ""
    # JavaScript's slice(-n): the last n code units (all of them for n = 0).
    prefix_start = max(0, _utf16_len(ctx.input_prefix) - n_prefix) if n_prefix > 0 else 0
    values = {
        "inputPrefix": _utf16_slice(ctx.input_prefix, prefix_start),
        "prompt": ctx.prompt,
        "inputSuffix": _utf16_slice(ctx.input_suffix, 0, n_suffix),
    }
    prompt = re.sub(r"\{(\w+)\}", lambda m: values.get(m[1]) or "", openai_prompt_template)
    body: dict[str, Any] = {
        "model": openai_client_model or "",
        "prompt": context + prompt,
        "max_tokens": n_predict,
        "temperature": 0.1,
        "top_p": 0.99,
        "stream": False,
    }
    headers = {"Authorization": f"Bearer {api_key or 'empty'}", "Content-Type": "application/json"}
    return ClientRequest("/v1/completions", body, headers)


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


# -- Continue -------------------------------------------------------------------------------

CONTINUE_QWEN_STOP = (
    "<|endoftext|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<|im_start|>",
    "<|im_end|>",
)
"""``qwenMultifileFimTemplate.completionOptions.stop``."""

CONTINUE_COMMON_STOP = ("/src/", "#- coding: utf-8", "```")
"""``getStopTokens``' ``commonStops``, added after every template's own."""


def continue_uses_qwen_template(model: str) -> bool:
    """``getTemplateForModel``: the Qwen repository-level template is chosen when the model's
    name holds both ``qwen`` and ``coder`` (any case); a name with ``qwen`` alone gets the
    StarCoder-style ``<fim_prefix>`` template, which a Qwen model does not know."""
    name = model.lower()
    return "qwen" in name and "coder" in name


def continue_qwen_prompt(
    prefix: str,
    suffix: str,
    *,
    filepath: str,
    snippets: Sequence[Snippet] = (),
    reponame: str = "myproject",
) -> str:
    """``qwenMultifileFimTemplate``: without snippets the plain
    ``<|fim_prefix|>…<|fim_suffix|>…<|fim_middle|>``; with them, Qwen's repository format,
    ``<|repo_name|>`` with the workspace folder's name (``myproject`` without one), each
    snippet as ``<|file_sep|>path`` and its content, then ``<|file_sep|>`` and the edited
    file's path before the FIM markers."""
    fim = f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
    if not snippets:
        return fim
    files = "\n".join(f"<|file_sep|>{s.path}\n{s.content}" for s in snippets)
    return f"<|repo_name|>{reponame}\n{files}\n<|file_sep|>{filepath}\n{fim}"


def _continue_prompt(
    prefix: str, suffix: str, model: str, filepath: str, snippets: Sequence[Snippet], repo: str
) -> str:
    if not continue_uses_qwen_template(model):
        raise ValueError(f"Continue does not use the Qwen FIM template for {model!r}")
    # preparePromptContext: an empty suffix becomes one newline.
    return continue_qwen_prompt(prefix, suffix or "\n", filepath=filepath, snippets=snippets,
                                reponame=repo)  # fmt: skip


def continue_openai_autocomplete(
    prefix: str,
    suffix: str,
    *,
    model: str,
    filepath: str,
    snippets: Sequence[Snippet] = (),
    reponame: str = "myproject",
    max_tokens: int = 4096,
    temperature: float = 0.01,
    api_key: str | None = None,
) -> ClientRequest:
    """Continue's tab autocomplete with ``provider: openai`` and ``apiBase:
    http://host:port/v1/``: the OpenAI provider does not support FIM (``supportsFim`` is
    false), so ``CompletionStreamer`` renders the template itself and calls ``streamComplete``
    with ``raw``; ``CompletionProvider._prepareLlm`` sets ``useLegacyCompletionsEndpoint``,
    and ``OpenAI._legacystreamComplete`` posts the prompt to ``{apiBase}completions``,
    streamed. There is no ``suffix`` field: the suffix is inside the prompt.

    ``prefix`` and ``suffix`` are the file's text around the cursor as Continue prunes them
    (by default to 1024 tokens, at most 30 % prefix and 20 % suffix, counted with its own
    tokenizer). ``max_tokens`` is the model's ``maxTokens``: 4096 unless
    ``defaultCompletionOptions.maxTokens`` sets it. ``temperature`` is 0.01 unless set. Every
    stop string goes out (the cap on their number applies to a few hosted APIs only).

    Of the stream it reads ``choices[0].text`` of each event; the filters that cut the
    suggestion (brackets, repeated lines, a line limit) run in the editor.
    """
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stop": [*CONTINUE_QWEN_STOP, *CONTINUE_COMMON_STOP],
        "prompt": _continue_prompt(prefix, suffix, model, filepath, snippets, reponame),
    }
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    headers["api-key"] = api_key or ""  # sent for Azure, to every OpenAI-style server
    return ClientRequest("/v1/completions", body, headers)


def continue_llamacpp_autocomplete(
    prefix: str,
    suffix: str,
    *,
    model: str,
    filepath: str,
    snippets: Sequence[Snippet] = (),
    reponame: str = "myproject",
    max_tokens: int = 4096,
    temperature: float = 0.01,
    api_key: str | None = None,
) -> ClientRequest:
    """Continue's tab autocomplete with ``provider: llama.cpp``: the same rendered prompt
    posted to llama-server's native ``{apiBase}completion`` (not ``/infill``, not
    ``/v1/completions``), streamed, as ``LlamaCpp._streamComplete`` sends it. The header is
    ``Bearer`` and the key, ``Bearer undefined`` when none is set. This server does not serve
    ``/completion``; the OpenAI provider is the one to use with it."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": _continue_prompt(prefix, suffix, model, filepath, snippets, reponame),
        "stream": True,
        "n_predict": max_tokens,
        "stop": [*CONTINUE_QWEN_STOP, *CONTINUE_COMMON_STOP],
        "temperature": temperature,
    }
    key = "undefined" if api_key is None else api_key  # a JavaScript template literal's text
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    return ClientRequest("/completion", body, headers)


# -- Tabby ----------------------------------------------------------------------------------

TABBY_FIM_MARKER = "<|FIM|>"
"""Where Tabby's ``openai/completion`` kind splits its prompt into ``prompt`` and ``suffix``
(``FIM_TEMPLATE`` is ``{prefix}<|FIM|>{suffix}``)."""


def _rust_lines(text: str) -> list[str]:
    """Rust's ``str::lines``: no empty last line after a final newline, ``\\r`` dropped."""
    parts = text.split("\n")
    if parts[-1] == "":
        parts.pop()
    return [p.removesuffix("\r") for p in parts]


def _tabby_prefix(prefix: str, snippets: Sequence[Snippet], line_comment: str | None) -> str:
    """``build_prefix``: each snippet as ``Path: …`` and its lines, commented out with the
    language's line comment, above the prefix (nothing is added for a language without one)."""
    if not snippets or line_comment is None:
        return prefix
    lines: list[str] = []
    for i, snippet in enumerate(snippets):
        lines.append(f"Path: {snippet.path}")
        lines.extend(_rust_lines(snippet.content))
        if i < len(snippets) - 1:
            lines.append("")
    commented = [f"{line_comment} {x}" if x else line_comment for x in lines]
    return "\n".join(commented) + "\n" + prefix


def _tabby_clip(prompt: str, max_length: int) -> str:
    """``clip_prompt``: the last ``max_length`` bytes, moved forward to a character start."""
    data = prompt.encode()
    if max_length <= 0 or len(data) <= max_length:
        return prompt
    start = len(data) - max_length
    while start < len(data) and data[start] & 0xC0 == 0x80:
        start += 1
    return data[start:].decode()


def _tabby_request(
    model_name: str,
    prompt: str,
    suffix: str | None,
    max_decoding_tokens: int,
    temperature: float,
    api_key: str | None,
) -> ClientRequest:
    body: dict[str, Any] = {
        "model": model_name,
        "prompt": prompt,
        "suffix": suffix,
        "max_tokens": max_decoding_tokens,
        "temperature": temperature,
        "stream": True,
        "presence_penalty": 0.0,
    }
    headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
    return ClientRequest("/v1/completions", body, headers)


def tabby_openai_completion(
    prefix: str,
    suffix: str,
    *,
    model_name: str,
    snippets: Sequence[Snippet] = (),
    line_comment: str | None = "#",
    max_decoding_tokens: int = 64,
    temperature: float = 0.1,
    max_input_length: int = 1536,
    api_key: str | None = None,
) -> ClientRequest:
    """Tabby's ``kind = "openai/completion"`` completion model (``OpenAICompletionEngine``
    with FIM): ``POST {api_endpoint}/completions`` (``api_endpoint`` ending in ``/v1``) with
    the text before the cursor as ``prompt`` and the text after it as ``suffix``, streamed.

    The prompt is built as ``{prefix}<|FIM|>{suffix}`` (an empty suffix becomes one newline;
    snippets from other files go above the prefix as comments), cut to its last
    ``max_input_length`` bytes (``[completion] max_input_length``, 1536), then split at the
    first marker: a suffix longer than the limit loses the marker, and the whole request is
    then a ``prompt`` with ``"suffix": null``. ``max_tokens`` is ``[completion]
    max_decoding_tokens`` (64); the temperature 0.1 unless the editor sends one; no stop
    strings are sent (Tabby stops on its own per-language stop words as text arrives).
    """
    full = _tabby_prefix(prefix, snippets, line_comment) + TABBY_FIM_MARKER + (suffix or "\n")
    head, marker, tail = _tabby_clip(full, max_input_length).partition(TABBY_FIM_MARKER)
    return _tabby_request(model_name, head, tail if marker else None, max_decoding_tokens,
                          temperature, api_key)  # fmt: skip


def tabby_vllm_completion(
    prefix: str,
    suffix: str,
    *,
    model_name: str,
    prompt_template: str,
    snippets: Sequence[Snippet] = (),
    line_comment: str | None = "#",
    max_decoding_tokens: int = 64,
    temperature: float = 0.1,
    max_input_length: int = 1536,
    api_key: str | None = None,
) -> ClientRequest:
    """Tabby's ``kind = "vllm/completion"`` (or ``openai/legacy_completion_no_fim``): the
    same endpoint and fields, but the whole prompt is the user's ``prompt_template`` with
    ``{prefix}`` and ``{suffix}`` filled in (for Qwen:
    ``<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>``) and ``suffix`` is always
    ``null``. The same cut to the last ``max_input_length`` bytes applies to the rendered
    template, so a long prefix loses the template's opening marker."""
    values = {"prefix": _tabby_prefix(prefix, snippets, line_comment), "suffix": suffix or "\n"}
    prompt = re.sub(r"\{(prefix|suffix)\}", lambda m: values[m[1]], prompt_template)
    return _tabby_request(model_name, _tabby_clip(prompt, max_input_length), None,
                          max_decoding_tokens, temperature, api_key)  # fmt: skip


def tabby_read_stream(payloads: Iterable[str]) -> str:
    """What Tabby's ``OpenAICompletionEngine`` makes of a stream's ``data:`` payloads, in
    order: each must be a completion chunk (``choices``, each choice with a string ``text``)
    until one carries a ``finish_reason``; that ends the read. Tabby parses with ``expect``,
    so a payload that is not such a chunk (``[DONE]`` before any ``finish_reason``, an in-band
    error) kills its completion task; here it raises ``ValueError``."""
    text = ""
    for payload in payloads:
        chunk = json.loads(payload)
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        if not isinstance(choices, list):
            raise ValueError(f"not a completion chunk: {payload[:200]!r}")
        if not choices:
            continue
        first = choices[0]
        piece = first.get("text") if isinstance(first, dict) else None
        if not isinstance(piece, str):
            raise ValueError(f"a choice without text: {payload[:200]!r}")
        text += piece
        if first.get("finish_reason") is not None:
            return text
    return text
