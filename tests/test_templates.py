"""``app.api.http.templates``: a per-token event rendered from a template equals, byte for
byte, what pydantic writes for the same event; a render the template cannot hold keeps
pydantic's path."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from app.api.http.templates import JsonTemplate


class TextDelta(BaseModel):
    """Shaped like the Responses API's ``response.output_text.delta`` event."""

    type: str = "response.output_text.delta"
    item_id: str = "msg_1"
    output_index: int = 0
    delta: str
    sequence_number: int


class NumberFirst(BaseModel):
    index: int
    delta: str


class TextOnly(BaseModel):
    id: str = "chatcmpl-1"
    content: str


def text_number(text: str, number: int) -> str:
    return TextDelta(delta=text, sequence_number=number).model_dump_json()


def number_text(text: str, number: int) -> str:
    return NumberFirst(index=number, delta=text).model_dump_json()


def text_only(text: str, number: int) -> str:
    return TextOnly(content=text).model_dump_json()


HARD_TEXTS = ['"', "\\", "\n\t\r\b\f", "\x00\x1f\x7f", "é", "😀", "\u2028\u2029", "</script>", ""]


@settings(max_examples=300, deadline=None)
@given(st.text(), st.integers(min_value=0, max_value=10**12))
def test_a_filled_template_is_what_pydantic_writes(text: str, number: int) -> None:
    for render in (text_number, number_text, text_only):
        template = JsonTemplate.around(render)
        assert template is not None
        assert template.fill(text, number) == render(text, number)


def test_escapes_and_non_ascii_are_written_as_pydantic_writes_them() -> None:
    template = JsonTemplate.around(text_number)
    assert template is not None
    for text in HARD_TEXTS:
        assert template.fill(text, 7) == text_number(text, 7)


def test_a_text_only_template_ignores_the_number() -> None:
    template = JsonTemplate.around(text_only)
    assert template is not None
    assert template.fill("hi", 5) == template.fill("hi") == '{"id":"chatcmpl-1","content":"hi"}'


def test_renders_a_template_cannot_hold_keep_the_pydantic_path() -> None:
    def text_twice(text: str, number: int) -> str:
        return TextOnly(id=text, content=text).model_dump_json()

    def number_inside_a_string(text: str, number: int) -> str:
        # A model id that happens to contain the number: not a whole JSON value.
        return TextOnly(id=f"m{number}", content=text).model_dump_json()

    def number_twice(text: str, number: int) -> str:
        return TextDelta(delta=text, sequence_number=number, output_index=number).model_dump_json()

    def no_text(text: str, number: int) -> str:
        return TextOnly(content="fixed").model_dump_json()

    for render in (text_twice, number_inside_a_string, number_twice, no_text):
        assert JsonTemplate.around(render) is None, render.__name__
