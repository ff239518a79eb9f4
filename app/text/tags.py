"""The one question every stage of the text pipeline asks: could the end of the text so far
still grow into a tag (or a stop string)? Such text is held back until it is decided."""

from __future__ import annotations

from collections.abc import Iterable


def partial_tag_suffix(text: str, tags: Iterable[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``tags``.

    Linear in the tags' lengths: only the positions where a tag's first character occurs in
    the last ``len(tag) - 1`` characters can start such a suffix, and the earliest that
    matches is the longest.
    """
    best = 0
    end = len(text)
    for tag in tags:
        if len(tag) < 2:
            continue
        start = text.find(tag[0], max(end - len(tag) + 1, 0))
        while 0 <= start < end - best:
            if tag.startswith(text[start:]):
                best = end - start
                break
            start = text.find(tag[0], start + 1)
    return best
