"""GBNF grammars for constrained decoding: JSON output and Qwen3 / Qwen3-Coder tool calls.

GBNF is llama.cpp's grammar language, so this module belongs to the engine layer: it
uses llama-cpp-python's JSON-schema converter (a port of llama.cpp's own) instead of a
hand-written one. The service calls it while preparing a request, so a schema the converter
cannot honour is a 400 before any stream starts.

llama.cpp's converter silently ignores JSON-schema keywords it does not implement; a request
relying on one would get output that ignores it. Those keywords are refused here instead.
Whatever else the converter cannot take (it is plain Python over client data: a ``$ref`` that
is not a string, ``properties`` that are not an object, a pattern it cannot read) it fails on
with whatever exception its code meets; every one of them is a ``GrammarError`` that says
where in the request the schema is, not the converter's own words, which are logged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp
from llama_cpp.llama_grammar import BuiltinRule, SchemaConverter

from app.engine.protocol import GrammarError
from app.text.schema_types import schema_types

logger = logging.getLogger(__name__)

_UNSUPPORTED_KEYWORDS = frozenset(
    {
        "not",
        "if",
        "then",
        "else",
        "patternProperties",
        "propertyNames",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "uniqueItems",
        "multipleOf",
        "contains",
        "minContains",
        "maxContains",
        "unevaluatedProperties",
        "unevaluatedItems",
        "exclusiveMinimum",
        "exclusiveMaximum",
    }
)

# A thinking block before the constrained part, for models that think first. It may not
# contain "</" except in its closing tag, a small price for a grammar that stays simple.
_THINK_RULE = 'think ::= "<think>" ( [^<] | "<" [^/] )* "</think>" [ \\n]*'


# A Qwen3-Coder parameter value that may be a string is free text: anything without "</" (so
# it cannot run into </parameter>), newlines included. Simple and valid; it also covers the
# text of every other type a union with string allows.
_CODER_TEXT_RULE = 'coder-text ::= ( [^<] | "<" [^/] )*'
# A tool whose schema declares no properties may still take parameters: any name, free text.
_CODER_ANY_PARAMETER_RULE = (
    'coder-any-parameter ::= "<parameter=" [a-zA-Z0-9_.-]+ ">\\n" coder-text "\\n</parameter>\\n"'
)


@dataclass(frozen=True)
class ToolSpec:
    name: str
    parameters: Mapping[str, Any] | None


def check_grammar(vocab: Any, grammar: str) -> None:
    """Parse ``grammar`` with llama.cpp's own grammar parser, the one sampling will use.

    The converter can write grammars that llama.cpp refuses (an empty ``enum`` becomes an
    empty rule, a ``maxLength`` above llama.cpp's repetition limit, a property name with a
    quote or a newline), and llama.cpp answers those with a NULL sampler, which sampling would
    dereference and kill the process. So every grammar is parsed here first, while the request
    is prepared: what llama.cpp cannot take is a 400, decided by llama.cpp itself rather than by
    a list of known-bad schemas.
    """
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not sampler:  # a NULL ctypes pointer is falsy, never None
        raise GrammarError("llama.cpp's grammar parser refuses the grammar built from it")
    llama_cpp.llama_sampler_free(sampler)


def _check_schema(schema: Any, path: str) -> None:
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            _check_schema(item, f"{path}[{i}]")
        return
    if not isinstance(schema, dict):
        return
    for key, value in schema.items():
        if key in _UNSUPPORTED_KEYWORDS:
            raise GrammarError(f"The JSON schema keyword '{key}' at {path} is not supported")
        if key == "$ref" and not isinstance(value, str):
            raise GrammarError(f"The $ref at {path} is not a string")
        if key == "$ref" and not value.startswith("#"):
            raise GrammarError(
                f"Only local $ref ('#/...') is supported, got '{value[:80]}' at {path}"
            )
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            for name, sub in value.items():
                _check_schema(sub, f"{path}.{key}.{name}")
        elif isinstance(value, dict | list):
            _check_schema(value, f"{path}.{key}")


_HEX = " ".join(["[0-9a-fA-F]"] * 4)
JSON_STRING_CHAR = rf'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" {_HEX})'
"""One character of a JSON string, as llama.cpp's own converter (``json-schema-to-grammar``)
writes it: control characters only escaped. llama-cpp-python's port has ``[^"\\]``, which
lets a model put a raw newline or tab inside a string: output that is not JSON."""


class _Converter(SchemaConverter):
    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        if name == "char":
            rule = BuiltinRule(JSON_STRING_CHAR, [])
        return str(super()._add_primitive(name, rule))


def _converter() -> SchemaConverter:
    return _Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def _visit(converter: SchemaConverter, schema: Mapping[str, Any], name: str, where: str) -> str:
    _check_schema(schema, where)
    try:
        resolved = converter.resolve_refs(json.loads(json.dumps(schema)), where)
        rule: str = converter.visit(resolved, name)
    except Exception as exc:
        raise _unconvertible(where, exc) from exc
    return rule


def _unconvertible(where: str, exc: Exception) -> GrammarError:
    """The converter failed on the schema at ``where``: say so, keep its words for the log."""
    logger.info("the schema converter failed on %s: %s", where, repr(exc)[:300])
    return GrammarError(
        f"The JSON schema at {where} is not one llama.cpp's schema converter can turn into a "
        "grammar (a keyword with a value of the wrong type, an unresolvable $ref, or a pattern "
        "it cannot read)"
    )


def json_grammar(schema: Mapping[str, Any] | None, *, allow_thinking: bool) -> str:
    """Output that is one JSON value matching ``schema`` (``None``: any JSON object)."""
    converter = _converter()
    value = _visit(
        converter, schema or {"type": "object"}, "value", "response_format.json_schema.schema"
    )
    prefix = "think? " if allow_thinking else ""
    rules = [converter.format_grammar(), f"root ::= {prefix}{value}"]
    if allow_thinking:
        rules.append(_THINK_RULE)
    return "\n".join(rules)


def tool_call_grammar(tools: Sequence[ToolSpec], *, parallel: bool, allow_thinking: bool) -> str:
    """Output that is one (or, with ``parallel``, several) Qwen3 ``<tool_call>`` blocks."""
    converter = _converter()
    alternatives = []
    for i, tool in enumerate(tools):
        schema = tool.parameters or {"type": "object"}
        args = _visit(converter, schema, f"tool{i}-args", f"tools.{i}.function.parameters")
        head = json.dumps(f'<tool_call>\n{{"name": {json.dumps(tool.name)}, "arguments": ')
        alternatives.append(f'{head} {args} "}}\\n</tool_call>"')
    rules = [converter.format_grammar(), "call ::= " + " | ".join(alternatives)]
    return _calls_root(rules, parallel=parallel, allow_thinking=allow_thinking)


def _calls_root(rules: list[str], *, parallel: bool, allow_thinking: bool) -> str:
    """The grammar of ``rules`` whose root is one call (or several, with ``parallel``),
    after an optional thinking block."""
    calls = 'call ( "\\n" call )*' if parallel else "call"
    prefix = "think? " if allow_thinking else ""
    rules = [*rules, f"root ::= {prefix}{calls}"]
    if allow_thinking:
        rules.append(_THINK_RULE)
    return "\n".join(rules)


def coder_tool_call_grammar(
    tools: Sequence[ToolSpec], *, parallel: bool, allow_thinking: bool
) -> str:
    """Output that is one (or, with ``parallel``, several) Qwen3-Coder XML ``<tool_call>``
    blocks: ``<function=NAME>``, then the schema's parameters in its order (the required ones
    always, the others optionally), each typed: free text where a string fits (a string
    ``enum`` or ``const``: one of its values), a JSON value of the schema where it does not."""
    converter = _converter()
    functions: list[str] = []
    parameter_rules: list[str] = []
    for i, tool in enumerate(tools):
        where = f"tools.{i}.function.parameters"
        schema = dict(tool.parameters or {"type": "object"})
        _check_schema(schema, where)
        try:
            parameters = _coder_parameters(converter, schema, i, where, parameter_rules)
        except GrammarError:
            raise
        except Exception as exc:
            raise _unconvertible(where, exc) from exc
        head = json.dumps(f"<function={tool.name}>\n")
        functions.append(f'{head} {" ".join(parameters)} "</function>\\n"')
    rules = [
        converter.format_grammar(),
        *parameter_rules,
        'call ::= "<tool_call>\\n" ( ' + " | ".join(functions) + ' ) "</tool_call>"',
        _CODER_TEXT_RULE,
        _CODER_ANY_PARAMETER_RULE,
    ]
    return _calls_root(rules, parallel=parallel, allow_thinking=allow_thinking)


def _coder_parameters(
    converter: SchemaConverter, schema: dict[str, Any], i: int, where: str, rules: list[str]
) -> list[str]:
    """The parameter sequence of tool ``i``'s call; each parameter's rule goes into ``rules``."""
    resolved = converter.resolve_refs(json.loads(json.dumps(schema)), where)
    properties = schema.get("properties")
    listed = schema.get("required")
    required = set(listed) if isinstance(listed, list) else set()
    if not (isinstance(properties, dict) and properties):
        return ["coder-any-parameter*"]
    parameters = []
    for j, (name, sub) in enumerate(properties.items()):
        rule = f"tool{i}-param{j}"
        value = _coder_value(converter, sub, resolved["properties"][name], schema, rule)
        open_tag = json.dumps(f"<parameter={name}>\n")
        rules.append(f'{rule} ::= {open_tag} {value} "\\n</parameter>\\n"')
        parameters.append(rule if name in required else f"{rule}?")
    return parameters


def _coder_value(
    converter: SchemaConverter, schema: Any, resolved: Any, root: Any, name: str
) -> str:
    """The grammar of one parameter's raw value (see ``coder_tool_call_grammar``)."""
    types = schema_types(schema, root)
    if "string" not in types and types:
        try:
            rule: str = converter.visit(resolved, f"{name}-json")
        except Exception as exc:
            raise _unconvertible(f"parameter {name}", exc) from exc
        return rule
    if isinstance(schema, dict) and types == {"string"}:
        choices = schema.get("enum", [schema["const"]] if "const" in schema else None)
        if isinstance(choices, list) and choices:
            return "( " + " | ".join(json.dumps(c) for c in choices) + " )"
    return "coder-text"
