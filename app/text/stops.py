"""Stop strings, decided on decoded text.

Text that could still become a stop string is held back until it either completes one (then
it, and everything after it, is dropped) or can no longer do so (then it is released). The
alternative rejected: matching stop strings on token ids, which misses every stop string that
a tokenizer splits differently from the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from app.text.tags import partial_tag_suffix


class StopMatcher:
    """Releases text that cannot be part of a stop string; finds the first stop string."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None
        """The stop string that ended the text (the earliest one found), once it has."""

    def push(self, text: str) -> str:
        """Text now safe to send. After a stop string is found, always ``""``."""
        if self.stopped:
            return ""
        if not self._stop:
            return text
        # Only the held text plus the new text can contain a stop string that was not there
        # before, and only one starting in the held part or the new one.
        self._held += text
        found = [(i, s) for s in self._stop if (i := self._held.find(s)) >= 0]
        if found:
            at, self.matched = min(found, key=lambda hit: hit[0])
            self.stopped = True
            released, self._held = self._held[:at], ""
            return released
        cut = len(self._held) - partial_tag_suffix(self._held, self._stop)
        released, self._held = self._held[:cut], self._held[cut:]
        return released

    def flush(self) -> str:
        """At the end of generation, held text was never a stop string: release it."""
        released, self._held = ("" if self.stopped else self._held), ""
        return released
