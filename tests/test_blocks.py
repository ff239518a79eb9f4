"""``app.api.http.blocks``: an answer's deltas as the ordered blocks the Responses and Messages APIs
send (reasoning, text, one per tool call), opened, filled and closed in the model's order."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from app.api.http.blocks import Blocks, Step
from app.text import Delta
from app.text.tool_calls import ToolCallDelta


def reasoning(text: str) -> Delta:
    return Delta(reasoning=text)


def content(text: str) -> Delta:
    return Delta(content=text)


def call_opens(index: int, name: str, arguments: str = "") -> Delta:
    return Delta(tool_call=ToolCallDelta(index, arguments, id=f"call_{index}", name=name))


def call_goes_on(index: int, arguments: str) -> Delta:
    return Delta(tool_call=ToolCallDelta(index, arguments))


def test_an_answer_becomes_reasoning_text_and_one_block_per_call_in_order() -> None:
    blocks = Blocks()
    steps = [
        blocks.add(d)
        for d in (
            reasoning("Let me "),
            reasoning("check."),
            content("Sure."),
            call_opens(0, "get_weather"),
            call_goes_on(0, '{"city": '),
            call_goes_on(0, '"Paris"}'),
            call_opens(1, "get_time", "{}"),
            content("Done."),
        )
    ]
    assert [(b.kind, b.index, b.text) for b in blocks.blocks] == [
        ("reasoning", 0, "Let me check."),
        ("text", 1, "Sure."),
        ("tool_call", 2, '{"city": "Paris"}'),
        ("tool_call", 3, "{}"),
        ("text", 4, "Done."),
    ]
    assert [(b.call_id, b.name) for b in blocks.blocks[2:4]] == [
        ("call_0", "get_weather"),
        ("call_1", "get_time"),
    ]
    assert [b.call_id for b in (blocks.blocks[0], blocks.blocks[1], blocks.blocks[4])] == [""] * 3
    assert [s.opened for s in steps] == [True, False, True, True, False, False, True, True]
    # Each opening closes the block before it, and nothing else closes a block.
    closed = [s.closed.index if s.closed else None for s in steps]
    assert closed == [None, None, 0, 1, None, None, 2, 3]
    assert blocks.last is blocks.blocks[4]


def test_a_call_opened_with_no_arguments_yet_adds_no_text() -> None:
    blocks = Blocks()
    step = blocks.add(call_opens(0, "ls"))
    assert (step.opened, step.text, step.block.text, step.block.name) == (True, "", "", "ls")
    assert blocks.add(call_goes_on(0, "{}")).text == "{}"


def test_two_calls_in_a_row_are_two_blocks() -> None:
    blocks = Blocks()
    blocks.add(call_opens(0, "a", "{}"))
    second = blocks.add(call_opens(1, "b", "{}"))
    assert second.opened and second.closed is blocks.blocks[0]
    assert [b.name for b in blocks.blocks] == ["a", "b"]


def test_no_block_before_the_first_delta() -> None:
    assert Blocks().last is None


KINDS = st.sampled_from(["reasoning", "text", "call", "more"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(KINDS, st.text(min_size=1, max_size=5)), max_size=30))
def test_the_steps_rebuild_every_block(pieces: list[tuple[str, str]]) -> None:
    """Whatever the order: each block is opened once, its steps' texts join to its text, it is
    closed only by the next block's opening, and the indices count from 0."""
    blocks = Blocks()
    steps: list[Step] = []
    calls = 0
    for kind, text in pieces:
        if kind == "more" and (blocks.last is None or blocks.last.kind != "tool_call"):
            kind = "call"  # a call's later delta only ever follows its first
        if kind == "reasoning":
            steps.append(blocks.add(reasoning(text)))
        elif kind == "text":
            steps.append(blocks.add(content(text)))
        elif kind == "call":
            steps.append(blocks.add(call_opens(calls, f"f{calls}", text)))
            calls += 1
        else:
            steps.append(blocks.add(call_goes_on(calls - 1, text)))
    assert [b.index for b in blocks.blocks] == list(range(len(blocks.blocks)))
    assert [s.block for s in steps if s.opened] == blocks.blocks
    assert [s.closed for s in steps if s.closed] == blocks.blocks[:-1]
    for block in blocks.blocks:
        assert "".join(s.text for s in steps if s.block is block) == block.text
    for before, after in zip(blocks.blocks, blocks.blocks[1:], strict=False):
        assert before.kind != after.kind or after.kind == "tool_call"
