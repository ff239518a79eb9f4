"""Synthetic models built once into a cache directory, under names keyed by their content.

A model is rebuilt only when what it would contain changes (its parameters, this generator's
version, the gguf package's version, the chat template), and written atomically, so parallel
test workers and a benchmark started at once never read a half-written file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from app.demo.writer import TEMPLATE_PATHS, ChatTemplateName

__all__ = ["GENERATOR_VERSION", "build_once", "cache_name"]

logger = logging.getLogger(__name__)

# Part of every cache key: bump it whenever the bytes this package writes change.
GENERATOR_VERSION: Final = 1


def _gguf_version() -> str:
    try:
        return importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:  # e.g. gguf-py vendored on sys.path
        return "unknown"


def cache_name(kind: str, payload: dict[str, object], template: ChatTemplateName = "qwen3") -> str:
    """A file name that changes whenever the file's content would."""
    key = {
        "generator": GENERATOR_VERSION,
        "gguf": _gguf_version(),
        "template": hashlib.sha256(TEMPLATE_PATHS[template].read_bytes()).hexdigest(),
        "kind": kind,
        **payload,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return f"qwen3moe-{kind}-{digest[:16]}.gguf"


def build_once(target: Path, build: Callable[[Path], Path]) -> Path:
    """Build ``target`` with ``build`` unless it exists, atomically: readers never see a
    half-written file. Returns ``target``."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
    )
    os.close(handle)
    started = time.perf_counter()
    try:
        build(Path(temporary))
        # Flush before the rename: a crash must not leave a short file under the final name,
        # and a benchmark started right after must not compete with a gigabyte of writeback.
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; the cache may be shared read-only
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    logger.info(
        "built %s (%.1f MB) in %.2f s",
        target,
        target.stat().st_size / 1e6,
        time.perf_counter() - started,
    )
    return target
