"""The host-RAM prompt cache kept across a restart (``--prompt-cache-dir``).

A deploy restarts every replica, and every agent's next turn would then decode its whole
conversation again. With a folder set, the engine writes its saved KV states there when it
closes (after the SIGTERM drain: the slots' own conversations first join the cache) and reads
them back when it starts, so the first turn after a restart restores instead of prefilling.

A state is only as good as the model and KV layout that wrote it, so every file carries the
identity of what wrote it (``identity``: the GGUF's size and a hash of its first and last
MiB, llama-cpp-python's version, the KV cache types, flash attention, the KV layout) and a
file of another identity is not read. Files are written to a temporary name and renamed, one
per saved state, newest first, under the cache's own size; a file that cannot be read whole
is skipped. Restoring still goes through the engine's check that the cells come back at the
positions they were saved with.

The alternative rejected: llama-server's ``--slot-save-path`` with its ``/slots`` API, which
saves and restores one slot at a client's request: an agent does not know when a deploy comes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from app.engine.prompt_cache import PromptCache, SavedPrompt

logger = logging.getLogger(__name__)

SUFFIX = ".kvstate"
_HEAD = struct.Struct("<8sQ")
_MAGIC = b"q3mskv01"
_SAMPLE = 1024 * 1024


def identity(model_path: Path, **layout: object) -> dict[str, Any]:
    """What a saved state depends on: the model file (size, and a hash of its first and last
    MiB: a GGUF's header, tokenizer and first tensors, and its last tensors) and ``layout``
    (the KV cache types, flash attention, the KV layout, the llama.cpp build)."""
    size = model_path.stat().st_size
    digest = hashlib.sha256()
    with model_path.open("rb") as model:
        digest.update(model.read(_SAMPLE))
        model.seek(max(size - _SAMPLE, 0))
        digest.update(model.read(_SAMPLE))
    return {"model_size": size, "model_sample_sha256": digest.hexdigest(), **layout}


def write(cache: PromptCache, folder: Path, who: Mapping[str, Any]) -> tuple[int, int]:
    """Write every entry of ``cache`` into ``folder``, replacing what was there; the number of
    states and bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    stale = set(folder.glob(f"*{SUFFIX}"))
    entries = cache.entries()  # least recently saved first
    written = total = 0
    for order, entry in reversed(list(enumerate(entries))):
        path = folder / f"{order:06d}{SUFFIX}"
        head = json.dumps(
            {
                "identity": dict(who),
                "order": order,
                "tokens": len(entry.tokens),
                "prompt_len": entry.prompt_len,
                "state_bytes": entry.size,
            }
        ).encode()
        partial = path.with_suffix(".partial")
        try:
            with partial.open("wb") as out:
                out.write(_HEAD.pack(_MAGIC, len(head)))
                out.write(head)
                out.write(np.ascontiguousarray(entry.tokens, dtype="<i4").tobytes())
                out.write(entry.state.data)
            os.replace(partial, path)
        except OSError as exc:
            logger.warning("prompt cache: could not write %s (%s); the rest is not kept", path, exc)
            partial.unlink(missing_ok=True)
            break
        stale.discard(path)
        written += 1
        total += path.stat().st_size
    for path in stale:
        path.unlink(missing_ok=True)
    return written, total


def _read_one(path: Path, who: Mapping[str, Any]) -> tuple[int, SavedPrompt] | None:
    with path.open("rb") as source:
        magic, head_len = _HEAD.unpack(source.read(_HEAD.size))
        if magic != _MAGIC:
            return None
        head = json.loads(source.read(head_len))
        if head["identity"] != dict(who):
            return None
        n_tokens, n_bytes = int(head["tokens"]), int(head["state_bytes"])
        tokens = np.frombuffer(source.read(4 * n_tokens), dtype="<i4").astype(np.int32)
        state = np.frombuffer(bytearray(source.read(n_bytes)), dtype=np.uint8)
        if len(tokens) != n_tokens or len(state) != n_bytes or source.read(1):
            raise ValueError("its size is not what its header says")
    return int(head["order"]), SavedPrompt(tokens, state, int(head["prompt_len"]))


def read(folder: Path, who: Mapping[str, Any], cache: PromptCache) -> tuple[int, int]:
    """Put the newest states ``folder`` holds for this identity into ``cache``, as many as
    its size takes (read newest first, and no further once it is full, so a smaller cache
    than the one that wrote them never holds the whole folder in memory); the number of
    states and bytes held."""
    started = time.perf_counter()
    found: list[tuple[int, SavedPrompt]] = []
    held = other = 0
    for path in sorted(folder.glob(f"*{SUFFIX}"), reverse=True):  # file names are the order
        try:
            one = _read_one(path, who)
        except (OSError, ValueError, KeyError, struct.error) as exc:
            logger.warning("prompt cache: %s is not a saved state (%s); skipped", path, exc)
            continue
        if one is None:
            other += 1
            continue
        held += one[1].size
        if cache.limit_bytes is not None and held > cache.limit_bytes:
            break
        found.append(one)
    for _, entry in sorted(found, key=lambda item: item[0]):
        cache.keep(entry)  # oldest first: the least recently saved stays first to go
    logger.info(
        "prompt cache: %d saved state(s), %.1f MiB, read from %s in %.2fs%s",
        len(cache),
        cache.bytes / 2**20,
        folder,
        time.perf_counter() - started,
        f"; {other} written by another model or KV layout left out" if other else "",
    )
    return len(cache), cache.bytes
