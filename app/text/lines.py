"""An editor's limits on a completion's lines: ``n_indent`` and ``t_max_predict_ms``.

Both are llama-server's ``/infill`` options, and editors (llama.vim, llama.vscode) rely on them
to keep a suggestion to the block the cursor is in and to the time a keystroke may wait:

- ``n_indent``: a line after the first that starts indented less than ``n_indent`` (a blank
  line included) ends the completion; that line's text is left out, its indentation kept, as
  llama-server leaves it. The whitespace that opens a line is held until the line's first
  other character decides.
- ``t_max_predict_ms``: once generating has taken longer than that, the completion ends at its
  next newline (the newline included), so a suggestion is never cut mid-line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

LineLimit = Literal["n_indent", "t_max_predict_ms"]
_INDENT = " \t"


class LineLimits:
    def __init__(
        self,
        n_indent: int = 0,
        t_max_predict_ms: float = 0.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._n_indent = n_indent
        self._max_s = t_max_predict_ms / 1000
        self._clock = clock
        self._started: float | None = None
        self._held: str | None = None
        """The whitespace opening the current line, when its indentation is still undecided."""
        self.stopped: LineLimit | None = None

    def push(self, text: str) -> str:
        """The text to send now; ``""`` once a limit ended the completion."""
        if self._started is None:
            self._started = self._clock()
        if self.stopped is not None or not text:
            return ""
        out: list[str] = []
        for char in text:
            if self._held is not None:
                if char in _INDENT:
                    self._held += char
                    continue
                out.append(self._held)
                if len(self._held) < self._n_indent:
                    self._held = None
                    self.stopped = "n_indent"
                    return "".join(out)
                self._held = None
            out.append(char)
            if char == "\n" and self._n_indent > 0:
                self._held = ""
        if self._max_s > 0 and "\n" in text and self._clock() - self._started > self._max_s:
            self.stopped = "t_max_predict_ms"
        return "".join(out)

    def finish(self) -> str:
        """At the end of generation: the whitespace still held."""
        held, self._held = self._held or "", None
        return held
