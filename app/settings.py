"""Server settings: one class, read from flags and from ``QWEN3_MOE_SERVE_*`` variables.

pydantic-settings builds both the environment reader and the command line from this class, so
a setting cannot exist in one and be missing from the other, and ``--help`` is generated from
the field descriptions below. Flags win over the environment, which wins over the defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "QWEN3_MOE_SERVE_"


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
    n_batch: int = Field(512, ge=1, description="Prompt tokens decoded per llama.cpp batch.")
    flash_attn: bool = Field(False, description="Use flash attention (GPU builds).")
    chat_template_file: Path | None = Field(
        None,
        description="Jinja chat template that replaces the GGUF's tokenizer.chat_template "
        "(for models whose embedded template is broken).",
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Where the demo model is built (once) when no --model is given.",
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

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.lower()
        if level not in {"critical", "error", "warning", "info", "debug"}:
            raise ValueError("log_level must be one of critical, error, warning, info, debug")
        return level
