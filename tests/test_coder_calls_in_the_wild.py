"""Qwen3-Coder tool calls as models write them in the wild, not only as the template does.

Other servers lost calls that the model wrote slightly off its template: a value closed by
``</function>`` with no ``</parameter>`` (Ollama #18563, long file writes), a call written
without its ``<tool_call>`` wrapper left in ``content`` (vLLM #22975), a call cut by
``max_tokens`` answered with a 500 (Ollama #14570). With tools offered each of these is a tool
call, streamed and buffered alike.

Property tests draw calls with the wrapper and each closing tag present or not, blank lines and
spaces between the parts, and prose before, and cut the text into tokens anywhere; the answer
must be the calls and the prose the text says, whatever the split. End-to-end tests run the
same shapes on scripted demo models with Qwen3-Coder's template, buffered and streamed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.engine import Backend
from app.text import TextOptions, TextPipeline
from app.text.tags import partial_tag_suffix
from tests.chat import both, chat_client, delta_field, script_text
from tests.support.models import ENGINES
from tests.test_qwen3_coder import (
    TIME,
    WEATHER,
    WRITE_FILE,
    assert_stream_matches,
    calls_of,
    script,
)
from tests.test_text import (
    CODER_OPTIONS,
    CODER_TAGS,
    FAST,
    PLAIN,
    CoderCall,
    coder_calls,
    run,
    split,
)

CODER = "qwen3_coder"

# -- the parser: any shape, any split ----------------------------------------------------------

GAPS = st.sampled_from(["", "\n", "\n", "\n\n", "\n\n\n", " ", "\t", "\n \n", " \n\t\n"])
"""Whitespace between the parts of a call (the template writes one newline)."""
SPLITS = st.lists(st.integers(1, 1500), max_size=200)


@st.composite
def wild_answers(draw: st.DrawFn) -> tuple[str, str, list[CoderCall]]:
    """(text, content, calls): maybe prose, then calls each with or without ``<tool_call>``
    and with any of its closing tags missing, whitespace between the parts.

    A value's text runs to the tag that ends it, so where ``</parameter>`` is missing the one
    newline after the value is all that separates it from the next tag (an opening tag ends a
    value only at the start of a line); blank lines there would be the value's.
    """
    prose = draw(st.one_of(st.just(""), PLAIN))
    content = prose + draw(GAPS) if prose else ""
    text = content
    calls = draw(st.lists(coder_calls(), min_size=1, max_size=3))
    for name, parameters in calls:
        wrapped = draw(st.booleans())
        text += "<tool_call>" + draw(GAPS) if wrapped else ""
        text += f"<function={name}>" + draw(GAPS)
        open_value = False  # the text ends in a value whose </parameter> is missing
        for key, raw, _ in parameters:
            text += f"<parameter={key}>\n{raw}\n"
            open_value = not draw(st.booleans())
            text += "" if open_value else "</parameter>" + draw(GAPS)
        if draw(st.booleans()):
            text += "</function>" + draw(GAPS)
            open_value = False
        if draw(st.booleans()):  # </tool_call>, even after a function without the wrapper
            text += "</tool_call>" + draw(GAPS)
            open_value = False
        text += "" if open_value else draw(GAPS)
    return text, content, calls


def expected_calls(calls: list[CoderCall]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, {key: value for key, _, value in parameters}) for name, parameters in calls]


@FAST
@given(answer=wild_answers(), cuts=SPLITS)
@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_007", "QWEN3_MOE_SEMANTICS_V1_008")
def test_any_split_of_a_call_written_off_template_gives_the_call(
    answer: tuple[str, str, list[CoderCall]], cuts: list[int]
) -> None:
    """Wrapper and closing tags present or not, blank lines between parts, prose before: the
    calls are the ones written (values typed by the schema), the prose is content, and the
    token deltas of any split rebuild what the whole text gives (stream == buffered)."""
    text, content, calls = answer
    whole = run([text.encode()], CODER_OPTIONS)
    parsed = run(split(text.encode(), cuts), CODER_OPTIONS)
    assert (parsed.content, parsed.calls) == (whole.content, whole.calls)
    assert [(name, json.loads(arguments)) for name, arguments in parsed.calls] == (
        expected_calls(calls)
    )
    assert parsed.content == content
    assert not any(tag in parsed.content for tag in CODER_TAGS)


@FAST
@given(answer=wild_answers(), cuts=SPLITS)
@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_007")
def test_without_tools_a_call_written_off_template_is_text(
    answer: tuple[str, str, list[CoderCall]], cuts: list[int]
) -> None:
    text, _, _ = answer
    parsed = run(split(text.encode(), cuts), TextOptions())
    assert (parsed.content, parsed.calls) == (text, [])


@FAST
@given(answer=wild_answers(), cut=st.integers(0, 1500), cuts=SPLITS)
@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_007")
def test_a_call_written_off_template_cut_anywhere_shows_no_markup(
    answer: tuple[str, str, list[CoderCall]], cut: int, cuts: list[int]
) -> None:
    """A generation that ends anywhere (max_tokens): content is a prefix of the prose with no
    piece of a tag, every call read so far has JSON-object arguments, the calls before the
    last are whole, the last has the parameters read so far; any split gives the same."""
    text, content, calls = answer
    data = text.encode()[:cut]
    whole = run([data], CODER_OPTIONS)
    parsed = run(split(data, cuts), CODER_OPTIONS)
    assert (parsed.content, parsed.calls) == (whole.content, whole.calls)
    assert content.startswith(parsed.content)
    expected = expected_calls(calls)
    got = [(name, json.loads(arguments)) for name, arguments in parsed.calls]
    assert len(got) <= len(expected)
    if got:
        assert got[:-1] == expected[: len(got) - 1]
        (name, arguments), (expected_name, expected_arguments) = got[-1], expected[len(got) - 1]
        assert name == expected_name and isinstance(arguments, dict)
        assert list(arguments) == list(expected_arguments)[: len(arguments)]
        for key, value in list(arguments.items())[:-1]:
            assert value == expected_arguments[key]
        if name == "edit" and "path" in arguments:  # a string parameter: cut, never altered
            assert expected_arguments["path"].startswith(arguments["path"])


AROUND_TAGS = st.sampled_from(
    ["<", "<f", "<func", "<function", "<function ", "<functions>", "<tool", "<tool_", "<t>",
     "< function=", "<fun>", " <", "\n", " ok", "é", "x"]
)  # fmt: skip


@FAST
@given(words=st.lists(st.one_of(AROUND_TAGS, PLAIN), min_size=1, max_size=12), cuts=SPLITS)
@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_007")
def test_text_is_held_only_while_it_could_still_open_a_call(
    words: list[str], cuts: list[int]
) -> None:
    """A bare ``<function=`` opens a call, so the answer text is held back while its end could
    still become one (or ``<tool_call>``) and not a character longer: after every token all of
    the text so far is out but such a suffix."""
    text = "".join(words)
    pieces = split(text.encode(), cuts)
    pipeline = TextPipeline(dict(enumerate(pieces)).__getitem__, CODER_OPTIONS)
    sent, pushed = "", b""
    for token_id, piece in enumerate(pieces):
        pushed += piece
        sent += "".join(d.content for d in pipeline.push(token_id))
        decoded = pushed.decode("utf-8", errors="ignore")
        held = partial_tag_suffix(decoded, ("<tool_call>", "<function="))
        assert sent == decoded[: len(decoded) - held]
    sent += "".join(d.content for d in pipeline.finish())
    # At the end, what could only have been the start of a call's tag is not answer text.
    assert sent == text[: len(text) - partial_tag_suffix(text, ("<tool_call>", "<function="))]


def test_an_answer_that_ends_like_the_start_of_a_tag_keeps_it_unless_cut() -> None:
    """With tools offered, a trailing ``<`` or ``<func`` is held while it could open a call:
    when the model then ends its answer itself it is answer text; only a generation cut by
    max_tokens drops it as the start of a call it never wrote."""
    for ending in ("<", "<func", "<tool_ca"):
        text = f"Use a < b, then {ending}"
        pieces = [piece.encode() for piece in text]
        for cut, expected in ((False, text), (True, text[: -len(ending)])):
            pipeline = TextPipeline(dict(enumerate(pieces)).__getitem__, CODER_OPTIONS)
            sent = "".join(d.content for i in range(len(pieces)) for d in pipeline.push(i))
            sent += "".join(d.content for d in pipeline.finish(cut=cut))
            assert sent == expected, (ending, cut)


# The shapes one at a time: what each gives, whole and split into characters.
SHAPES = {
    "no wrapper": (
        "<function=run>\n<parameter=cmd>\nls\n</parameter>\n</function>",
        "",
        [("run", {"cmd": "ls"})],
    ),
    "no wrapper, prose before, parallel": (
        "Let me look.\n\n<function=run>\n<parameter=cmd>\nls\n</parameter>\n</function>\n"
        "<function=edit>\n<parameter=count>\n3\n</parameter>\n</function>",
        "Let me look.\n\n",
        [("run", {"cmd": "ls"}), ("edit", {"count": 3})],
    ),
    "no </parameter> before </function>": (
        "<tool_call>\n<function=edit>\n<parameter=path>\na.py\n</function>\n</tool_call>",
        "",
        [("edit", {"path": "a.py"})],
    ),
    "no </parameter> before the next parameter": (
        "<tool_call>\n<function=edit>\n<parameter=count>\n7\n<parameter=path>\nb\n"
        "</parameter>\n</function>\n</tool_call>",
        "",
        [("edit", {"count": 7, "path": "b"})],
    ),
    "no </function> before the next block": (
        "<tool_call>\n<function=run>\n<parameter=cmd>\nls\n</parameter>\n</tool_call>\n"
        "<tool_call>\n<function=run>\n<parameter=cmd>\npwd\n</parameter>\n<tool_call>\n"
        "<function=edit>\n</function>\n</tool_call>",
        "",
        [("run", {"cmd": "ls"}), ("run", {"cmd": "pwd"}), ("edit", {})],
    ),
    "no closing tag at the end": (
        '<tool_call>\n<function=edit>\n<parameter=meta>\n{"a": 1}\n',
        "",
        [("edit", {"meta": {"a": 1}})],
    ),
    "no </tool_call>, prose after": (
        "<tool_call>\n<function=run>\n</function>\nDone.",
        "\nDone.",
        [("run", {})],
    ),
    "blank lines between the parts": (
        "<tool_call>\n\n\n<function=edit>\n\n<parameter=path>\nx y\n</parameter>\n\n\n"
        "<parameter=force>\ntrue\n</parameter>  \n\n</function>\n\n</tool_call>",
        "",
        [("edit", {"path": "x y", "force": True})],
    ),
    "an opening tag inside a line of a value stays text": (
        "<function=edit>\n<parameter=path>\nsee <parameter=x> and <function=y>\n</parameter>\n"
        "</function>",
        "",
        [("edit", {"path": "see <parameter=x> and <function=y>"})],
    ),
    "a bare tag that is not a call is text": (
        "Write <function=\nname> like this.",
        "Write <function=\nname> like this.",
        [],
    ),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_007")
def test_each_shape_off_the_template(shape: str) -> None:
    text, content, calls = SHAPES[shape]
    for pieces in ([text.encode()], [ch.encode() for ch in text]):
        parsed = run(pieces, CODER_OPTIONS)
        assert parsed.content == content
        assert [(name, json.loads(arguments)) for name, arguments in parsed.calls] == calls


@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_007")
def test_parallel_tool_calls_false_starts_no_second_call_where_the_first_has_no_end() -> None:
    """The first call's missing ``</function>`` is implied by the next ``<function=``, read in
    the same step: with one call asked for, that second call is not started."""
    options = dataclasses.replace(CODER_OPTIONS, single_tool_call=True)
    text = "<function=run>\n<parameter=cmd>\nls\n</parameter>\n<function=edit>\n</function>"
    for pieces in ([text.encode()], [ch.encode() for ch in text]):
        parsed = run(pieces, options)
        assert parsed.finished
        assert (parsed.content, parsed.calls) == ("", [("run", '{"cmd": "ls"}')])


# -- the real engine: scripted Qwen3-Coder models, buffered and streamed ------------------------

UNWRAPPED_PROSE = "I'll check both cities.\n\n"
UNWRAPPED_SCRIPT = script(
    UNWRAPPED_PROSE,
    "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n",
    "<function=get_time>\n<parameter=tz>\nCET\n</parameter>\n</function>",
)
UNWRAPPED_CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]

# A file the model writes, closed by </function> with no </parameter>; a typed value closed
# by the next parameter; blank lines between the parts; a last call whose closing tags are
# all missing when the turn ends.
FILE = (
    "def greet(name):\n"
    '    print(f"Hello, {name}!")\n'
    "\n\n"
    'if __name__ == "__main__":\n'
    '    greet("café")  # \\o/\n'
)
UNCLOSED_SCRIPT = script(
    "<tool_call>\n\n<function=write_file>\n\n\n<parameter=path>\nsrc/hello.py\n</parameter>\n\n",
    "<parameter=mode>\n420\n",
    f"<parameter=content>\n{FILE}\n</function>\n\n</tool_call>\n",
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n",
)
UNCLOSED_CALLS = [
    ("write_file", {"path": "src/hello.py", "mode": 420, "content": FILE}),
    ("get_weather", {"city": "Oslo"}),
]


def tokens_until(pieces: Sequence[bytes], text: str) -> int:
    """The number of a script's first tokens whose text holds ``text``."""
    return next(n for n in range(len(pieces) + 1) if text.encode() in b"".join(pieces[:n]))


def assert_no_markup(buffered: dict[str, Any]) -> None:
    content = buffered["choices"][0]["message"]["content"] or ""
    assert not any(tag in content for tag in CODER_TAGS), content


@pytest.mark.anyio
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_007")
async def test_a_call_without_its_tool_call_wrapper_is_a_call_not_content(
    scripted: Callable[..., Backend], engine: str
) -> None:
    """vLLM #22975: a Qwen3-Coder call the model wrote as a bare ``<function=…>`` block (no
    ``<tool_call>``) after some prose was left in ``content``. The prose is content, both
    calls are tool_calls, streamed as buffered."""
    async with chat_client(scripted(UNWRAPPED_SCRIPT, engine, CODER)) as client:
        buffered, stream = await both(client, tools=[WEATHER, TIME])
    choice = buffered["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == UNWRAPPED_PROSE
    assert calls_of(choice["message"]) == UNWRAPPED_CALLS
    assert_stream_matches(buffered, stream)


@pytest.mark.anyio
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_007", "QWEN3_MOE_SEMANTICS_V1_008")
async def test_a_file_closed_by_function_end_and_calls_missing_closing_tags_are_calls(
    scripted: Callable[..., Backend], engine: str
) -> None:
    """Ollama #18563: a long file write whose ``<parameter=content>`` value was closed by
    ``</function>`` with no ``</parameter>`` lost the call. Here also a typed value closed by
    the next ``<parameter=``, blank lines between the parts, and a last call whose
    ``</parameter>``, ``</function>`` and ``</tool_call>`` never come before the turn ends:
    every call arrives whole, values typed, the file byte for byte."""
    async with chat_client(scripted(UNCLOSED_SCRIPT, engine, CODER)) as client:
        buffered, stream = await both(client, tools=[WRITE_FILE, WEATHER])
    choice = buffered["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert calls_of(choice["message"]) == UNCLOSED_CALLS
    assert_stream_matches(buffered, stream)


MAX_TOKENS_CUTS = [
    ("inside a bare function's name", UNWRAPPED_SCRIPT, "<function=get_w", "get_weather>"),
    ("inside a file value", UNCLOSED_SCRIPT, 'print(f"Hel', "</function>"),
    ("inside the </function> ending a value", UNCLOSED_SCRIPT, "\n</fu", "</function>"),
    ("inside the next block's head", UNCLOSED_SCRIPT, "<function=get_", "get_weather>"),
]


@pytest.mark.anyio
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("where", "pieces", "until", "not_yet"), MAX_TOKENS_CUTS, ids=[c[0] for c in MAX_TOKENS_CUTS]
)
@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_007")
async def test_a_call_cut_by_max_tokens_ends_with_length_and_shows_no_markup(
    scripted: Callable[..., Backend],
    engine: str,
    where: str,
    pieces: tuple[bytes, ...],
    until: str,
    not_yet: str,
) -> None:
    """Ollama #14570: a tool call cut by ``max_tokens`` was answered with an HTTP 500. Cut
    anywhere in a call written off the template, the answer is a 200 with
    ``finish_reason: "length"``, no piece of the call's markup in content, and the calls read
    so far with valid JSON-object arguments (the cut value closed), streamed as buffered."""
    cut = tokens_until(pieces, until)
    assert not_yet.encode() not in b"".join(pieces[:cut]), "the cut must fall before it"
    tools = [WEATHER, TIME] if pieces is UNWRAPPED_SCRIPT else [WRITE_FILE, WEATHER]
    whole = UNWRAPPED_CALLS if pieces is UNWRAPPED_SCRIPT else UNCLOSED_CALLS
    async with chat_client(scripted(pieces, engine, CODER)) as client:
        buffered, stream = await both(client, tools=tools, max_tokens=cut)
    choice = buffered["choices"][0]
    assert choice["finish_reason"] == "length"
    assert_no_markup(buffered)
    assert_stream_matches(buffered, stream)
    calls = calls_of(choice["message"]) if "tool_calls" in choice["message"] else []
    if pieces is UNWRAPPED_SCRIPT:
        assert choice["message"]["content"] == UNWRAPPED_PROSE and calls == []
        return
    assert choice["message"]["content"] is None
    assert [name for name, _ in calls] == [name for name, _ in whole[: len(calls)]]
    (name, arguments), *_ = calls
    assert name == "write_file" and arguments["path"] == "src/hello.py"
    assert FILE.startswith(arguments["content"])
    if where == "inside a file value":
        assert len(calls) == 1 and 'print(f"Hel' in arguments["content"]
    else:  # the file was complete; the tag that would have closed it is not in it
        assert calls[0] == whole[0]
        assert len(calls) == 1


@pytest.mark.anyio
@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_007")
async def test_without_tools_calls_off_the_template_stay_text(
    scripted: Callable[..., Backend],
) -> None:
    for pieces in (UNWRAPPED_SCRIPT, UNCLOSED_SCRIPT):
        async with chat_client(scripted(pieces, "single", CODER)) as client:
            buffered, stream = await both(client)
        choice = buffered["choices"][0]
        assert choice["finish_reason"] == "stop"
        assert choice["message"] == {"role": "assistant", "content": script_text(pieces)}
        assert "".join(delta_field(stream, "content")) == script_text(pieces)
