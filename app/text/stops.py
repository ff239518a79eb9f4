"""Token ids to text deltas: incremental UTF-8 decoding and stop-string hold-back.

Byte-level BPE vocabularies (Qwen's among them) split many characters over several tokens, so
a token's bytes are not always text. The decoder keeps the bytes of an unfinished character
until the rest arrives (Python's incremental UTF-8 decoder does exactly this), so no delta
ever carries U+FFFD for a character the model did finish.

Stop strings are decided on that text. Text that could still become a stop string is held
back until it either completes one (then it, and everything after it, is dropped) or can no
longer do so (then it is released). The alternative rejected: matching stop strings on token
ids, which misses every stop string that a tokenizer splits differently from the prompt.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence


class StopMatcher:
    """Releases text that cannot be part of a stop string; finds the first stop string."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Text now safe to send. After a stop string is found, always ``""``."""
        if self.stopped:
            return ""
        if not self._stop:
            return text
        self._held += text
        first = min((i for i in (self._held.find(s) for s in self._stop) if i >= 0), default=-1)
        if first >= 0:
            self.stopped = True
            released, self._held = self._held[:first], ""
            return released
        keep = self._longest_stop_prefix_suffix()
        cut = len(self._held) - keep
        released, self._held = self._held[:cut], self._held[cut:]
        return released

    def flush(self) -> str:
        """At the end of generation, held text was never a stop string: release it."""
        released, self._held = ("" if self.stopped else self._held), ""
        return released

    def _longest_stop_prefix_suffix(self) -> int:
        held = self._held
        best = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(held)), best, -1):
                if held.endswith(stop[:length]):
                    best = length
                    break
        return best


class TextStream:
    """Turns sampled token ids into the text deltas a client may see."""

    def __init__(self, token_bytes: Callable[[int], bytes], stop: Sequence[str]) -> None:
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = StopMatcher(stop)

    @property
    def stopped(self) -> bool:
        """A stop string was found: generation should end."""
        return self._stop.stopped

    def push(self, token_id: int) -> str:
        return self._stop.push(self._utf8.decode(self._token_bytes(token_id)))

    def finish(self) -> str:
        """Release what is held at the end of generation (bytes left over become U+FFFD)."""
        tail = self._stop.push(self._utf8.decode(b"", final=True))
        return tail + self._stop.flush()
