"""The text pipeline: token ids to content, reasoning and tool-call deltas.

Property tests drive the real ``TextPipeline`` with a byte-level vocabulary made on the fly:
a script of text (``<think>`` blocks, answers, tool calls, multi-byte characters, stop
strings) is cut into tokens at random byte boundaries, each piece becoming one token id. The
invariants hold for every split: the deltas concatenate to what the whole text parses to in
one piece, no delta carries a broken character or a fragment of a tag or a stop string, and a
generation that ends inside a character drops just that character. End-to-end tests then hold
the same on the real engine with the demo model's byte tokens, streamed and buffered.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.demo import DEFAULT_SCRIPT, script_text
from app.engine import Backend
from app.main import create_app
from app.text import Delta, Mode, TextOptions, TextPipeline
from app.text.schema_types import JSON_TYPES, ParameterTypes, schema_types
from app.text.tags import partial_tag_suffix
from tests import sse
from tests.support.clients import HELLO, asgi_client
from tests.support.servers import settings_for

SCRIPT = script_text()
TAGS = ("<think>", "</think>", "<tool_call>", "</tool_call>")


# -- a pipeline on a vocabulary made of the pieces of one text -------------------------------


@dataclass
class Parsed:
    content: str
    reasoning: str
    calls: list[tuple[str, str]]
    """(name, arguments) of every tool call."""
    deltas: list[Delta]
    finished: bool


def run(pieces: Sequence[bytes], options: TextOptions) -> Parsed:
    """Feed ``pieces`` as tokens (one id each) until the pipeline says it is finished."""
    vocab = dict(enumerate(pieces))
    pipeline = TextPipeline(vocab.__getitem__, options)
    deltas: list[Delta] = []
    for token_id in range(len(pieces)):
        deltas += pipeline.push(token_id)
        if pipeline.finished:
            break
    deltas += pipeline.finish()
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        call = delta.tool_call
        if call is not None:
            entry = calls.setdefault(call.index, ["", ""])
            if call.name is not None:
                entry[0] = call.name
            entry[1] += call.arguments
    return Parsed(
        content="".join(d.content for d in deltas),
        reasoning="".join(d.reasoning for d in deltas),
        calls=[(name, args) for name, args in (calls[i] for i in sorted(calls))],
        deltas=deltas,
        finished=pipeline.finished,
    )


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def assert_clean(parsed: Parsed, stops: Sequence[str] = ()) -> None:
    """No delta carries a broken character, a tag, or a stop string (whole or a fragment at
    its end that a later delta completes)."""
    for delta in parsed.deltas:
        for text in (delta.content, delta.reasoning):
            assert "\ufffd" not in text
            if text:
                assert all(tag not in text for tag in ("<think>", "</think>")), text
    for stop in stops:
        assert stop not in parsed.content, stop


# -- strategies --------------------------------------------------------------------------------

WORDS = st.sampled_from(
    ["the", " answer", " is", " 42", ".", "\n", " café", " 😀", " 🚀", " Zürich", " 東京", " <",
     " a<b", "</", " ok", ",", " >"]
)  # fmt: skip
PLAIN = st.lists(WORDS, min_size=1, max_size=12).map("".join)


@st.composite
def scripts(draw: st.DrawFn) -> tuple[str, str, str, list[tuple[str, dict[str, Any]]]]:
    """(whole text, thought, answer, calls) of a Qwen3 answer: maybe a think block, an answer,
    maybe tool calls."""
    thought = draw(st.one_of(st.just(""), PLAIN)).strip()
    answer = draw(PLAIN).strip()
    calls = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["get_weather", "search", "run_shell"]),
                st.dictionaries(
                    st.sampled_from(["city", "q", "n", "cmd"]),
                    st.one_of(st.integers(-5, 500), PLAIN, st.booleans()),
                    max_size=3,
                ),
            ),
            max_size=2,
        )
    )
    text = ""
    if draw(st.booleans()) or thought:
        text += f"<think>\n{thought}\n</think>\n\n"
    text += answer
    for name, arguments in calls:
        payload = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
        text += f"\n<tool_call>\n{payload}\n</tool_call>"
    return text, thought, answer, calls


CUTS = st.lists(st.integers(1, 400), max_size=60)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- properties --------------------------------------------------------------------------------


@FAST
@given(text=PLAIN, cuts=CUTS)
@pytest.mark.falsifies("QWEN3_MOE_TEXT_INTEGRITY_V1_001")
def test_any_byte_split_gives_whole_characters_and_the_whole_text(
    text: str, cuts: list[int]
) -> None:
    parsed = run(split(text.encode(), cuts), TextOptions())
    assert parsed.content == text
    assert_clean(parsed)


@FAST
@given(text=PLAIN, cut=st.integers(1, 3), cuts=CUTS)
@pytest.mark.falsifies("QWEN3_MOE_TEXT_INTEGRITY_V1_005")
def test_a_generation_that_ends_inside_a_character_drops_just_that_character(
    text: str, cut: int, cuts: list[int]
) -> None:
    """The unfinished bytes are dropped; every complete character before them stays."""
    rocket = "🚀".encode()
    data = text.encode() + rocket[:cut]
    parsed = run(split(data, cuts), TextOptions())
    assert parsed.content == text
    assert_clean(parsed)


@FAST
@given(
    text=PLAIN,
    stops=st.lists(st.sampled_from(["42", " is", "é", "😀 ", "\n", "zz"]), max_size=3),
    cuts=CUTS,
)
@pytest.mark.falsifies("QWEN3_MOE_TEXT_INTEGRITY_V1_002", "QWEN3_MOE_TEXT_INTEGRITY_V1_003")
def test_any_split_cuts_at_the_earliest_stop_string_and_releases_the_rest(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    parsed = run(split(text.encode(), cuts), TextOptions(stop=tuple(stops)))
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    assert parsed.content == (text[: min(found)] if found else text)
    assert parsed.finished == bool(found)
    assert_clean(parsed, stops)


@FAST
@given(script=scripts(), cuts=CUTS, mode=st.sampled_from(["extract", "no_thinking", "raw"]))
@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_001", "QWEN3_MOE_SEMANTICS_V1_003")
def test_any_split_parses_as_the_whole_text_does(
    script: tuple[str, str, str, list[tuple[str, dict[str, Any]]]], cuts: list[int], mode: Mode
) -> None:
    """Thinking, answer and tool calls come out of a split stream exactly as out of the text
    in one piece; with tools the calls are the script's, arguments as valid JSON."""
    text, thought, answer, calls = script
    options = TextOptions(reasoning=mode, tool_calls=True)
    whole = run([text.encode()], options)
    parsed = run(split(text.encode(), cuts), options)
    assert (parsed.content, parsed.reasoning, parsed.calls) == (
        whole.content,
        whole.reasoning,
        whole.calls,
    )
    assert [(n, json.loads(a)) for n, a in parsed.calls] == calls
    assert "<tool_call>" not in parsed.content
    if mode == "extract":
        assert_clean(parsed)
        assert parsed.reasoning == thought
        assert parsed.content.strip() == answer
    else:  # no block is extracted: a thought left in the answer keeps its tags
        assert parsed.reasoning == ""


@FAST
@given(script=scripts(), cuts=CUTS)
def test_without_tools_a_call_is_plain_text(
    script: tuple[str, str, str, list[tuple[str, dict[str, Any]]]], cuts: list[int]
) -> None:
    text, _, _, _ = script
    parsed = run(split(text.encode(), cuts), TextOptions(reasoning="extract"))
    assert parsed.calls == []
    whole = run([text.encode()], TextOptions(reasoning="extract"))
    assert parsed.content == whole.content


def test_every_byte_a_token_and_every_character_a_token() -> None:
    """The two extreme splits of a full script, thinking, answer, calls, stops and all."""
    text = (
        "<think>\nUser asks for Zürich 😀.\n</think>\n\nSure: café 東京.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Zürich", "n": 3}}\n</tool_call>'
    )
    options = TextOptions(reasoning="extract", tool_calls=True)
    whole = run([text.encode()], options)
    by_byte = run([bytes([b]) for b in text.encode()], options)
    by_char = run([ch.encode() for ch in text], options)
    for parsed in (by_byte, by_char):
        assert (parsed.content, parsed.reasoning, parsed.calls) == (
            whole.content,
            whole.reasoning,
            whole.calls,
        )
        assert_clean(parsed)
    assert whole.reasoning == "User asks for Zürich 😀."
    assert whole.content == "Sure: café 東京.\n"  # the text before a call, as written
    assert whole.calls == [("get_weather", '{"city": "Zürich", "n": 3}')]


def test_single_tool_call_finishes_the_pipeline_after_the_first_call() -> None:
    one = '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>'
    text = f"{one}\n{one}"
    options = TextOptions(tool_calls=True, single_tool_call=True)
    parsed = run([ch.encode() for ch in text], options)
    assert parsed.finished
    assert parsed.calls == [("a", "{}")]


@pytest.mark.parametrize(
    ("text", "tags", "held"),
    [
        ("abc", ["<think>"], 0),
        ("abc<", ["<think>"], 1),
        ("abc<thi", ["<think>"], 4),
        ("<think>", ["<think>"], 0),  # a whole tag is not a partial one
        ("x</", ["<think>", "</think>"], 2),
        ("aa", ["aab"], 2),
        ("aaa", ["aab"], 2),
        ("", ["<think>"], 0),
        ("abc", ["x"], 0),
    ],
)
def test_partial_tag_suffix(text: str, tags: list[str], held: int) -> None:
    assert partial_tag_suffix(text, tags) == held


@FAST
@given(text=st.text(alphabet="ab<>/", max_size=12), tags=st.lists(st.text("ab<", min_size=1,
       max_size=5), min_size=1, max_size=3))  # fmt: skip
def test_partial_tag_suffix_is_the_longest_proper_prefix_at_the_end(
    text: str, tags: list[str]
) -> None:
    expected = max(
        (n for tag in tags for n in range(1, len(tag)) if text.endswith(tag[:n])), default=0
    )
    assert partial_tag_suffix(text, tags) == expected


# -- Qwen3-Coder XML calls: the same properties, values typed by the tools' schemas ----------

CODER_TOOLS: dict[str, dict[str, Any] | None] = {
    "edit": {
        "type": "object",
        "properties": {
            "path": {"type": "string"},
            "count": {"type": "integer"},
            "ratio": {"type": "number"},
            "force": {"type": "boolean"},
            "meta": {"type": "object"},
            "lines": {"type": "array", "items": {"type": "integer"}},
            "parent": {"type": "null"},
            "either": {"type": ["integer", "string"]},
        },
    },
    "run": None,  # no schema: every parameter may be any type
}
CODER_OPTIONS = TextOptions(
    tool_calls=True, tool_call_format="qwen3_coder", tool_parameters=CODER_TOOLS
)
CODER_TAGS = (
    "<tool_call>",
    "</tool_call>",
    "<function=",
    "</function>",
    "<parameter=",
    "</parameter>",
)


def _parsed_or_text(text: str, fits: Any) -> Any:
    """The oracle for a value the schema lets be a non-string type: the JSON value its
    stripped text parses to if ``fits`` it, else the text itself."""
    try:
        value = json.loads(text.strip())
    except ValueError:
        return text
    return value if fits(value) else text


def _is_int(value: Any) -> bool:
    return type(value) is int


def _not_string(value: Any) -> bool:
    return not isinstance(value, str)


OBJECTS = st.dictionaries(
    st.sampled_from(["a", "b", "é"]), st.one_of(st.integers(-9, 99), PLAIN), max_size=3
)
CODER_VALUES: dict[str, st.SearchStrategy[tuple[str, Any]]] = {
    "path": PLAIN.map(lambda s: (s, s)),
    "count": st.one_of(
        st.integers(-(10**6), 10**6).map(lambda n: (str(n), n)),
        PLAIN.map(lambda s: (s, _parsed_or_text(s, _is_int))),  # may not fit: kept as text
    ),
    "ratio": st.floats(allow_nan=False, allow_infinity=False).map(lambda x: (json.dumps(x), x)),
    "force": st.booleans().map(lambda b: (json.dumps(b), b)),
    "meta": OBJECTS.map(lambda d: (json.dumps(d, ensure_ascii=False), d)),
    "lines": st.lists(st.integers(-5, 500), max_size=4).map(lambda v: (json.dumps(v), v)),
    "parent": st.just(("null", None)),
    "either": st.one_of(
        st.integers(0, 99).map(lambda n: (str(n), n)),
        PLAIN.map(lambda s: (s, _parsed_or_text(s, _is_int))),
    ),
    # Not in the schema: kept, and typed as whatever JSON it is.
    "extra": PLAIN.map(lambda s: (s, _parsed_or_text(s, _not_string))),
}

CoderCall = tuple[str, list[tuple[str, str, Any]]]
"""(name, [(parameter, raw text, expected value)])."""


@st.composite
def coder_calls(draw: st.DrawFn) -> CoderCall:
    name = draw(st.sampled_from(sorted(CODER_TOOLS)))
    keys = draw(st.lists(st.sampled_from(sorted(CODER_VALUES)), unique=True, max_size=5))
    parameters = []
    for key in keys:
        raw, expected = draw(CODER_VALUES[key])
        if name == "run":  # untyped tool: everything is typed as any JSON
            expected = _parsed_or_text(raw, _not_string)
        parameters.append((key, raw, expected))
    return name, parameters


def coder_text(call: CoderCall) -> str:
    name, parameters = call
    body = "".join(f"<parameter={key}>\n{raw}\n</parameter>\n" for key, raw, _ in parameters)
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


@st.composite
def coder_scripts(draw: st.DrawFn) -> tuple[str, str, str, list[CoderCall]]:
    """(whole text, thought, answer, calls) of an answer in the Coder format."""
    thought = draw(st.one_of(st.just(""), PLAIN)).strip()
    answer = draw(PLAIN).strip()
    calls = draw(st.lists(coder_calls(), min_size=1, max_size=2))
    text = f"<think>\n{thought}\n</think>\n\n" if thought else ""
    text += answer + "".join("\n" + coder_text(call) for call in calls)
    return text, thought, answer, calls


def _expected(calls: list[CoderCall]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, {key: value for key, _, value in parameters}) for name, parameters in calls]


@FAST
@given(script=coder_scripts(), cuts=CUTS, mode=st.sampled_from(["extract", "raw"]))
@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_007", "QWEN3_MOE_SEMANTICS_V1_008")
def test_any_split_parses_xml_calls_as_the_whole_text_does(
    script: tuple[str, str, str, list[CoderCall]], cuts: list[int], mode: Mode
) -> None:
    """Random calls with random typed values (and values that do not fit their type), cut
    into tokens at random byte boundaries: the deltas rebuild what the whole text parses to,
    the arguments are valid JSON of the schema's types, and no markup reaches content."""
    text, thought, answer, calls = script
    options = dataclasses.replace(CODER_OPTIONS, reasoning=mode)
    whole = run([text.encode()], options)
    parsed = run(split(text.encode(), cuts), options)
    assert (parsed.content, parsed.reasoning, parsed.calls) == (
        whole.content,
        whole.reasoning,
        whole.calls,
    )
    assert [(n, json.loads(a)) for n, a in parsed.calls] == _expected(calls)
    answer_text = parsed.content if mode == "extract" else parsed.content.split("</think>")[-1]
    assert answer_text.strip() == answer
    assert not any(tag in parsed.content for tag in CODER_TAGS)
    if mode == "extract":
        assert_clean(parsed)
        assert parsed.reasoning == thought


@settings(
    FAST,
    # The threshold fixture reads the contract, the same for every example.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    value=st.lists(WORDS, min_size=8, max_size=30).map("".join),
    cuts=st.lists(st.integers(1, 600), max_size=120),
)
@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_009")
def test_an_xml_string_value_is_never_held_back_beyond_a_closing_tag(
    value: str, cuts: list[int], contract_threshold: Any
) -> None:
    """After every token inside a string value, all of the value decoded so far has been
    sent except what could still be the newline and the ``</parameter>`` that end it."""
    limit = contract_threshold("QWEN3_MOE_SEMANTICS_V1_009", "max_held_chars")
    opening = "<tool_call>\n<function=edit>\n<parameter=path>\n"
    data = (opening + value + "\n</parameter>\n</function>\n</tool_call>").encode()
    pieces = split(data, cuts)
    pipeline = TextPipeline(dict(enumerate(pieces)).__getitem__, CODER_OPTIONS)
    sent, pushed = "", b""
    for token_id, piece in enumerate(pieces):
        pushed += piece
        sent += "".join(d.tool_call.arguments for d in pipeline.push(token_id) if d.tool_call)
        decoded = pushed.decode("utf-8", errors="ignore")
        if len(decoded) <= len(opening) or "</parameter>" in decoded:
            continue
        so_far = decoded[len(opening) :]
        streamed = json.loads(sent + '"}')["path"]
        assert so_far.startswith(streamed)
        assert len(so_far) - len(streamed) <= limit, (so_far, streamed)
    sent += "".join(d.tool_call.arguments for d in pipeline.finish() if d.tool_call)
    assert json.loads(sent) == {"path": value}


@FAST
@given(call=coder_calls(), cut=st.integers(0, 2000), cuts=CUTS)
@pytest.mark.falsifies("QWEN3_MOE_SEMANTICS_V1_007")
def test_an_xml_call_cut_anywhere_has_valid_json_arguments(
    call: CoderCall, cut: int, cuts: list[int]
) -> None:
    """A generation that ends inside a call (max_tokens) still gives a JSON object: the value
    and the object are closed; the parameters read so far are the script's, in order."""
    data = coder_text(call).encode()[:cut]
    parsed = run(split(data, cuts), CODER_OPTIONS)
    keys = [key for key, _, _ in call[1]]
    for name, arguments in parsed.calls:
        assert name == call[0]
        decoded = json.loads(arguments)
        assert isinstance(decoded, dict)
        assert list(decoded) == keys[: len(decoded)]
    assert "\ufffd" not in parsed.content


def test_xml_calls_split_at_every_byte_and_every_character() -> None:
    """The two extreme splits of a Coder answer: text, a typed call, a parallel call."""
    text = (
        "Sure: café 東京.\n<tool_call>\n<function=edit>\n<parameter=path>\nsrc/Zürich 😀.txt\n"
        '</parameter>\n<parameter=count>\n3\n</parameter>\n<parameter=meta>\n{"a": [1]}\n'
        "</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=run>\n"
        "</function>\n</tool_call>"
    )
    whole = run([text.encode()], CODER_OPTIONS)
    for pieces in ([bytes([b]) for b in text.encode()], [ch.encode() for ch in text]):
        parsed = run(pieces, CODER_OPTIONS)
        assert (parsed.content, parsed.calls) == (whole.content, whole.calls)
        assert_clean(parsed)
    assert whole.content == "Sure: café 東京.\n"
    assert whole.calls == [
        ("edit", '{"path": "src/Zürich 😀.txt", "count": 3, "meta": {"a": [1]}}'),
        ("run", "{}"),
    ]


def test_single_xml_call_finishes_the_pipeline_at_the_end_of_its_function() -> None:
    one = "<tool_call>\n<function=run>\n</function>\n</tool_call>"
    options = dataclasses.replace(CODER_OPTIONS, single_tool_call=True)
    parsed = run([ch.encode() for ch in f"{one}\n{one}"], options)
    assert parsed.finished
    assert parsed.calls == [("run", "{}")]


@pytest.mark.parametrize(
    ("schema", "types"),
    [
        ({"type": "string"}, {"string"}),
        ({"type": "number"}, {"number", "integer"}),
        ({"type": ["integer", "null"]}, {"integer", "null"}),
        ({"anyOf": [{"type": "boolean"}, {"type": "array"}]}, {"boolean", "array"}),
        ({"oneOf": [{"const": 1}, {"const": "x"}]}, {"integer", "string"}),
        ({"enum": ["C", "F"]}, {"string"}),
        ({"type": "integer", "enum": [1, 2]}, {"integer"}),
        ({"allOf": [{"type": ["integer", "string"]}, {"type": "integer"}]}, {"integer"}),
        ({"$ref": "#/$defs/n"}, {"integer"}),
        ({"$ref": "#/$defs/missing"}, set(JSON_TYPES)),
        ({"description": "anything"}, set(JSON_TYPES)),
        ({"type": "no-such-type"}, set()),
        (False, set()),
    ],
)
def test_schema_types(schema: Any, types: set[str]) -> None:
    root = {"$defs": {"n": {"type": "integer"}}}
    assert schema_types(schema, root) == types


def test_undeclared_parameters_take_additional_properties_or_any_type() -> None:
    typed = ParameterTypes(
        {"properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "integer"}}
    )
    assert (typed.of("a"), typed.of("b")) == (frozenset({"string"}), frozenset({"integer"}))
    assert ParameterTypes({"properties": {}}).of("b") == JSON_TYPES
    assert ParameterTypes(None).of("b") == JSON_TYPES


# -- on the real engine: the demo model's byte tokens -----------------------------------------


async def both(client: httpx.AsyncClient, **body: Any) -> tuple[dict[str, Any], sse.Stream]:
    body = {"messages": HELLO, "temperature": 0, **body}
    buffered = await client.post("/v1/chat/completions", json=body)
    assert buffered.status_code == 200, buffered.text
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        stream = await sse.aread(r.aiter_lines())
    return buffered.json(), stream


@pytest.mark.anyio
@pytest.mark.falsifies("QWEN3_MOE_TEXT_INTEGRITY_V1_001")
async def test_characters_split_over_byte_tokens_arrive_whole(client: httpx.AsyncClient) -> None:
    """The demo script's emoji and accented letter are split over byte tokens."""
    _, stream = await both(client)
    deltas = stream.deltas()
    assert all("\ufffd" not in d for d in deltas)
    emoji = next(ch for ch in SCRIPT if ord(ch) > 0xFFFF)
    assert emoji in deltas
    accented = next(ch for ch in SCRIPT if 0x80 <= ord(ch) <= 0x24F)
    assert any(accented in d for d in deltas)


def _cut_inside_the_emoji() -> list[int]:
    """max_tokens values that end the demo script after 1, 2 and 3 of the emoji's 4 bytes."""
    first = DEFAULT_SCRIPT.index(b"\xf0")
    return [first + 1, first + 2, first + 3]


@pytest.mark.anyio
@pytest.mark.parametrize("reasoning_format", ["none", "reasoning_content"])
@pytest.mark.falsifies("QWEN3_MOE_TEXT_INTEGRITY_V1_005")
async def test_max_tokens_inside_a_character_drops_it_streamed_and_buffered(
    demo_engine: Backend, reasoning_format: str
) -> None:
    """Regression: ending after the first byte tokens of the emoji made both the buffered
    content and the last streamed delta end in U+FFFD. The unfinished character is dropped;
    the space before it stays; stream and buffered agree."""
    app = create_app(settings_for(reasoning_format=reasoning_format), backend=demo_engine)
    expected = SCRIPT[: SCRIPT.index("😀")]
    if reasoning_format != "none":
        expected = expected.split("</think>")[1].lstrip("\n")
    assert expected.endswith(" ")
    async with asgi_client(app) as client:
        for max_tokens in _cut_inside_the_emoji():
            buffered, stream = await both(client, max_tokens=max_tokens)
            content = buffered["choices"][0]["message"]["content"]
            assert content == expected
            assert "".join(stream.deltas()) == content
            assert all("\ufffd" not in d for d in stream.deltas())
            assert buffered["choices"][0]["finish_reason"] == "length"


@pytest.mark.anyio
@pytest.mark.falsifies("QWEN3_MOE_TEXT_INTEGRITY_V1_002")
async def test_a_stop_string_across_tokens_is_never_sent(demo_engine: Backend) -> None:
    start = len(SCRIPT) // 2
    stop = SCRIPT[start : start + 7]  # spans several of the script's tokens
    async with asgi_client(create_app(settings_for(), backend=demo_engine)) as client:
        buffered, stream = await both(client, stop=[stop, "never-matches"])
    expected = SCRIPT[: SCRIPT.find(stop)]
    assert buffered["choices"][0]["message"]["content"] == expected
    assert "".join(stream.deltas()) == expected
    assert buffered["choices"][0]["finish_reason"] == "stop"
    assert stream.finish_reasons() == ["stop"]


@pytest.mark.anyio
@pytest.mark.falsifies("QWEN3_MOE_TEXT_INTEGRITY_V1_003")
async def test_text_held_for_a_stop_that_never_completes_is_released(
    client: httpx.AsyncClient,
) -> None:
    start = len(SCRIPT) // 2
    stop = SCRIPT[start : start + 7] + "\u2603"  # a prefix of the script, then a snowman
    buffered, stream = await both(client, stop=stop)
    assert "".join(stream.deltas()) == SCRIPT == buffered["choices"][0]["message"]["content"]
