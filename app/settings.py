"""Server settings: one class, read from flags and from ``QWEN3_MOE_SERVE_*`` variables.

pydantic-settings builds both the environment reader and the command line from this class, so
a setting cannot exist in one and be missing from the other, and ``--help`` is generated from
the field descriptions below. Flags win over the environment, which wins over the defaults.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "QWEN3_MOE_SERVE_"

FlashAttn = Literal["auto", "on", "off"]
"""llama.cpp's flash attention switch; ``auto`` lets llama.cpp decide per device."""
ReasoningFormat = Literal["reasoning_content", "reasoning", "none"]
ToolCallFormatSetting = Literal["auto", "qwen3", "qwen3_coder"]
_SWITCH_WORDS = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}

KvCacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
"""The KV cache data types ``llama-server --cache-type-k/-v`` accepts (ggml's type names)."""
UNQUANTIZED_KV_TYPES = ("f32", "f16", "bf16")
_NOT_ECMASCRIPT = re.compile(r"\(\?(<[=!]|P|#|>|[aiLmsux-])|(?<!\\)\\[AZz]|(?<!\\)[*+?}]\+")
"""Python regex syntax that llama.cpp's ``std::regex`` (ECMAScript) rejects or reads otherwise."""


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qwen3-moe-serve"


class Settings(BaseSettings):
    """Every knob of the server; each is a ``--flag`` and a ``QWEN3_MOE_SERVE_FLAG`` variable."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        cli_prog_name="qwen3-moe-serve",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="forbid",
    )

    # -- HTTP ---------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address to bind. Loopback unless asked.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    log_level: str = Field("info", description="Log level: debug, info, warning, error.")
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Seconds a client has to send a request's head (line and headers) from "
        "its first byte or from connecting; a connection past it is closed.",
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Seconds a client has to send a request's body once its head is in; a "
        "connection past it is closed. Streams are not limited by either timeout.",
    )
    web_page: bool = Field(
        True,
        description="Serve the chat page at / (--no-web-page: / answers 404). The page holds "
        "no secret; with API keys on, it asks for one and the API checks it as for any client.",
    )

    # -- model --------------------------------------------------------------------------
    model: Path | None = Field(
        None,
        description="Path to a Qwen3-MoE GGUF file. Unset: build and serve the embedded demo "
        "model (a tiny qwen3moe GGUF written into --cache-dir).",
    )
    model_alias: str | None = Field(
        None,
        description="Model id reported by /v1/models. Requests may name it or the served id "
        "(the GGUF file name without .gguf; qwen3-moe-demo for the demo model).",
    )
    accept_any_model: bool = Field(
        False,
        description="Answer a request that names any model with the served one (as "
        "llama-server does), for clients that insist on their own model names (Claude Code's "
        "claude-* defaults). Unset: a model name other than the served id or --model-alias is "
        "a 404 model_not_found. Responses always report the served model's id.",
    )
    n_ctx: int = Field(
        0, ge=0, description="Context size in tokens; 0 uses the model's training context."
    )
    n_gpu_layers: int = Field(
        -1,
        ge=-1,
        description="Layers to offload to the GPU; -1 = all (needs a CUDA build of "
        "llama-cpp-python; ignored on a CPU build).",
    )
    n_threads: int | None = Field(
        None, ge=1, description="CPU threads for decoding (default: llama.cpp's choice)."
    )
    n_batch: int = Field(
        2048,
        ge=1,
        description="Tokens one engine step decodes at most (llama.cpp's logical batch, "
        "llama-server's -b): running streams' next tokens plus prompt chunks, so a long prompt "
        "is prefilled over several steps beside them. llama-server's default (-b 2048 -ub 512; "
        "docs/performance.md has the measurements).",
    )
    n_ubatch: int = Field(
        512,
        ge=1,
        description="Tokens llama.cpp computes at once (the physical micro-batch, "
        "llama-server's -ub); a step of more runs in several. At most --n-batch.",
    )
    flash_attn: FlashAttn = Field(
        "auto",
        description="Flash attention: auto (llama.cpp turns it on where the device supports it, "
        "as CPU and CUDA do; llama-server's default), on, or off. With --parallel above 1 it "
        "also keeps idle slots' cached prefixes from costing attention time.",
    )
    chat_template_file: Path | None = Field(
        None,
        description="Jinja chat template that replaces the GGUF's tokenizer.chat_template "
        "(for models whose embedded template is broken).",
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Where the demo model is built (once) when no --model is given.",
    )

    # -- Qwen3 semantics --------------------------------------------------------------------
    reasoning_format: ReasoningFormat = Field(
        "reasoning_content",
        description="Where the <think> block goes: message/delta field 'reasoning_content' "
        "or 'reasoning'; 'none' leaves the raw text, tags included, in 'content'.",
    )
    enable_thinking: bool = Field(
        True,
        description="Server-wide default for Qwen3 thinking; a request overrides it with "
        'chat_template_kwargs {"enable_thinking": ...} or /think and /no_think.',
    )
    # Thinking budget (llama-server's --reasoning-budget); docs/llama-knobs.md.
    reasoning_budget: int = Field(
        -1,
        ge=-1,
        description="Default thinking budget in tokens: once a chat answer has thought this "
        "long inside <think>, the server closes the block itself and the model answers. "
        "-1 = unlimited, 0 = close it at once. A request sets its own with thinking_budget "
        "or reasoning_effort; any budget is also kept below max_tokens, so thinking never "
        "leaves the answer empty.",
    )
    # Tool-call format (Qwen3's JSON calls or Qwen3-Coder's XML ones); docs/tool-calls.md.
    tool_call_format: ToolCallFormatSetting = Field(
        "auto",
        description="How the model writes tool calls: 'qwen3' (<tool_call>{json}</tool_call>), "
        "'qwen3_coder' (<tool_call><function=NAME><parameter=P>value</parameter>..., values "
        "typed by the tool's parameter schema), or 'auto': qwen3_coder when the chat template "
        "renders '<function=' (Qwen3-Coder's does), else qwen3.",
    )

    reject_unsupported_tools: bool = Field(
        False,
        description="/v1/responses and /v1/messages: answer 400 unsupported_tool for a tool "
        "of a type this server cannot run (hosted tools such as web_search, file_search, "
        "computer use, code execution; Anthropic server tools and MCP connectors). By default "
        "such tools are left out of the prompt, so the model never sees a tool it cannot call, "
        "and each request that had one logs the dropped types at info level and counts them in "
        "/metrics (unsupported_tools_dropped). Function tools are always kept.",
    )

    # -- streaming ------------------------------------------------------------------------
    sse_keepalive_s: float = Field(
        15.0, gt=0, description="Seconds between SSE comment keep-alives on an idle stream."
    )
    stream_buffer_tokens: int = Field(
        64,
        ge=1,
        description="Bounded channel between the engine thread and a response: the engine "
        "waits when a slow client lets this many text deltas pile up.",
    )

    # -- llama.cpp knobs: expert placement, KV cache types, host-RAM prompt cache -----------
    # Each is llama-server's flag of the same name and meaning (docs/llama-knobs.md says when
    # to use which). Values that need the loaded llama.cpp build to check (buffer type names,
    # block sizes against the model's head size) are checked when the model loads.
    cpu_moe: bool = Field(
        False,
        description="Keep every layer's MoE expert tensors (ffn_up/down/gate_exps) in host "
        "memory, the rest on the GPU (llama-server's --cpu-moe): Qwen3-30B-A3B on an 8-16 GB "
        "GPU. Runs --parallel 1 on the batching engine (one slot). Harmless on a CPU build.",
    )
    n_cpu_moe: int = Field(
        0,
        ge=0,
        description="Keep the MoE expert tensors of the first N layers in host memory "
        "(llama-server's --n-cpu-moe): lower N until the GPU is full. 0 = none.",
    )
    override_tensor: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Put the tensors whose name matches a regex in a buffer type, as "
        "PATTERN=BUFFER_TYPE[,PATTERN=BUFFER_TYPE...] (llama-server's -ot; repeatable; the "
        "first matching rule wins, these before --cpu-moe/--n-cpu-moe's). Buffer types are "
        "this build's devices' (CPU, CUDA0, ...); e.g. 'blk\\.(1[0-9])\\.ffn_.*_exps=CPU'.",
    )
    cache_type_k: KvCacheType = Field(
        "f16",
        description="KV cache data type for K (llama-server's --cache-type-k): f16, bf16, f32, "
        "q8_0 (half the memory of f16, near-lossless), q4_0 / q4_1 / iq4_nl / q5_0 / q5_1.",
    )
    cache_type_v: KvCacheType = Field(
        "f16",
        description="KV cache data type for V (--cache-type-v), the same types; a quantized V "
        "cache needs flash attention (--flash-attn auto or on).",
    )
    cache_ram: int | Literal["auto"] = Field(
        "auto",
        description="Host-RAM prompt cache in MiB (llama-server's --cache-ram): a slot's KV "
        "state is saved there when another conversation is about to take the slot, and "
        "restored for a prompt that continues it instead of decoding it again. 'auto' (the "
        "default) = a quarter of the host memory available once the model has loaded (the "
        "container's limit counts; weights kept in host memory do not), -1 = no limit, 0 = "
        "off. Runs --parallel 1 on the batching engine unless 0.",
    )

    fim_window: int = Field(
        1024,
        ge=16,
        description="Tokens of code around the cursor a fill-in-the-middle prompt (/infill, a "
        "completion's suffix) keeps: three quarters before the cursor, a quarter after it, the "
        "text nearest the cursor first; other files get what the context leaves. llama-server "
        "sizes this window by its --batch-size (1024 in its --fim-qwen presets). Each "
        "keystroke decodes the window from the cursor on again, so a wider one costs latency.",
    )

    cache_reuse: int = Field(
        256,
        ge=0,
        description="KV chunk reuse (llama-server's --cache-reuse): when a prompt shares a run "
        "of at least this many tokens with what its slot holds, but not at the same place (an "
        "editor's ring of context chunks rotated, the cursor moved, a chat template dropped an "
        "earlier turn's reasoning), those cells are moved to their new positions instead of "
        "being decoded again. 0 = off (only a common prefix is reused). Batching engine only.",
    )

    prompt_cache_dir: Path | None = Field(
        None,
        description="Keep the host-RAM prompt cache across restarts: on shutdown (after the "
        "SIGTERM drain) its saved KV states and the slots' own are written to this folder, "
        "and read back at start, so an agent's first turn after a deploy restores instead of "
        "prefilling its conversation again. Only states written by the same model file, KV "
        "cache types and llama.cpp build are read. Off when unset.",
    )

    @field_validator("cache_ram")
    @classmethod
    def _cache_ram_size(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < -1:
            raise ValueError("--cache-ram is a size in MiB, -1 (no limit), 0 (off) or auto")
        return value

    @field_validator("override_tensor", mode="before")
    @classmethod
    def _override_rules(cls, value: object) -> object:
        """``PATTERN=TYPE`` rules, from a comma-separated string or a list of them."""
        parts = [value] if isinstance(value, str) else value
        if not isinstance(parts, list):
            return value
        rules: list[str] = []
        for part in parts:
            if not isinstance(part, str):
                return value  # pydantic reports the type error
            for rule in (r.strip() for r in part.split(",")):
                if not rule:
                    continue
                pattern, equals, buffer_type = rule.rpartition("=")
                if not equals or not pattern or not buffer_type.strip():
                    raise ValueError(
                        f"--override-tensor {rule!r} is not PATTERN=BUFFER_TYPE "
                        "(e.g. 'ffn_.*_exps=CPU')"
                    )
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(
                        f"--override-tensor {rule!r}: {pattern!r} is not a regular "
                        f"expression ({exc})"
                    ) from exc
                if _NOT_ECMASCRIPT.search(pattern):
                    raise ValueError(
                        f"--override-tensor {rule!r}: llama.cpp matches with ECMAScript "
                        "regular expressions (std::regex), which have no lookbehind, named "
                        "groups, inline flags, possessive quantifiers or \\A/\\Z"
                    )
                rules.append(f"{pattern}={buffer_type.strip()}")
        return rules

    @model_validator(mode="after")
    def _quantized_v_needs_flash_attention(self) -> Settings:
        if self.cache_type_v not in UNQUANTIZED_KV_TYPES and self.flash_attn == "off":
            raise ValueError(
                f"--cache-type-v {self.cache_type_v} needs flash attention, which "
                "--flash-attn off turns off: use --flash-attn auto or on, or --cache-type-v f16"
            )
        return self

    @field_validator("flash_attn", mode="before")
    @classmethod
    def _flash_attn_switch(cls, value: object) -> object:
        """Booleans (``true``/``false`` in the environment) still mean on and off."""
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str):
            word = value.strip().lower()
            return _SWITCH_WORDS.get(word, word)
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.lower()
        if level not in {"critical", "error", "warning", "info", "debug"}:
            raise ValueError("log_level must be one of critical, error, warning, info, debug")
        return level

    # -- deployment: a model larger than one machine ---------------------------------------
    rpc_servers: str | None = Field(
        None,
        description="llama.cpp RPC workers that take model layers, as host:port[,host:port...] "
        "(qwen3-moe-rpc-worker or llama.cpp's rpc-server of the same version; needs a "
        "-DGGML_RPC=on build). The RPC protocol is unauthenticated: private networks only.",
    )

    @field_validator("rpc_servers")
    @classmethod
    def _rpc_endpoints(cls, value: str | None) -> str | None:
        if value is None:
            return None
        endpoints = [part.strip() for part in value.split(",") if part.strip()]
        for endpoint in endpoints:
            # ggml splits an endpoint at its first ':', so an IPv6 literal cannot be one.
            host, _, port = endpoint.partition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"rpc_servers entry {endpoint!r} is not host:port")
        return ",".join(endpoints) or None

    # -- serving many clients: continuous batching, admission, shutdown -------------------
    parallel: int = Field(
        0,
        ge=0,
        description="Requests decoded together by continuous batching, each in its own slot "
        "with the full --n-ctx (the KV cache holds parallel x n-ctx tokens). 1 = one request "
        "at a time; 0 = auto: 4 when layers are offloaded to a GPU, else 1.",
    )
    kv_unified: bool = Field(
        False,
        description="With --parallel above 1: one KV buffer shared by every slot "
        "(llama-server's --kv-unified) instead of one KV stream per slot. Off by default: "
        "with a unified buffer every sequence's attention spans every slot's cells, idle "
        "slots' cached prefixes included, which cost 3.3x per step at 64 streams "
        "(docs/performance.md).",
    )
    max_queue: int = Field(
        64,
        ge=0,
        description="Requests that may wait for a free slot; past that a new request gets "
        "429 (rate_limit_error, code overloaded) with Retry-After.",
    )
    request_timeout_s: float | None = Field(
        None,
        gt=0,
        description="Longest a request may take, queueing included; past it the request "
        "ends with an error (in-band on a stream). Unset: no limit.",
    )
    shutdown_grace_s: float = Field(
        20.0,
        ge=0,
        description="On SIGTERM: new requests get 503 at once, running ones get this long to "
        "finish, then end with an in-band error event and [DONE].",
    )

    # -- operations: access control, limits, logs -----------------------------------------
    api_key: SecretStr | None = Field(
        None,
        description="API key(s) clients must send as 'Authorization: Bearer <key>'; several "
        "separated by commas. Unset (and no --api-key-file): no authentication.",
    )
    api_key_file: Path | None = Field(
        None, description="File with one accepted API key per line ('#' starts a comment)."
    )
    protect_health_metrics: bool = Field(
        False,
        description="Require the API key on /health and /metrics too (default: open, for "
        "probes and Prometheus).",
    )
    cors_origins: str | None = Field(
        None,
        description="Browser origins allowed by CORS, comma-separated ('*' for any). "
        "Unset: no CORS headers.",
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body accepted; larger is a 413."
    )
    max_tokens_limit: int | None = Field(
        None,
        ge=1,
        description="Ceiling on max_tokens / max_completion_tokens: a request above it is a "
        "400, and one without max_tokens generates at most this many tokens.",
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="Log lines as JSON objects (one per line) or plain text."
    )

    # -- request limits: what one request may cost before any engine work (docs/api.md,
    # Limits). Each refusal is a 400 with code limit_exceeded naming the field and the limit;
    # the defaults are far above what agents send (100+ messages, 50+ tools, 20k-token
    # prompts) and below what would hold the engine or the event loop.
    max_messages: int = Field(
        4096, ge=1, description="Most messages one chat request may carry; more is a 400."
    )
    max_prompt_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="Largest prompt in UTF-8 bytes: the rendered chat template, or a "
        "completion's prompt text; larger is a 400 before it is tokenized (tokenizing costs "
        "about 0.4 s of a worker thread per MiB).",
    )
    max_stop_strings: int = Field(
        64,
        ge=0,
        description="Most stop strings one request may carry (each is matched on the event "
        "loop against every token's text).",
    )
    max_stop_chars: int = Field(512, ge=1, description="Longest stop string, in characters.")
    max_tools: int = Field(
        512, ge=0, description="Most tools one chat request may offer; more is a 400."
    )
    max_schema_bytes: int = Field(
        256 * 1024,
        ge=1024,
        description="Largest JSON schema of one tool's parameters or of response_format, as "
        "compact JSON; larger is a 400 before a grammar is built from it.",
    )
    max_grammar_bytes: int = Field(
        128 * 1024,
        ge=1024,
        description="Largest GBNF grammar a forced tool call or a JSON response_format may "
        "need; larger is a 400 before llama.cpp parses it. A token the grammar refuses costs "
        "a pass of the grammar over the whole vocabulary, in time in proportion to the "
        "alternatives alive (an enum of 10,000 values, 205 KiB, cost 0.2 s per token on the "
        "demo model's vocabulary and 6 s on a 151k-token one); 50 agent tools forced are "
        "39 KiB.",
    )
    completions_parse_special: bool = Field(
        True,
        description="In /v1/completions prompts, the text of a control token (<|im_start|>) "
        "is that token, as raw-prompt clients expect; off: it is plain text. In chat requests "
        "client text is always text.",
    )
