"""Scripts for the scripted demo model (``write_demo_model``): each is the model's exact greedy
output, one token per piece, so a test derives every expectation from the script it chose.

Every piece of a script is one token and must be unique within it, so a second tool call
spells its tags with ordinary tokens: the parser works on text, like the model's.
"""

from __future__ import annotations

from app.demo import DEFAULT_SCRIPT

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
    },
}

ANSWER = b"".join(DEFAULT_SCRIPT[DEFAULT_SCRIPT.index(b"</think>") + 2 : -1]).decode()
THOUGHT = b"".join(DEFAULT_SCRIPT[1 : DEFAULT_SCRIPT.index(b"</think>")]).decode().strip()

NO_THINK_SCRIPT = (
    b"<think>",
    b"\n\n",
    b"</think>",
    b"\n\nSure",
    b",",
    b" here",
    b".",
    b"<|im_end|>",
)
ANSWER_ONLY_SCRIPT = (b"Just", b" the", b" answer", b".", b"<|im_end|>")
THINKING_ONLY_SCRIPT = (
    b"<think>", b"\nHmm", b",", b" nothing", b" to", b" add", b".\n", b"</think>", b"<|im_end|>",
)  # fmt: skip
SINGLE_CALL_SCRIPT = (
    b"<think>", b"\nThe", b" user", b" asks", b" weather", b".\n", b"</think>", b"\n\n",
    b"<tool_call>", b'\n{"name": "get_weather"', b', "arguments": ', b'{"city', b'": "', b"Par",
    b"is", b'", "unit"', b': "C"}', b"}\n", b"</tool_call>", b"<|im_end|>",
)  # fmt: skip
PARALLEL_CALL_SCRIPT = (
    b"<tool_call>", b'\n{"name": "get_weather", ', b'"arguments": {"city": ', b'"Oslo"}', b"}\n",
    b"</tool_call>", b"\n<tool_", b"call>", b'\n{"name": "get_time", ', b'"arguments": {"tz"',
    b': "CET"}}', b"\n</tool_call", b">", b"<|im_end|>",
)  # fmt: skip
MALFORMED_CALL_SCRIPT = (
    b"<tool_call>", b"\nnot", b" json", b" at", b" all\n", b"</tool_call>", b"<|im_end|>",
)  # fmt: skip
JSON_SCRIPT = (b'{"answer"', b": 42", b', "unit": ', b'"cm"', b"}", b"<|im_end|>")
RAW_NEWLINE_JSON_SCRIPT = (b'{"note": "one', b"\ntwo", b'"}', b"<|im_end|>")
"""JSON whose string holds a raw newline, which JSON does not allow (it must be written \\n)."""
