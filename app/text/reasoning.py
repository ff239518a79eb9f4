"""Splitting Qwen3's ``<think>…</think>`` block from the answer, as text streams in.

Qwen3 opens its output with a thinking block when thinking is on. ``ReasoningSplitter`` turns
released text into ``("reasoning", …)`` and ``("content", …)`` segments as it arrives, holding
back only what could still be part of a tag or of whitespace that the buffered response trims
(the newline after ``<think>``, the newlines around ``</think>``), so streamed segments
concatenate to exactly the buffered fields.

Modes:
- ``extract``: the block goes to reasoning, the rest to content.
- ``no_thinking``: thinking is off for this request; nothing may land in reasoning. The empty
  block Qwen3 emits under ``/no_think`` (``<think>\\n\\n</think>\\n\\n``) is dropped; a model
  that thinks anyway has its block left in content verbatim, rather than its answer misfiled.
- ``raw``: no parsing (setting ``--reasoning-format none``).

The alternative rejected: deciding on token ids. ``<think>`` is a plain added token in Qwen's
vocabulary, but the same tag typed as text by a fine-tune or a template would be missed.
"""

from __future__ import annotations

from typing import Literal

from app.text.tags import partial_tag_suffix

OPEN = "<think>"
CLOSE = "</think>"

Kind = Literal["reasoning", "content"]
Segment = tuple[Kind, str]
Mode = Literal["extract", "no_thinking", "raw"]


class ReasoningSplitter:
    def __init__(self, mode: Mode) -> None:
        self._mode = mode
        self._state: Literal["start", "thinking", "after", "content"] = (
            "content" if mode == "raw" else "start"
        )
        self._held = ""
        self._block = ""  # no_thinking: the block so far, while it may still be empty
        self._thought_started = False

    def push(self, text: str) -> list[Segment]:
        if self._state == "content":
            return [("content", text)] if text else []
        self._held += text
        return self._advance()

    def finish(self) -> list[Segment]:
        """End of generation: whatever is held was never a tag."""
        segments = self._advance()
        rest, self._held = self._held, ""
        if self._state == "thinking":
            if self._mode == "no_thinking":
                rest = OPEN + self._block + rest
                return [*segments, ("content", rest)] if rest.strip() else segments
            rest = rest.rstrip()
            return [*segments, ("reasoning", rest)] if rest else segments
        if self._state == "after":
            return segments
        return [*segments, ("content", rest)] if rest else segments

    def _advance(self) -> list[Segment]:
        segments: list[Segment] = []
        while True:
            before = (self._state, len(self._held))
            if self._state == "start":
                self._start()
            if self._state == "thinking":
                segments += self._thinking()
            if self._state == "after":
                self._after()
            if self._state == "content" and self._held:
                segments.append(("content", self._held))
                self._held = ""
            if (self._state, len(self._held)) == before:
                return segments

    def _start(self) -> None:
        stripped = self._held.lstrip()
        if stripped.startswith(OPEN):
            self._held = stripped[len(OPEN) :]
            self._state = "thinking"
        elif not (OPEN.startswith(stripped)):
            self._state = "content"
        # else: still a possible "<think>": wait for more text

    def _thinking(self) -> list[Segment]:
        if self._mode == "extract" and not self._thought_started:
            self._held = self._held.lstrip()  # reasoning starts at its first visible character
        held = self._held
        end = held.find(CLOSE)
        if end >= 0:
            body = held[:end]
            if self._mode == "extract":
                self._held, self._state = held[end + len(CLOSE) :], "after"
                return self._think_text(body.rstrip())
            segments = self._think_text(body)
            if self._state == "content":  # the thought leaked: its closing tag is text too
                self._held = held[end:]
            else:
                self._held, self._state = held[end + len(CLOSE) :], "after"
            return segments
        keep = partial_tag_suffix(held, (CLOSE,))
        body = held[: len(held) - keep]
        trailing = len(body) - len(body.rstrip())  # may be trimmed before </think>
        keep += trailing
        release, self._held = held[: len(held) - keep], held[len(held) - keep :]
        return self._think_text(release)

    def _think_text(self, text: str) -> list[Segment]:
        if not text:
            return []
        if self._mode == "no_thinking":
            if not self._block.strip() and not text.strip():
                self._block += text
                return []
            # A real thought while thinking is off: keep it, as text, in the answer.
            leaked, self._block = OPEN + self._block + text, ""
            self._mode = "raw"
            self._state = "content"
            return [("content", leaked)]
        self._thought_started = True
        return [("reasoning", text)]

    def _after(self) -> None:
        stripped = self._held.lstrip()
        if stripped:
            self._held = stripped
            self._state = "content"
        else:
            self._held = ""
