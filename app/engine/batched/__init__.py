"""Continuous batching: many generations decoded together in one llama.cpp context, laid out
as ``llama-server`` is (slots, a task queue, ``update_slots``) over llama-cpp-python's
low-level API.

- ``backend``: ``BatchedLlamaBackend``, the context's lifetime and the requester's side.
- ``queue``: a ``Generation`` from arrival to end, and the queue of those waiting for a slot.
- ``slots``: which slot a generation takes, what of its cells the prompt keeps.
- ``slot_state``: a slot's KV state to and from the host-RAM prompt cache.
- ``scheduler``: the scheduler thread's step: drop, place, fill the batch, decode, sample, post.
- ``sampling``: a step's sampling (argmax for plain greedy, followers on a leader's logits).
"""

from __future__ import annotations

from app.engine.batched.backend import BatchedLlamaBackend
from app.engine.batched.slots import Slot, choose_slot, default_parallel

__all__ = ["BatchedLlamaBackend", "Slot", "choose_slot", "default_parallel"]
