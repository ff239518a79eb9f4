"""``python -m bench.editing``: an editor's fill-in-the-middle session against ``POST /infill``,
on this server and ``llama-server --cache-reuse 256``, servers taking turns.

    python -m bench.editing [--model tiny] [--lines 500] [--start-line 280] [--positions 12]
        [--ring-chunks 16] [--n-predict 128] [--no-speculative] [--seed 7]
        [--variant "qwen3-moe-serve --cache-reuse 0" ...] [--llama-server PATH] [--repeat 1]
        [--quick] [--out bench/results]

The load is what llama.vim (ggml-org/llama.vim, its defaults) sends while someone edits one
Python file: a source text of ``--lines`` lines generated from ``--seed``, the cursor walking
down from ``--start-line`` through ``--positions`` places (a few lines at a time, now and then
on to another function), at each one a new line opened below and typed, or the current line
edited (an argument added before its closing parenthesis, a comment appended), a few
keystrokes at a time. Every few keystrokes llama.vim sends a request (it holds back while one
is in flight): 256 lines above the cursor as ``input_prefix``, the current line up to the
cursor as ``prompt``, the rest of it and 64 lines below as ``input_suffix``, its ring of extra
chunks as ``input_extra``, 128 tokens asked for, ``t_max_predict_ms`` 250; once a suggestion is
shown it sends a second, *speculative* request as if the suggestion had been accepted
(``--no-speculative`` leaves these out). The ring holds ``--ring-chunks`` chunks of 33 lines,
full from the start (as after a while of editing other files); once the cursor has moved more
than 32 lines llama.vim picks a chunk further up and one below the suffix, and whenever the
editor is in normal mode (between positions) one picked chunk enters the ring, its oldest
leaving from the front, followed by llama.vim's cache warm-up request (the ring alone,
``n_predict`` 0). Requests go one at a time, on a fresh connection each (llama.vim runs curl
per request), each with a ``seed`` of its own so that the servers sample alike where their
prompts agree. The servers get one slot and the same context; llama-server the batch of
llama.cpp's ``--fim-qwen-30b-default`` preset (``-b 1024 -ub 1024``, which is also its FIM
window), this server its defaults (``--fim-window 1024``, ``--cache-reuse 256``).

Two deliberate additions to llama.vim's requests, both only in what the response carries:
``response_fields`` also names ``tokens_evaluated`` and ``timings/cache_n`` (the prompt's size
and its cached part), and the warm-up asks for the timings llama.vim ignores.

Reported per server, over every FIM request (the warm-ups apart): latency p50/p95, and the same
less the server's own generation time (``timings/predicted_ms``: the bench models sample random
text, so completion lengths may differ between servers); the prompt tokens decoded
(``timings/prompt_n``) against the *edit*: the tokens of the request's FIM prompt that no run of
at least 16 tokens of the previous request's prompt and completion holds (what typing, moving
or a ring change brought in; the prompt as llama-server's ``format_prompt_infill`` builds it
for the server's window), on every request after the first; ``tokens_cached``; completion
tokens (``timings/predicted_n``). Per kind of request too: the session's first, a keystroke,
the first at a new position, the first after a ring change, a speculative one, a warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import random
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from app.core.infill import ChunkTokens, ExtraChunk, FimWindow, fim_prompt
from app.settings import Settings
from bench import facts, report
from bench.conversations import Variant
from bench.model import ensure_bench_model
from bench.run import BUILT_MODELS
from bench.servers import (
    LLAMA_SERVER,
    OURS,
    OtherLoad,
    Server,
    ServerSettings,
    serve,
    server,
    stop_servers_on_sigterm,
)

ROOT = Path(__file__).resolve().parent.parent
N_CTX = 33792
"""Context per slot (bench.conversations' too, so the same bench model file serves both): a
full ring of the bench vocabulary's ~0.9 tokens a character fits with room to spare."""
READY_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 600.0
INFILL = "/infill"

# llama.vim's defaults (autoload/llama.vim).
N_PREFIX = 256
N_SUFFIX = 64
N_PREDICT = 128
T_MAX_PROMPT_MS = 500
T_MAX_PREDICT_MS = 1000
T_MAX_PREDICT_FIRST_MS = 250
"""The first request at a position: the speculative one after it gets the full time."""
RING_N_CHUNKS = 16
RING_CHUNK_SIZE = 64
RING_QUEUE = 16
RING_SCOPE = 1024
PICK_DISTANCE = 32
"""llama.vim picks chunks around the cursor once it has moved more than this many lines."""
MAX_LINE_SUFFIX = 8
"""llama.vim sends no automatic request with more characters than this right of the cursor."""
RESPONSE_FIELDS = (
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
MEASURED_FIELDS = ("tokens_evaluated", "timings/cache_n")
"""What the bench asks for beyond llama.vim's fields: the prompt's size and its cached part."""
KEYS_PER_REQUEST = (2, 5)
"""Keystrokes between two requests: llama.vim sends on every cursor move in insert mode but
waits while a request is in flight, so a typist's keystrokes arrive a few at a time."""
EDIT_RUN = 16
"""The shortest run of the previous request's tokens that counts as still held (an edit is
what no such run covers)."""

JUMP_SHARE = 0.25
"""How often the cursor moves on to another part of the file rather than a few lines down."""
KINDS = ("first", "keystroke", "new position", "after ring change", "speculative", "warm-up")
DECODED_BUCKETS = (8, 32, 128, 512, 2048)
DEFAULT_VARIANTS = (
    Variant(OURS),
    # llama.cpp's --fim-qwen-30b-default preset, less its download: its batch is its FIM
    # window, 1024 tokens, as this server's --fim-window default.
    Variant(LLAMA_SERVER, ("--cache-reuse", "256", "-b", "1024", "-ub", "1024")),
)
WINDOW_FLAGS = {OURS: ("--fim-window",), LLAMA_SERVER: ("-b", "--batch-size")}
DEFAULT_WINDOW = {OURS: int(Settings.model_fields["fim_window"].default), LLAMA_SERVER: 2048}
"""The tokens around the cursor a FIM prompt keeps when no flag sets them: this server's
``--fim-window``, llama-server's logical batch (llama.cpp's common default)."""
BATCH_FLAGS = ("--n-batch", "--batch-size", "--ubatch-size")
"""The harness's prefill flags, left out: each server runs its defaults or the variant's."""


# -- the source text ---------------------------------------------------------------------------

NOUNS = (
    "request", "buffer", "token", "slot", "cache", "prompt", "config", "path", "count", "limit",
    "index", "window", "chunk", "line", "text", "result", "value", "item", "name", "size",
    "offset", "state", "queue", "batch", "model", "entry", "record", "header", "payload",
    "session", "handler", "timeout", "retry", "total", "prefix", "suffix", "cursor", "column",
)  # fmt: skip
VERBS = (
    "load", "parse", "build", "read", "write", "send", "update", "find", "check", "merge",
    "split", "format", "render", "apply", "reset", "collect", "measure", "encode", "decode",
    "resolve", "drop", "place",
)  # fmt: skip
TYPES = ("int", "str", "float", "bool", "bytes", "list[str]", "dict[str, int]", "Path")
MODULES = (
    "json", "logging", "os", "re", "time", "asyncio", "dataclasses", "itertools", "functools",
    "pathlib", "collections", "contextlib", "typing", "hashlib",
)  # fmt: skip


class Writer:
    """Python-shaped lines from one seeded generator: classes, functions, statements."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def name(self) -> str:
        r = self.rng
        return r.choice(NOUNS) if r.random() < 0.6 else f"{r.choice(NOUNS)}_{r.choice(NOUNS)}"

    def call(self) -> str:
        r = self.rng
        args = ", ".join(self.name() for _ in range(r.randint(0, 3)))
        head = r.choice(("", "self.", f"{self.name()}."))
        return f"{head}{r.choice(VERBS)}_{r.choice(NOUNS)}({args})"

    def expression(self) -> str:
        r = self.rng
        shapes = (
            self.name,
            self.call,
            lambda: f"{self.name()} + {r.randint(1, 64)}",
            lambda: f"len({self.name()})",
            lambda: f"{self.name()}[{self.name()}]",
            lambda: f'"{r.choice(NOUNS)} {r.choice(VERBS)}"',
            lambda: f"min({self.name()}, {self.name()})",
            lambda: f"{self.name()} * {self.name()}",
            lambda: f"{self.name()} is not None",
        )
        return r.choice(shapes)()

    def statement(self) -> str:
        """One simple statement (no block opened)."""
        r = self.rng
        pick = r.random()
        if pick < 0.45:
            return f"{self.name()} = {self.expression()}"
        if pick < 0.55:
            return f"{self.name()} += {self.expression()}"
        if pick < 0.7:
            return self.call()
        if pick < 0.8:
            return f'logger.debug("{r.choice(VERBS)} %s", {self.name()})'
        if pick < 0.88:
            return f"# {r.choice(VERBS)} the {r.choice(NOUNS)} before the {r.choice(NOUNS)}"
        if pick < 0.94:
            return f"assert {self.name()} is not None"
        return f'raise ValueError(f"bad {r.choice(NOUNS)}: {{{self.name()}}}")'

    def header(self) -> str:
        """A statement that opens a block."""
        r = self.rng
        shapes = (
            lambda: f"if {self.expression()}:",
            lambda: f"for {r.choice(NOUNS)} in {self.name()}:",
            lambda: f"with {self.call()} as {r.choice(NOUNS)}:",
            lambda: f"while {self.name()} < {self.name()}:",
        )
        return r.choice(shapes)()

    def block(self, indent: int, depth: int, count: int) -> list[str]:
        pad = " " * indent
        lines: list[str] = []
        for _ in range(count):
            if depth < 3 and self.rng.random() < 0.2:
                lines.append(pad + self.header())
                lines += self.block(indent + 4, depth + 1, self.rng.randint(1, 4))
            else:
                lines.append(pad + self.statement())
        return lines

    def function(self, indent: int, method: bool) -> list[str]:
        r = self.rng
        pad = " " * indent
        params = [f"{r.choice(NOUNS)}: {r.choice(TYPES)}" for _ in range(r.randint(0, 3))]
        if method:
            params.insert(0, "self")
        signature = (
            f"def {r.choice(VERBS)}_{self.name()}({', '.join(params)}) -> {r.choice(TYPES)}:"
        )
        doc = (
            f'"""{r.choice(VERBS).capitalize()} the {r.choice(NOUNS)} of the {r.choice(NOUNS)}."""'
        )
        body = self.block(indent + 4, 1, r.randint(3, 12))
        return [pad + signature, pad + "    " + doc, *body, f"{pad}    return {self.expression()}"]

    def klass(self) -> list[str]:
        r = self.rng
        name = "".join(n.capitalize() for n in (r.choice(NOUNS), r.choice(NOUNS)))
        lines = [f"class {name}:", f'    """The {r.choice(NOUNS)} of one {r.choice(NOUNS)}."""']
        fields = [r.choice(NOUNS) for _ in range(r.randint(1, 4))]
        init = ", ".join(f"{f}: {r.choice(TYPES)}" for f in fields)
        lines += ["", f"    def __init__(self, {init}) -> None:"]
        lines += [f"        self.{f} = {f}" for f in fields]
        for _ in range(r.randint(2, 4)):
            lines += ["", *self.function(4, method=True)]
        return lines

    def module(self, n_lines: int) -> list[str]:
        """A module of at least ``n_lines`` lines (its last definition whole)."""
        r = self.rng
        imports = sorted(r.sample(MODULES, r.randint(4, 8)))
        lines = [
            f'"""{r.choice(VERBS).capitalize()} {r.choice(NOUNS)}s for the {r.choice(NOUNS)}."""',
            "",
            "from __future__ import annotations",
            "",
            *(f"import {m}" for m in imports),
            "",
            "logger = logging.getLogger(__name__)",
            "",
            *(f"{r.choice(NOUNS).upper()}_LIMIT = {r.randint(2, 4096)}" for _ in range(3)),
        ]
        while len(lines) < n_lines:
            lines += ["", "", *(self.klass() if r.random() < 0.4 else self.function(0, False))]
        return lines


# -- the session ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """A ring entry: lines of a file, as llama.vim keeps them."""

    lines: tuple[str, ...]
    filename: str
    time: tuple[int, int]
    """llama.vim sends ``reltime()``: seconds and microseconds."""

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def chunk_similarity(a: Sequence[str], b: Sequence[str]) -> float:
    """llama.vim's ``s:chunk_sim``: twice the lines of ``a`` found in ``b``, over both sizes."""
    common = sum(1 for line in a if line in b)
    return 2.0 * common / (len(a) + len(b))


@dataclass
class Ring:
    """llama.vim's ring of extra context: picked chunks wait in a queue; one at a time enters
    the ring, the oldest leaving from the front when it is full."""

    n_chunks: int
    chunks: list[Chunk] = field(default_factory=list)
    queued: list[Chunk] = field(default_factory=list)
    evicted: int = 0

    def pick(self, rng: random.Random, text: Sequence[str], filename: str, now: float) -> None:
        """``s:pick_chunk(text, no_mod=false, do_evict=false)``."""
        if self.n_chunks <= 0 or len(text) < 3:
            return
        if len(text) + 1 < RING_CHUNK_SIZE:
            lines = tuple(text)
        else:
            first = rng.randint(0, max(0, len(text) - RING_CHUNK_SIZE // 2))
            last = min(first + RING_CHUNK_SIZE // 2, len(text))
            lines = tuple(text[first : last + 1])  # vim's slices hold their last index
        held = [c.lines for c in (*self.chunks, *self.queued)]
        if lines in held or any(chunk_similarity(h, lines) > 0.9 for h in held):
            return
        if len(self.queued) == RING_QUEUE:
            self.queued.pop(0)
        self.queued.append(Chunk(lines, filename, (int(now), int(now * 1e6) % 1_000_000)))

    def update(self) -> bool:
        """``s:ring_update``: move the first queued chunk into the ring; whether one moved."""
        if not self.queued:
            return False
        if len(self.chunks) == self.n_chunks:
            self.chunks.pop(0)
        self.chunks.append(self.queued.pop(0))
        return True

    def evict_similar(self, local: Sequence[str]) -> None:
        """Before a request llama.vim drops ring chunks much like the text around the cursor."""
        kept = [c for c in self.chunks if chunk_similarity(c.lines, local) <= 0.5]
        self.evicted += len(self.chunks) - len(kept)
        self.chunks = kept


@dataclass(frozen=True)
class Fim:
    """A request at the cursor: the buffer around it when the keystrokes before it were typed."""

    kind: str
    row: int
    """The cursor's line, 1-based (vim's ``line('.')``)."""
    col: int
    """Characters left of the cursor on its line."""
    line: str
    lines_prefix: tuple[str, ...]
    lines_suffix: tuple[str, ...]
    ring: tuple[Chunk, ...]
    typed: str


@dataclass(frozen=True)
class WarmUp:
    """llama.vim's request after a chunk entered the ring: the ring alone, nothing generated."""

    ring: tuple[Chunk, ...]
    kind: str = "warm-up"


Event = Fim | WarmUp


@dataclass(frozen=True)
class Session:
    """What a session is drawn from (``--lines`` ... ``--seed``)."""

    lines: int = 500
    start_line: int = 280
    positions: int = 12
    ring_chunks: int = RING_N_CHUNKS
    seed: int = 7


OTHER_FILES = ("app/models.py", "app/storage.py", "app/handlers.py")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _edit(writer: Writer, buffer: list[str], row: int) -> tuple[int, int, str]:
    """Choose the edit at ``row`` (1-based): a new line below, typed, or text added to the line
    itself. Returns the row and column where typing starts, and the text to type; a new line
    is already in ``buffer``, holding its indentation."""
    rng = writer.rng
    line = buffer[row - 1]
    if line.strip() and rng.random() < 0.3:
        if line.endswith(("):", ")")):
            col = len(line) - (2 if line.endswith("):") else 1)
            return row, col, f", {rng.choice(NOUNS)}={writer.name()}"
        return row, len(line), f"  # {rng.choice(VERBS)} the {writer.name()}"
    indent = _indent(line) + (4 if line.rstrip().endswith(":") else 0)
    buffer.insert(row, " " * indent)
    return row + 1, indent, writer.statement()


def session(spec: Session) -> list[Event]:
    """The requests of one editing session, in order (the speculative requests apart: each
    follows its request at run time, built from the suggestion it got)."""
    rng = random.Random(spec.seed)
    writer = Writer(rng)
    buffer = writer.module(spec.lines)
    others = {name: writer.module(spec.lines // 2) for name in OTHER_FILES}
    ring = Ring(spec.ring_chunks)
    now = 1000.0
    # The ring as after a while of editing: chunks of the other files, picked as the editor
    # entered and left their buffers, one update each.
    for i in range(4 * spec.ring_chunks):  # a pick like one held already is dropped
        if len(ring.chunks) == spec.ring_chunks:
            break
        filename = OTHER_FILES[i % len(OTHER_FILES)]
        ring.pick(rng, others[filename], filename, now)
        ring.update()
        now += 1.0
    events: list[Event] = [WarmUp(tuple(ring.chunks))] if ring.chunks else []
    row = min(spec.start_line, len(buffer))
    picked_at = -9999
    for position in range(spec.positions):
        if position:
            # a few lines down, or now and then on to another function
            step = rng.randint(10, 40) if rng.random() < JUMP_SHARE else rng.randint(1, 6)
            row = min(row + step, len(buffer))
            while not buffer[row - 1].strip() and row < len(buffer):
                row += 1
            now += 2.0  # moving in normal mode: llama.vim's ring update runs every second
            if ring.update():
                events.append(WarmUp(tuple(ring.chunks)))
        row, col, text = _edit(writer, buffer, row)
        kind = "new position"
        if events and isinstance(events[-1], WarmUp):
            kind = "first" if position == 0 else "after ring change"
        typed_at = 0
        while typed_at < len(text):
            keys = text[typed_at : typed_at + rng.randint(*KEYS_PER_REQUEST)]
            typed_at += len(keys)
            line = buffer[row - 1]
            buffer[row - 1] = line[:col] + keys + line[col:]
            col += len(keys)
            now += 0.3
            local = buffer[max(0, row - 1 - RING_CHUNK_SIZE // 2) : row + RING_CHUNK_SIZE // 2]
            first = rng.randint(0, max(0, len(local) - RING_CHUNK_SIZE // 2))
            ring.evict_similar(local[first : first + RING_CHUNK_SIZE // 2 + 1])
            events.append(
                Fim(
                    kind=kind,
                    row=row,
                    col=col,
                    line=buffer[row - 1],
                    lines_prefix=tuple(buffer[max(0, row - 1 - N_PREFIX) : row - 1]),
                    lines_suffix=tuple(buffer[row : row + N_SUFFIX]),
                    ring=tuple(ring.chunks),
                    typed=keys,
                )
            )
            kind = "keystroke"
            if abs(row - picked_at) > PICK_DISTANCE:
                # expand the prefix further up, and a chunk below the suffix
                above = buffer[max(0, row - RING_SCOPE - 1) : max(1, row - N_PREFIX)]
                below = buffer[row + N_SUFFIX - 1 : row + N_SUFFIX + RING_CHUNK_SIZE]
                ring.pick(rng, above, "app/editor.py", now)
                ring.pick(rng, below, "app/editor.py", now)
                picked_at = row
    return events


# -- the requests --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """``s:fim_ctx_local``: the local context of a request."""

    prefix: str
    middle: str
    suffix: str
    indent: int


def fim_context(fim: Fim, prev: Sequence[str] = ()) -> Context:
    """The local context at ``fim``'s cursor; with ``prev`` (a suggestion's lines), as if the
    suggestion had been accepted (llama.vim's speculative request)."""
    lines_prefix = list(fim.lines_prefix)
    if not prev:
        line_prefix, line_suffix = fim.line[: fim.col], fim.line[fim.col :]
        if not fim.line.strip():
            indent, line_prefix, line_suffix = 0, "", ""
        else:
            indent = _indent(fim.line)
        middle = line_prefix
    else:
        line_suffix = ""
        middle = fim.line + prev[0] if len(prev) == 1 else prev[-1]
        # the prefix window starts len(prev) - 1 lines lower
        start, later = max(1, fim.row - N_PREFIX), max(1, fim.row - N_PREFIX + len(prev) - 1)
        lines_prefix = lines_prefix[later - start :]
        if len(prev) > 1:
            lines_prefix += [fim.line + prev[0], *prev[1:-1]]
        indent = _indent(fim.line) if fim.line.strip() else 0
    return Context(
        prefix="\n".join(lines_prefix) + "\n",
        middle=middle,
        suffix=line_suffix + "\n" + "\n".join(fim.lines_suffix) + "\n",
        indent=indent,
    )


def extra(ring: Sequence[Chunk]) -> list[dict[str, Any]]:
    return [{"text": c.text, "time": list(c.time), "filename": c.filename} for c in ring]


def infill_request(
    context: Context, ring: Sequence[Chunk], *, seed: int, n_predict: int, first: bool
) -> dict[str, Any]:
    """llama.vim's FIM request (``llama#fim``), with a seed and the bench's response fields."""
    return {
        "id_slot": 0,
        "input_prefix": context.prefix,
        "input_suffix": context.suffix,
        "input_extra": extra(ring),
        "prompt": context.middle,
        "n_predict": n_predict,
        "stop": [],
        "n_indent": context.indent,
        "top_k": 40,
        "top_p": 0.90,
        "samplers": ["top_k", "top_p", "infill"],
        "stream": False,
        "cache_prompt": True,
        "t_max_prompt_ms": T_MAX_PROMPT_MS,
        "t_max_predict_ms": T_MAX_PREDICT_FIRST_MS if first else T_MAX_PREDICT_MS,
        "seed": seed,
        "response_fields": [*RESPONSE_FIELDS, *MEASURED_FIELDS],
    }


def warm_up_request(ring: Sequence[Chunk]) -> dict[str, Any]:
    """llama.vim's cache warm-up (``s:ring_update``), asking for timings llama.vim ignores."""
    return {
        "id_slot": 0,
        "input_prefix": "",
        "input_suffix": "",
        "input_extra": extra(ring),
        "prompt": "",
        "n_predict": 0,
        "temperature": 0.0,
        "samplers": [],
        "stream": False,
        "cache_prompt": True,
        "t_max_prompt_ms": 1,
        "t_max_predict_ms": 1,
        "response_fields": ["timings/prompt_n", "timings/prompt_ms", "tokens_cached",
                            *MEASURED_FIELDS],
    }  # fmt: skip


def response_field(body: dict[str, Any], name: str) -> Any:
    """A field named as in ``response_fields``: llama-server's flat ``"timings/prompt_n"`` key,
    or the nested path where a server ignored ``response_fields``."""
    if name in body:
        return body[name]
    found: Any = body
    for part in name.split("/"):
        if not isinstance(found, dict) or part not in found:
            return None
        found = found[part]
    return found


# -- running -------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One request and what came back."""

    kind: str
    request: dict[str, Any]
    latency_s: float = 0.0
    error: str | None = None
    content: str = ""
    prompt_n: int | None = None
    prompt_ms: float | None = None
    predicted_n: int | None = None
    predicted_ms: float | None = None
    tokens_cached: int | None = None
    tokens_evaluated: int | None = None
    cache_n: int | None = None
    edit_tokens: int | None = None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def send(http: httpx.Client, sample: Sample) -> Sample:
    started = time.perf_counter()
    try:
        response = http.post(INFILL, json=sample.request)
    except httpx.HTTPError as exc:
        sample.error = f"{type(exc).__name__}: {exc}"[:200]
        return sample
    sample.latency_s = time.perf_counter() - started
    if response.status_code != 200:
        sample.error = f"HTTP {response.status_code}: {response.text[:200]}"
        return sample
    try:
        body = response.json()
    except ValueError:
        sample.error = f"not JSON: {response.text[:200]}"
        return sample
    if not isinstance(body, dict):
        sample.error = f"not a JSON object: {response.text[:200]}"
        return sample
    content = response_field(body, "content")
    sample.content = content if isinstance(content, str) else ""
    sample.prompt_n = _int(response_field(body, "timings/prompt_n"))
    sample.prompt_ms = _float(response_field(body, "timings/prompt_ms"))
    sample.predicted_n = _int(response_field(body, "timings/predicted_n"))
    sample.predicted_ms = _float(response_field(body, "timings/predicted_ms"))
    sample.tokens_cached = _int(response_field(body, "tokens_cached"))
    sample.tokens_evaluated = _int(response_field(body, "tokens_evaluated"))
    sample.cache_n = _int(response_field(body, "timings/cache_n"))
    return sample


def requests(
    events: Sequence[Event], n_predict: int, speculative: bool, seed: int
) -> Iterator[tuple[Sample, Fim | None]]:
    """The session's requests in order; a speculative one is built by the caller from the
    suggestion the request before it got (the ``Fim`` it follows is passed along)."""
    for i, event in enumerate(events):
        if isinstance(event, WarmUp):
            yield Sample("warm-up", warm_up_request(event.ring)), None
            continue
        body = infill_request(
            fim_context(event), event.ring, seed=seed + 2 * i, n_predict=n_predict, first=True
        )
        yield Sample(event.kind, body), (event if speculative else None)


def editor_client(base_url: str) -> httpx.Client:
    """A fresh connection per request, as llama.vim's curl makes."""
    limits = httpx.Limits(max_keepalive_connections=0)
    return httpx.Client(base_url=base_url, limits=limits, timeout=REQUEST_TIMEOUT_S)


def run_session(
    http: httpx.Client, events: Sequence[Event], n_predict: int, speculative: bool, seed: int
) -> tuple[list[Sample], str | None]:
    """Send the session's requests one at a time. Returns them and, when the server could not
    serve the session (no ``/infill``, errors in a row, gone), why."""
    done: list[Sample] = []
    for i, (sample, fim) in enumerate(requests(events, n_predict, speculative, seed)):
        done.append(send(http, sample))
        if sample.error is None and fim is not None and sample.content.strip():
            prev = sample.content.split("\n")
            body = infill_request(
                fim_context(fim, prev), fim.ring, seed=seed + 2 * i + 1,
                n_predict=n_predict, first=False,
            )  # fmt: skip
            done.append(send(http, Sample("speculative", body)))
        failure = _failure(done)
        if failure is not None:
            return done, failure
    return done, None


def _failure(done: Sequence[Sample]) -> str | None:
    last = done[-1]
    if last.error is None:
        return None
    if len(done) == 1 or last.error.startswith(("HTTP 404", "HTTP 405", "Connect")):
        return f"POST {INFILL} failed: {last.error}"
    if len(done) >= 3 and all(s.error is not None for s in done[-3:]):
        return f"3 requests in a row failed, the last: {last.error}"
    return None


# -- the edit ------------------------------------------------------------------------------------


class FimTokens:
    """A server's FIM prompt as llama-server's ``format_prompt_infill`` lays it out, which is
    this server's layout (``app.core.infill.fim_prompt``, used here): ``[repo]myproject`` and
    each extra chunk after ``[file_sep]filename``, then ``[file_sep]filename [fim_prefix]
    prefix prompt [fim_suffix] suffix [fim_middle]``, the text around the cursor cut to the
    server's window (three quarters of it for the prefix's tail, the rest less the typed text
    for the suffix's head). The session's ring always fits the context whole."""

    def __init__(self, model: Path) -> None:
        import llama_cpp  # only once a run is measured

        from app.engine.tokenizer import LlamaTokenizer

        self._llama: Any = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
        self._tokenizer = LlamaTokenizer(self._llama._model)
        fim = self._tokenizer.fim
        if fim is None or fim.repo_name is None or fim.file_sep is None:
            raise ValueError(f"{model.name} has no fill-in-the-middle tokens")
        self._fim = fim
        self.text = ChunkTokens(self._tokenizer, size=4096)

    def prompt(self, request: dict[str, Any], window: int) -> list[int]:
        built = fim_prompt(
            self._tokenizer,
            self._fim,
            prefix=request["input_prefix"],
            suffix=request["input_suffix"],
            middle=request["prompt"],
            extra=[ExtraChunk(c["text"], c["filename"]) for c in request["input_extra"]],
            window=FimWindow.of(around=window, n_ctx=N_CTX, reserve=0),
            chunk_tokens=self.text,
        )
        return built.tokens


def edit_tokens(held: Sequence[int], prompt: Sequence[int], run: int = EDIT_RUN) -> int:
    """The tokens of ``prompt`` that no run of at least ``run`` tokens of ``held`` covers: what
    a cache holding ``held`` would still decode if it could reuse every such run, wherever it
    lies (llama-server's chunk reuse takes runs of ``--cache-reuse`` tokens, in order)."""
    starts: dict[tuple[int, ...], list[int]] = {}
    for i in range(len(held) - run + 1):
        starts.setdefault(tuple(held[i : i + run]), []).append(i)
    fresh = p = 0
    while p < len(prompt):
        found = starts.get(tuple(prompt[p : p + run])) if p + run <= len(prompt) else None
        if not found:
            fresh += 1
            p += 1
            continue
        longest = 0
        for start in found[:8]:  # a few candidates: repeated code has many
            n = run
            while (
                start + n < len(held) and p + n < len(prompt) and held[start + n] == prompt[p + n]
            ):
                n += 1
            longest = max(longest, n)
        p += longest
    return fresh


def count_edits(samples: Sequence[Sample], tokens: FimTokens, window: int) -> None:
    """Fill every answered request's ``edit_tokens``: against the request answered before it
    (its prompt and its completion: what one slot holds), the first request's whole prompt."""
    held: list[int] = []
    for sample in samples:
        if sample.error is not None:
            continue
        prompt = tokens.prompt(sample.request, window)
        sample.edit_tokens = edit_tokens(held, prompt)
        held = prompt + tokens.text(sample.content)


# -- figures ---------------------------------------------------------------------------------------


def _ms(values: Sequence[float], q: float) -> float | None:
    found = report.percentile(values, q)
    return None if found is None else round(found * 1000, 1)


def _mean(values: Sequence[float | int | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(sum(known) / len(known), 1) if known else None


def _quantile(values: Sequence[int | None], q: float) -> float | None:
    found = report.percentile([v for v in values if v is not None], q)
    return None if found is None else round(found, 1)


def block(samples: Sequence[Sample]) -> dict[str, Any]:
    """The figures of a group of answered requests."""
    latencies = [s.latency_s for s in samples]
    # less the server's own generation time: what the prompt and the server cost
    less = [s.latency_s - s.predicted_ms / 1000 for s in samples if s.predicted_ms is not None]
    predicted_n = sum(s.predicted_n or 0 for s in samples)
    predicted_ms = sum(s.predicted_ms or 0.0 for s in samples if s.predicted_n)
    decoded = [s.prompt_n for s in samples]
    return {
        "requests": len(samples),
        "latency_ms": {"p50": _ms(latencies, 0.5), "p95": _ms(latencies, 0.95)},
        "less_generation_ms": {"p50": _ms(less, 0.5), "p95": _ms(less, 0.95)},
        "prompt_n": {
            "mean": _mean(decoded),
            "p50": _quantile(decoded, 0.5),
            "p95": _quantile(decoded, 0.95),
            "max": max((d for d in decoded if d is not None), default=None),
        },
        "edit_tokens_mean": _mean([s.edit_tokens for s in samples]),
        "tokens_evaluated_mean": _mean([s.tokens_evaluated for s in samples]),
        "tokens_cached_mean": _mean([s.tokens_cached for s in samples]),
        "predicted_n_mean": _mean([s.predicted_n for s in samples]),
        "ms_per_predicted_token": round(predicted_ms / predicted_n, 3) if predicted_n else None,
    }


def histogram(values: Sequence[int | None]) -> list[int]:
    """How many of ``values`` fall at or under each of ``DECODED_BUCKETS``, and above the last."""
    counts = [0] * (len(DECODED_BUCKETS) + 1)
    for value in values:
        if value is None:
            continue
        counts[next((i for i, b in enumerate(DECODED_BUCKETS) if value <= b), -1)] += 1
    return counts


def figures(samples: Sequence[Sample]) -> dict[str, Any]:
    answered = [s for s in samples if s.error is None]
    fim = [s for s in answered if s.kind != "warm-up"]
    warm = fim[1:]
    return {
        "fim": block(fim),
        "warm": block(warm),
        "warm_prompt_n_histogram": histogram([s.prompt_n for s in warm]),
        "kinds": {k: block(g) for k in KINDS if (g := [s for s in answered if s.kind == k])},
        "error_count": len(samples) - len(answered),
        "errors": sorted({s.error for s in samples if s.error is not None})[:3],
    }


def samples_json(samples: Sequence[Sample]) -> dict[str, list[Any]]:
    """Every request's figures, one list per figure (the requests' texts are left out: the
    session rebuilds them from its settings)."""
    columns = ("kind", "prompt_n", "predicted_n", "predicted_ms", "tokens_cached",
               "tokens_evaluated", "cache_n", "edit_tokens", "error")  # fmt: skip
    out: dict[str, list[Any]] = {
        "latency_ms": [round(s.latency_s * 1000, 1) for s in samples],
        "prompt_ms": [None if s.prompt_ms is None else round(s.prompt_ms, 2) for s in samples],
    }
    for name in columns:
        out[name] = [getattr(s, name) for s in samples]
    out["predicted_ms"] = [None if v is None else round(v, 2) for v in out["predicted_ms"]]
    return out


# -- measuring -----------------------------------------------------------------------------------


def _without(command: Sequence[str], flags: Sequence[str]) -> list[str]:
    """``command`` less each of ``flags`` and the value after it."""
    out: list[str] = []
    parts = iter(command)
    for part in parts:
        if part in flags:
            next(parts, None)
            continue
        out.append(part)
    return out


def prepare(variant: Variant, settings: ServerSettings, llama_server: Path | None) -> Server:
    """The variant's server with each prefill flag its own or the server's default."""
    found = server(
        variant.name, settings, llama_server, ROOT, extra_args=variant.extra_args,
        label=variant.label,
    )  # fmt: skip
    if found.skipped is None:
        settings_end = len(found.command) - len(variant.extra_args)
        found.command = _without(found.command[:settings_end], BATCH_FLAGS) + list(
            variant.extra_args
        )
    return found


def prompt_cache_figures(http: httpx.Client) -> dict[str, float] | None:
    """This server's host-RAM prompt cache after the session (its ``/metrics``): what saving
    a slot's state cost over the session."""
    try:
        text = http.get("/metrics").text
    except httpx.HTTPError:
        return None
    prefix = "qwen3_moe_serve:prompt_cache_"
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith(prefix) and not name.endswith("_created"):
            values[name.removeprefix("qwen3_moe_serve:")] = float(value)
    return values or None


def fim_window(found: Server) -> int:
    """The tokens a server's FIM prompt gives the text around the cursor: this server's
    ``--fim-window``, llama-server's logical batch (``format_prompt_infill``)."""
    window = DEFAULT_WINDOW[found.name]
    for flag, value in itertools.pairwise(found.command):
        if flag in WINDOW_FLAGS[found.name]:
            window = int(value)
    return window


def server_settings(args: argparse.Namespace, model: Path) -> ServerSettings:
    return ServerSettings(
        model=model,
        n_ctx=N_CTX,
        n_threads=args.n_threads,
        n_batch=512,  # left out of the commands (BATCH_FLAGS)
        parallel=1,  # one editor, llama.vim's id_slot 0
        flash_attn="auto",
    )


def measure(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    settings = server_settings(args, model)
    servers = [prepare(v, settings, args.llama_server) for v in args.variants]
    events = session(args.session)
    tokens = FimTokens(model)
    rows: list[dict[str, Any]] = []
    for repeat in range(args.repeat):
        for found in servers:
            if found.skipped:
                continue
            _progress(f"{found.label} (run {repeat + 1}): {len(events)} editor events")
            log = args.out / "logs" / f"editing-{found.label.replace(' ', '_')}.log"
            samples: list[Sample] = []
            failure: str | None = None
            other_cpus: float | None = None
            cache: dict[str, float] | None = None
            try:
                with (
                    serve(found, settings, log, READY_TIMEOUT_S) as running,
                    editor_client(f"http://{running.host}:{running.port}") as http,
                ):
                    other = OtherLoad(running.process.pid)
                    samples, failure = run_session(
                        http, events, args.n_predict, args.speculative, args.seed * 1000
                    )
                    other_cpus = other.cores()
                    cache = prompt_cache_figures(http) if found.name == OURS else None
            except RuntimeError as exc:  # it did not start
                failure = str(exc)
            count_edits(samples, tokens, fim_window(found))
            row = {
                "server": found.label,
                "run": repeat + 1,
                "fim_window": fim_window(found),
                "failure": failure,
                "other_cpus": other_cpus,
                "prompt_cache": cache,
            }
            rows.append(row | figures(samples) | {"samples": samples_json(samples)})
            fim = rows[-1]["fim"]
            _progress(
                f"  {fim['requests']} FIM requests, p50/p95 {_n(fim['latency_ms']['p50'])}/"
                f"{_n(fim['latency_ms']['p95'])} ms" + (f"; failed: {failure}" if failure else "")
            )
    return {
        "servers": [
            {"label": s.label, "version": s.version, "skipped": s.skipped, "command": s.command}
            for s in servers
        ],
        "session": {
            "events": len(events),
            "fim_requests": sum(isinstance(e, Fim) for e in events),
            "warm_ups": sum(isinstance(e, WarmUp) for e in events),
        },
        "rows": rows,
    }


# -- the report ----------------------------------------------------------------------------------


def _n(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _pair(figures: dict[str, Any]) -> str:
    return f"{_n(figures['p50'])} / {_n(figures['p95'])}"


def _decoded(b: dict[str, Any]) -> str:
    d = b["prompt_n"]
    return f"{_n(d['mean'])} ({_n(d['p50'])} / {_n(d['p95'])} / {_n(d['max'])})"


def target_lines(results: dict[str, Any]) -> list[str]:
    """This server against llama-server with the same FIM window, in each run: p50 and p95
    no worse (the target)."""
    lines = []
    rows = [row for row in results["rows"] if row["failure"] is None]
    for ours in rows:
        if not ours["server"].startswith(OURS):
            continue
        theirs = next(
            (
                row
                for row in rows
                if row["server"].startswith(LLAMA_SERVER)
                and (row["run"], row["fim_window"]) == (ours["run"], ours["fim_window"])
            ),
            None,
        )
        if theirs is None:
            continue
        verdicts = []
        for q in ("p50", "p95"):
            a, b = ours["fim"]["latency_ms"][q], theirs["fim"]["latency_ms"][q]
            if a is not None and b is not None:
                verdicts.append(f"{q} {_n(a)} against {_n(b)} ms ({'met' if a <= b else 'missed'})")
        lines.append(
            f"- Run {ours['run']}, window {ours['fim_window']}: {ours['server']} against "
            f"{theirs['server']}: " + "; ".join(verdicts) + "."
        )
    return lines


def markdown(results: dict[str, Any]) -> str:
    lines = report.head_lines("Editor completion (fill-in-the-middle)", results)
    s, session_ = results["settings"], results["session"]
    speculative = ", each followed by a speculative one once a suggestion came back"
    lines += [
        "",
        f"One editor (llama.vim's requests, one at a time) on a {s['lines']}-line generated "
        f"Python file, {s['positions']} positions from line {s['start_line']}: "
        f"{session_['fim_requests']} keystroke requests{speculative if s['speculative'] else ''}"
        f", {session_['warm_ups']} ring warm-ups ({s['ring_chunks']} chunks of 33 lines, full "
        f"from the start), n_predict {s['n_predict']}; model `{results['model']['file']}` "
        f"({results['model']['label']}). Latency over every FIM request (warm-ups apart); "
        "decoded = `timings/prompt_n` (mean (p50 / p95 / max)) and edit = the tokens the "
        "request brought in, both over every request after the first.",
        "",
        "| run | server | FIM window | FIM requests | latency p50 / p95 ms "
        "| less generation p50 / p95 ms "
        "| decoded / request | edit / request | prompt tokens | tokens_cached "
        "| completion tokens | ms / completion token | errors | other CPUs busy |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        fim, warm = row["fim"], row["warm"]
        lines.append(
            f"| {row['run']} | {row['server']} | {row['fim_window']} | {fim['requests']} "
            f"| {_pair(fim['latency_ms'])} "
            f"| {_pair(fim['less_generation_ms'])} | {_decoded(warm)} "
            f"| {_n(warm['edit_tokens_mean'])} | {_n(fim['tokens_evaluated_mean'])} "
            f"| {_n(fim['tokens_cached_mean'])} | {_n(fim['predicted_n_mean'])} "
            f"| {_n(fim['ms_per_predicted_token'])} | {row['error_count']} "
            f"| {_n(row['other_cpus'])} |"
        )
    lines += [
        "",
        "By kind of request:",
        "",
        "| run | server | kind | requests | latency p50 / p95 ms | decoded mean (p50 / p95 / max) "
        "| edit mean | completion tokens |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        for kind, b in row["kinds"].items():
            lines.append(
                f"| {row['run']} | {row['server']} | {kind} | {b['requests']} "
                f"| {_pair(b['latency_ms'])} | {_decoded(b)} | {_n(b['edit_tokens_mean'])} "
                f"| {_n(b['predicted_n_mean'])} |"
            )
    bounds = [f"≤ {DECODED_BUCKETS[0]}"]
    bounds += [f"{a + 1}-{b}" for a, b in itertools.pairwise(DECODED_BUCKETS)]
    bounds.append(f"> {DECODED_BUCKETS[-1]}")
    lines += [
        "",
        "Prompt tokens decoded per request after the first (`timings/prompt_n`), how many "
        "requests:",
        "",
        "| run | server | " + " | ".join(bounds) + " |",
        "|---:|---|" + "---:|" * len(bounds),
    ]
    for row in results["rows"]:
        counts = " | ".join(str(c) for c in row["warm_prompt_n_histogram"])
        lines.append(f"| {row['run']} | {row['server']} | {counts} |")
    verdicts = target_lines(results)
    if verdicts:
        lines += [
            "",
            "Target (p50 and p95 no worse than llama-server's with the same FIM window, same run):",
            "",
            *verdicts,
        ]
    for row in results["rows"]:
        cache = row.get("prompt_cache")
        if cache:
            lines += [
                "",
                f"{row['server']}'s prompt cache after run {row['run']}: "
                f"{_n(cache.get('prompt_cache_entries'))} saved states, "
                f"{_n(round(cache.get('prompt_cache_saved_bytes_total', 0) / 2**20))} MiB saved "
                f"in all, {_n(cache.get('prompt_cache_hits_total'))} hits.",
            ]
        if row["failure"]:
            lines += ["", f"{row['server']} (run {row['run']}) failed: {row['failure']}"]
        if row["errors"]:
            lines += ["", f"{row['server']} (run {row['run']}) errors: {'; '.join(row['errors'])}"]
    for found in results["servers"]:
        if found["skipped"]:
            lines += ["", f"Skipped {found['label']}: {found['skipped']}."]
    lines += ["", "Commands:", ""]
    lines += [f"- `{shlex.join(_shown(found['command']))}`" for found in results["servers"]
              if not found["skipped"]]  # fmt: skip
    return "\n".join(lines) + "\n"


def _shown(command: Sequence[str]) -> list[str]:
    """A command with the machine's own paths shortened (the interpreter, the model, the
    binary)."""
    return [
        "python" if part == sys.executable else Path(part).name if "/" in part else part
        for part in command
    ]


def _progress(message: str) -> None:
    print(f"[bench.editing] {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.editing", description=__doc__)
    defaults = Session()
    parser.add_argument("--model", choices=sorted(BUILT_MODELS), default="tiny")
    parser.add_argument("--lines", type=int, default=defaults.lines)
    parser.add_argument("--start-line", type=int, default=defaults.start_line)
    parser.add_argument("--positions", type=int, default=defaults.positions)
    parser.add_argument("--ring-chunks", type=int, default=defaults.ring_chunks)
    parser.add_argument("--n-predict", type=int, default=N_PREDICT)
    parser.add_argument(
        "--no-speculative", dest="speculative", action="store_false",
        help="leave out llama.vim's speculative request after each suggestion",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--n-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--variant", dest="variants", type=Variant.parse, action="append")
    parser.add_argument("--llama-server", type=Path)
    parser.add_argument(
        "--quick", action="store_true",
        help="a short session (4 positions, 4 ring chunks, 16 tokens asked): checks the harness",
    )  # fmt: skip
    parser.add_argument("--name", default="editing", help="the results' file name")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "bench-models")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    args.variants = args.variants or list(DEFAULT_VARIANTS)
    args.session = Session(args.lines, args.start_line, args.positions, args.ring_chunks,
                           args.seed)  # fmt: skip
    if args.quick:
        args.session = replace(args.session, lines=160, start_line=60, positions=4, ring_chunks=4)
        args.n_predict = 16
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop_servers_on_sigterm()
    started = time.perf_counter()
    shape = {**BUILT_MODELS[args.model], "n_ctx": N_CTX * 2}
    model = ensure_bench_model(args.cache_dir, **shape)
    spec: Session = args.session
    results: dict[str, Any] = {
        "schema": 1,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(
            ["python", "-m", "bench.editing", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": facts.run_machine(ROOT),
        "versions": facts.versions(),
        "model": {"label": args.model, "file": model.name, "generator_shape": shape},
        "settings": {
            "lines": spec.lines,
            "start_line": spec.start_line,
            "positions": spec.positions,
            "ring_chunks": spec.ring_chunks,
            "seed": spec.seed,
            "n_predict": args.n_predict,
            "speculative": args.speculative,
            "n_threads": args.n_threads,
            "n_ctx": N_CTX,
        },
    }
    results |= measure(args, model)
    results["machine"]["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    text = markdown(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
