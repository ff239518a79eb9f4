"""The host-RAM prompt cache (``--cache-ram``): KV states of slots that another conversation
took, kept in host memory until a prompt continues one of them.

The case it serves: more conversations than slots (agents, each coming back every few seconds).
Without it, a conversation whose slot was taken re-decodes its whole history on its next turn;
with it, that history's KV state is copied back into a slot (``llama_state_seq_set_data``),
which costs a memory copy instead of a prefill.

This module is the bookkeeping only, and the scheduler thread is its one user (no locks; the
counters that ``stats()`` reads from the event loop are plain integers, never an iteration
over the entries). Its rules are llama-server's (``server_prompt_cache``,
tools/server/server-task.cpp):

- An entry is the exact token list whose KV cells the state holds, and the state's bytes; the
  two are saved together and never change (a tuple and a buffer nobody writes again).
- A lookup returns the entry that shares the longest common token prefix with the prompt, if
  that prefix is worth a restore: longer than the slot the prompt would otherwise get already
  has, more than ``min_share`` of the prompt, and at least ``MIN_KEEP`` of the entry (a short
  match does not trash a long saved state). The caller keeps only the matching prefix of what
  it restores: a saved state is never used past the first token where it and the prompt differ.
- A slot is saved when a prompt is about to displace the conversation it holds: the prompt
  leaves the slot's cells before the end of the slot's last prompt (a continuation of the
  same conversation only drops the answer's tail, which the chat template re-renders). Not
  only when the slot is taken by a prompt that shares nothing with it, as llama-server does
  (or loses less than half of it: ``f_keep < 0.5``): agents share long system prompts and
  tool lists, so another conversation matches a slot's opening and would drop its history.
- A restore that continues an entry's conversation (the prompt holds all of the entry's
  prompt) moves the entry into the slot (it leaves the cache; the slot saves it again when it
  is displaced). A restore that uses only a shared opening of another conversation's entry
  (a new agent with the same system prompt) copies it: the entry stays for its own
  conversation. Saving a state that an entry already covers is skipped, and entries the new
  state covers are dropped.
- The byte budget is kept by evicting the least recently saved entries; a state larger than
  the whole budget is not saved.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from app.engine.protocol import PromptCacheStats

StateBuffer = np.ndarray[tuple[int], np.dtype[np.uint8]]
"""A sequence's KV state as llama.cpp wrote it (uninitialised until then: no zero-filling of
gigabytes before the copy)."""

MIN_KEEP = 0.25
"""Share of a saved state a restore must use (llama-server's ``f_keep`` threshold)."""


Tokens = npt.NDArray[np.int32]


def as_tokens(tokens: Sequence[int] | Tokens) -> Tokens:
    return np.asarray(tokens, dtype=np.int32)


def common_prefix(a: Sequence[int] | Tokens, b: Sequence[int] | Tokens) -> int:
    """Length of the longest common prefix of two token lists (numpy for long ones: a
    32k-token comparison in Python would hold the scheduler for milliseconds). Arrays are
    compared as they are; a list is converted first, so a caller comparing one prompt with
    many saved states converts it once (``as_tokens``)."""
    n = min(len(a), len(b))
    if n < 256 and not isinstance(a, np.ndarray):
        for i in range(n):
            if a[i] != b[i]:
                return i
        return n
    differ = np.flatnonzero(as_tokens(a[:n]) != as_tokens(b[:n]))
    return int(differ[0]) if differ.size else n


@dataclass(frozen=True, eq=False)
class SavedPrompt:
    tokens: Tokens
    """The tokens whose KV cells ``state`` holds, position by position (never written)."""
    state: StateBuffer
    """``llama_state_seq_get_data`` of the slot that held them (written once, when saved)."""
    prompt_len: int
    """How many of ``tokens`` were the prompt of the slot's last generation (the rest is its
    answer): a prompt that holds all of them continues this conversation."""

    @property
    def size(self) -> int:
        return len(self.state)


class PromptCache:
    def __init__(self, limit_bytes: int | None) -> None:
        """``limit_bytes``: the budget; ``None``: no limit."""
        self.limit_bytes = limit_bytes
        self._entries: deque[SavedPrompt] = deque()  # least recently saved first
        self._held = 0  # bytes of the entries
        self.hits = 0
        self.misses = 0
        self.saved_bytes = 0
        self.restored_bytes = 0
        self.restored_tokens = 0
        self.evictions = 0

    @property
    def bytes(self) -> int:
        return self._held

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> PromptCacheStats:
        return PromptCacheStats(
            hits=self.hits,
            misses=self.misses,
            saved_bytes=self.saved_bytes,
            restored_bytes=self.restored_bytes,
            restored_tokens=self.restored_tokens,
            evictions=self.evictions,
            bytes=self.bytes,
            entries=len(self._entries),
            limit_bytes=self.limit_bytes,
        )

    def covers(self, tokens: Sequence[int] | Tokens) -> bool:
        """An entry already holds all of ``tokens`` (a prefix of it or the same)."""
        tokens = as_tokens(tokens)
        return any(common_prefix(e.tokens, tokens) == len(tokens) for e in self._entries)

    def fits(self, size: int) -> bool:
        return self.limit_bytes is None or size <= self.limit_bytes

    def save(self, tokens: Sequence[int], state: StateBuffer, prompt_len: int) -> bool:
        """Keep ``state`` (the KV cells of ``tokens``, ``prompt_len`` of them its last
        prompt); False if it is not kept."""
        saved = SavedPrompt(as_tokens(tokens), state, prompt_len)
        saved.tokens.flags.writeable = False
        if not self._insert(saved):
            return False
        self.saved_bytes += saved.size
        return True

    def _insert(self, saved: SavedPrompt) -> bool:
        if not len(saved.tokens) or self.covers(saved.tokens) or not self.fits(saved.size):
            return False
        tokens = saved.tokens
        for covered in [
            e for e in self._entries if common_prefix(e.tokens, tokens) == len(e.tokens)
        ]:
            self._remove(covered)
        while (
            self.limit_bytes is not None
            and self._entries
            and (self._held + saved.size > self.limit_bytes)
        ):
            self._remove(self._entries[0])
            self.evictions += 1
        self._entries.append(saved)
        self._held += saved.size
        return True

    def _remove(self, entry: SavedPrompt) -> None:
        self._entries.remove(entry)
        self._held -= entry.size

    def find(
        self, prompt: Sequence[int], *, better_than: int, min_share: float
    ) -> tuple[SavedPrompt, int] | None:
        """The entry worth restoring for ``prompt``, and how many of its tokens match it; None
        if none is. ``better_than``: what the prompt's slot already holds of it."""
        best: tuple[SavedPrompt, int] | None = None
        wanted = as_tokens(prompt)
        for entry in self._entries:
            shared = common_prefix(entry.tokens, wanted)
            if shared <= better_than or shared <= min_share * len(prompt):
                continue
            if shared < MIN_KEEP * len(entry.tokens):
                continue
            if best is None or shared > best[1]:
                best = (entry, shared)
        return best

    def take(self, entry: SavedPrompt) -> None:
        """``entry`` is about to be restored into a slot: it leaves the cache until then, so
        no other placement and no eviction can have it."""
        self._remove(entry)

    def hit(self, entry: SavedPrompt, tokens: int) -> None:
        """``entry`` was restored and ``tokens`` of it kept. An entry whose conversation the
        prompt continues stays with its slot (which saves it again when displaced); one that
        lent only a shared opening goes back, as the most recently saved, for its own."""
        self.hits += 1
        self.restored_bytes += entry.size
        self.restored_tokens += tokens
        if tokens < entry.prompt_len:
            self.keep(entry)

    def keep(self, entry: SavedPrompt) -> bool:
        """Hold ``entry`` as the most recently saved, with no bytes counted as saved: a taken
        entry that was only copied, or one read back from disk. False if it is not kept (a
        newer state covers it, or it is larger than the whole size)."""
        return self._insert(entry)

    def entries(self) -> list[SavedPrompt]:
        """The entries, least recently saved first."""
        return list(self._entries)

    def missed(self) -> None:
        self.misses += 1
