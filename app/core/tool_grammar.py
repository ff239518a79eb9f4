"""The grammar a chat request's output must follow: a forced tool call in the model's own
format, or JSON (any object, or one matching a schema). Held to ``--max-grammar-bytes`` and
parsed by the engine itself, so an impossible schema is a 400 before anything is generated."""

from __future__ import annotations

from collections.abc import Callable

from app.core.limits import Limits
from app.core.requests import ChatRequest
from app.engine import GrammarError
from app.engine.grammar import ToolSpec, coder_tool_call_grammar, json_grammar, tool_call_grammar
from app.errors import InvalidRequest
from app.text import ToolCallFormat


def chat_grammar(
    req: ChatRequest,
    *,
    allow_thinking: bool,
    check: Callable[[str], None],
    tool_call_format: ToolCallFormat = "qwen3",
    limits: Limits | None = None,
) -> str | None:
    """None when the output is free."""
    param = "tools" if req.forced_tools else "response_format"
    try:
        if req.forced_tools:
            specs = [ToolSpec(t.name, t.parameters) for t in req.offered_tools]
            build = (
                coder_tool_call_grammar if tool_call_format == "qwen3_coder" else tool_call_grammar
            )
            grammar = build(
                specs,
                parallel=req.parallel_tool_calls is not False,
                allow_thinking=allow_thinking,
            )
        elif req.json_output is not None:
            grammar = json_grammar(req.json_output.schema, allow_thinking=allow_thinking)
        else:
            return None
    except GrammarError as exc:
        raise InvalidRequest(str(exc), param=param, code="unsupported_schema") from exc
    (limits or Limits()).check_grammar(grammar, param=param)
    try:
        check(grammar)
    except GrammarError as exc:
        what = "tools' parameter schemas" if req.forced_tools else "JSON schema in response_format"
        raise InvalidRequest(
            f"The {what} cannot be used for constrained decoding: {exc}. Typical causes: an "
            "empty enum or anyOf, a very large maxLength or maxItems, a property name with a "
            "quote in it.",
            param=param,
            code="unsupported_schema",
        ) from exc
    return grammar
