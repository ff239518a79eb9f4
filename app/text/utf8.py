"""Token bytes to text, one token at a time, never splitting a character.

Byte-level BPE vocabularies (Qwen's among them) split many characters over several tokens, so
a token's bytes are not always text. Python's incremental UTF-8 decoder keeps the bytes of an
unfinished character until the rest arrives, so no text ever carries U+FFFD for a character
the model did finish. A generation that ends inside a character (``max_tokens`` reached after
the first of an emoji's byte tokens) did not write that character: its bytes are dropped, not
turned into U+FFFD, and everything complete before them stays.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable

TokenBytes = Callable[[int], bytes]


class Utf8Decoder:
    def __init__(self, token_bytes: TokenBytes) -> None:
        self._token_bytes = token_bytes
        # Bytes that can never be UTF-8 (not an unfinished character) still become U+FFFD.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self._token_bytes(token_id))

    def finish(self) -> str:
        """End of generation: the bytes of an unfinished character are dropped."""
        self._decoder.reset()
        return ""
