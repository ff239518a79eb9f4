"""KV chunk reuse (``--cache-reuse``): a slot's cells that a new prompt holds elsewhere.

A slot reuses the prefix its cells share with a new prompt. An editor's consecutive requests
share far more than that, but not as one prefix: the ring of context chunks at the front
rotates (one leaves, one arrives), so everything after it sits a few hundred positions away
from where it was. A chat template that drops the previous turn's reasoning does the same to
the rest of the history. Chunk reuse walks the slot's tokens after the common prefix, as
llama-server does: at each point of the prompt, the first place in the cells where a run of at
least ``min_chunk`` tokens matches is moved there (``llama_memory_seq_rm`` the cells in
between, ``llama_memory_seq_add`` the run's positions: llama.cpp re-rotates their keys), and
the walk goes on after it; the first prompt token no run covers ends the walk, and only the
prompt from there is decoded.

The cells moved were computed attending to what preceded them in the old prompt, not the new:
the same approximation llama-server makes. ``min_chunk`` keeps it to long runs (a short one,
a common line of code, would carry little and mislead most).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Move:
    """Cells ``[cache_at, cache_at + length)`` of the slot go to ``prompt_at`` onwards."""

    cache_at: int
    prompt_at: int
    length: int


@dataclass(frozen=True)
class ReusePlan:
    prefix: int
    """Cells kept where they are: the common prefix."""
    moves: tuple[Move, ...] = ()

    @property
    def kept(self) -> int:
        """Prompt tokens the slot holds once the moves are made (positions ``0..kept-1``)."""
        return self.moves[-1].prompt_at + self.moves[-1].length if self.moves else self.prefix


def plan_reuse(
    cached: Sequence[int], prompt: Sequence[int], *, prefix: int, min_chunk: int
) -> ReusePlan:
    """What of ``cached`` (a slot's tokens) the prompt can keep: ``prefix`` (their common
    prefix), then runs of at least ``min_chunk`` tokens (0: none) moved into place."""
    if min_chunk <= 0:
        return ReusePlan(prefix)
    cells, tokens = list(cached), list(prompt)
    moves: list[Move] = []
    at_cache = at_prompt = prefix
    while len(tokens) - at_prompt >= min_chunk:
        start = _first_run(cells, tokens, at_cache, at_prompt, min_chunk)
        if start < 0:
            break
        length = min_chunk
        while (
            start + length < len(cells)
            and at_prompt + length < len(tokens)
            and cells[start + length] == tokens[at_prompt + length]
        ):
            length += 1
        moves.append(Move(start, at_prompt, length))
        at_cache, at_prompt = start + length, at_prompt + length
    return ReusePlan(prefix, tuple(moves))


def _first_run(cells: list[int], tokens: list[int], at_cache: int, at_prompt: int, n: int) -> int:
    """The first position from ``at_cache`` where ``cells`` hold ``tokens[at_prompt:][:n]``, or
    -1. Candidates are found by their first token (``list.index``), then compared whole; both
    run in C, so a walk over a 30k-token slot takes a millisecond or two."""
    want = tokens[at_prompt : at_prompt + n]
    first = want[0]
    last_start = len(cells) - n
    at = at_cache
    while at <= last_start:
        try:
            at = cells.index(first, at, last_start + 1)
        except ValueError:
            return -1
        if cells[at : at + n] == want:
            return at
        at += 1
    return -1
