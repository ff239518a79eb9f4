"""A slot's KV state to and from the host-RAM prompt cache (``--cache-ram``,
``app.engine.prompt_cache``).

When a new conversation takes a slot that holds another one's cells, the slot's KV state is
first copied to host memory (``llama_state_seq_get_data``) with the exact tokens it holds;
when no free slot holds a good prefix of a prompt and a saved state holds a longer one, the
state is copied into the least recently used free slot (``llama_state_seq_set_data``) and only
the rest of the prompt is decoded. A restore whose cells are not exactly positions ``0..n-1``
of the slot is thrown away, so the saved tokens and the cells cannot disagree. Both copies run
on the scheduler thread between steps.
"""

from __future__ import annotations

import ctypes
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llama_cpp
import numpy as np

from app.engine import prompt_store
from app.engine.batched.queue import Generation
from app.engine.host_memory import auto_prompt_cache_mib, available_bytes
from app.engine.llama_setup import EngineConfig
from app.engine.prompt_cache import PromptCache, SavedPrompt, StateBuffer
from app.engine.protocol import ModelInfo

if TYPE_CHECKING:
    from app.engine.batched.slots import Slot

logger = logging.getLogger(__name__)

Store = tuple[Path, dict[str, Any]]
"""Where the cache is kept across restarts (``--cache-dir``), and whose states it holds."""


def open_prompt_cache(
    config: EngineConfig, info: ModelInfo
) -> tuple[PromptCache | None, Store | None, int]:
    """The prompt cache the config asks for (read from its folder when it has one), its
    store, and its size in MiB (0: off, negative: unlimited)."""
    mib = config.prompt_cache_mib
    if mib is None:
        offloaded = info.gpu_offload and not config.tensor_overrides
        weights = 0 if offloaded else config.model_path.stat().st_size
        mib = auto_prompt_cache_mib(weights, available_bytes())
    cache = PromptCache(None if mib < 0 else mib * 1024 * 1024) if mib != 0 else None
    store: Store | None = None
    if cache is not None and config.prompt_cache_dir is not None:
        who = prompt_store.identity(
            config.model_path,
            llama_cpp_python=llama_cpp.__version__,
            cache_type_k=config.cache_type_k,
            cache_type_v=config.cache_type_v,
            flash_attn=config.flash_attn,
            kv_unified=config.kv_unified,
        )
        store = (config.prompt_cache_dir, who)
        if config.prompt_cache_dir.is_dir():
            prompt_store.read(config.prompt_cache_dir, who, cache)
    return cache, store, mib


def consult_prompt_cache(
    cache: PromptCache, generation: Generation, slot: Slot, free: list[Slot], similarity: float
) -> Slot:
    """The slot for ``generation`` once the prompt cache is asked: the least recently used
    free one, marked for a restore, when a saved state holds more of the prompt than ``slot``
    (the best free slot) does; else ``slot``."""
    prompt = generation.prompt
    assert generation.plan is not None
    held = generation.plan.kept
    found = cache.find(prompt, better_than=held, min_share=similarity)
    if found is None:
        if held <= similarity * len(prompt):
            cache.missed()  # no slot and no saved state holds this conversation
        return slot
    cache.take(found[0])  # no other placement, and no save's eviction, can have it now
    generation.restore = found
    generation.plan = None  # it was for the slot not taken
    return min(free, key=lambda s: s.last_used)


def save_slot(ctx: Any, slot: Slot, cache: PromptCache) -> None:
    """Copy the slot's KV state, with the tokens it holds, into the prompt cache."""
    if not slot.tokens or cache.covers(slot.tokens):
        return
    size = int(llama_cpp.llama_state_seq_get_size(ctx, slot.seq_id))
    if not cache.fits(size):
        return
    state: StateBuffer = np.empty(size, dtype=np.uint8)
    pointer = state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
    written = int(llama_cpp.llama_state_seq_get_data(ctx, pointer, size, slot.seq_id))
    if written != size:
        logger.warning(
            "prompt cache: slot %d state not saved (%d of %d bytes)", slot.seq_id, written, size
        )
        return
    cache.save(slot.tokens, state, slot.held_prompt)


def restore_slot(
    ctx: Any, memory: Any, slot: Slot, cache: PromptCache, entry: SavedPrompt, shared: int
) -> None:
    """Replace the slot's cells with ``entry``'s; on any mismatch the slot starts empty."""
    llama_cpp.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
    slot.tokens.clear()
    pointer = entry.state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
    read = int(llama_cpp.llama_state_seq_set_data(ctx, pointer, entry.size, slot.seq_id))
    first = llama_cpp.llama_memory_seq_pos_min(memory, slot.seq_id)
    last = llama_cpp.llama_memory_seq_pos_max(memory, slot.seq_id)
    if read != entry.size or (first, last) != (0, len(entry.tokens) - 1):
        logger.error(
            "prompt cache: a saved state of %d tokens restored as positions %d..%d "
            "(%d of %d bytes read); not used",
            len(entry.tokens),
            first,
            last,
            read,
            entry.size,
        )
        llama_cpp.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
        cache.missed()
        return
    slot.tokens.extend(entry.tokens.tolist())
    cache.hit(entry, shared)


def keep_prompt_cache(ctx: Any, slots: list[Slot], cache: PromptCache, store: Store) -> None:
    """On close: the slots' conversations join the cache, which goes to the store's folder."""
    folder, who = store
    started = time.perf_counter()
    for slot in sorted(slots, key=lambda s: s.last_used):
        save_slot(ctx, slot, cache)
    written, size = prompt_store.write(cache, folder, who)
    logger.info(
        "prompt cache: %d saved state(s), %.1f MiB, written to %s in %.2fs",
        written,
        size / 2**20,
        folder,
        time.perf_counter() - started,
    )
