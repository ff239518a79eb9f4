"""What a discharge record says about the run: the models tested, the engine, the host, the commit.

A verdict means little without knowing which model file, which llama.cpp build and which
commit produced it, so these facts are read from the things themselves (the file's bytes, the
loaded library, git), never from configuration that could disagree with them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path
from typing import Any

from app.engine import ModelInfo
from bench.facts import machine

FULL_HASH_LIMIT = 1 << 30
SAMPLE_BYTES = 64 << 20
SHA256_PREFIX = 16


def file_digest(path: Path) -> tuple[str, str]:
    """``(sha256 hex prefix, what was hashed)`` for a model file.

    Files under 1 GiB are hashed whole. A 17 GB Qwen3-30B-A3B would take minutes, so for large
    files the hash covers the first and last 64 MiB and the size (as 8 little-endian bytes):
    enough to tell two quantizations or a truncated download apart, and labelled as a sample.
    """
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if size < FULL_HASH_LIMIT:
            while block := f.read(1 << 20):
                digest.update(block)
            method = "sha256 of the whole file"
        else:
            digest.update(f.read(SAMPLE_BYTES))
            f.seek(size - SAMPLE_BYTES)
            digest.update(f.read(SAMPLE_BYTES))
            digest.update(size.to_bytes(8, "little"))
            method = "sha256 of the first 64 MiB + last 64 MiB + size (8 bytes, little-endian)"
    return digest.hexdigest()[:SHA256_PREFIX], method


def model_facts(info: ModelInfo) -> dict[str, Any]:
    path = Path(info.path)
    sha256_prefix, sha256_method = file_digest(path)
    return {
        "name": path.name,
        "path": str(path),
        "architecture": info.architecture,
        "size_bytes": path.stat().st_size,
        "sha256_prefix": sha256_prefix,
        "sha256_method": sha256_method,
        "n_ctx": info.n_ctx,
        "gpu_offload": info.gpu_offload,
    }


def engine_facts() -> dict[str, Any]:
    """The installed llama-cpp-python and what its native library was built with."""
    import llama_cpp

    system_info = bytes(llama_cpp.llama_print_system_info()).decode("utf-8", "replace")
    return {
        "llama_cpp_python": importlib.metadata.version("llama_cpp_python"),
        "gpu_offload_supported": bool(llama_cpp.llama_supports_gpu_offload()),
        "cuda_build": "CUDA" in system_info,
        "system_info": system_info.strip(" |"),
    }


def host_facts(root: Path) -> dict[str, Any]:
    """The host and the commit (``bench.facts``: the same facts ``make bench`` records)."""
    return machine(root)
