"""Incremental UTF-8 decoding and stop-string hold-back, on byte pieces like a BPE vocab's."""

from __future__ import annotations

import itertools

import pytest

from app.textstream import StopMatcher, TextStream


def _stream(pieces: list[bytes], stop: list[str]) -> tuple[list[str], str, bool]:
    vocab = dict(enumerate(pieces))
    text = TextStream(vocab.__getitem__, stop)
    deltas = []
    for token_id in range(len(pieces)):
        deltas.append(text.push(token_id))
        if text.stopped:
            break
    deltas.append(text.finish())
    return [d for d in deltas if d], "".join(deltas), text.stopped


@pytest.mark.falsifies("QWEN3_MOE_TEXT_INTEGRITY_V1_001")
def test_emoji_split_over_byte_tokens_arrives_whole() -> None:
    pieces = [b"Hi ", *[bytes([b]) for b in "😀".encode()], b" caf", b"\xc3", b"\xa9"]
    deltas, joined, _ = _stream(pieces, [])
    assert joined == "Hi 😀 café"
    assert "😀" in deltas
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.falsifies("QWEN3_MOE_TEXT_INTEGRITY_V1_002")
def test_stop_string_across_token_boundaries_is_never_sent() -> None:
    pieces = [b"Hello", b" wo", b"r", b"ld", b", and more"]
    deltas, joined, stopped = _stream(pieces, ["world"])
    assert stopped
    assert joined == "Hello "
    assert all("w" not in d for d in deltas)


@pytest.mark.falsifies("QWEN3_MOE_TEXT_INTEGRITY_V1_003")
def test_held_prefix_is_released_when_it_cannot_become_a_stop() -> None:
    pieces = [b"Hello", b" wo", b"rm", b" farm"]
    deltas, joined, stopped = _stream(pieces, ["world"])
    assert not stopped
    assert joined == "Hello worm farm"
    # "wo" is held until "rm" shows it is not "world"; the space before it is not held.
    assert deltas == ["Hello", " ", "worm", " farm"]


@pytest.mark.falsifies("QWEN3_MOE_TEXT_INTEGRITY_V1_003")
def test_held_prefix_is_released_at_the_end_of_generation() -> None:
    _deltas, joined, stopped = _stream([b"abc", b" wor"], ["world"])
    assert not stopped
    assert joined == "abc wor"


@pytest.mark.falsifies("QWEN3_MOE_TEXT_INTEGRITY_V1_002")
def test_earliest_of_several_stop_strings_wins() -> None:
    _, joined, stopped = _stream([b"one two three"], ["three", "two"])
    assert stopped and joined == "one "


@pytest.mark.parametrize("stop", ["ab", "aab", "abab", "b", "zz"])
@pytest.mark.falsifies("QWEN3_MOE_TEXT_INTEGRITY_V1_002")
def test_any_split_of_the_text_gives_the_same_result(stop: str) -> None:
    """Hold-back must not depend on where the token boundaries fall."""
    text = "xaababzab"
    expected = text[: text.find(stop)] if stop in text else text
    for cut1, cut2 in itertools.combinations(range(1, len(text)), 2):
        matcher = StopMatcher([stop])
        out = "".join(matcher.push(part) for part in (text[:cut1], text[cut1:cut2], text[cut2:]))
        out += matcher.flush()
        assert out == expected, (cut1, cut2)
