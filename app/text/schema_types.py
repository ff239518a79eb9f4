"""The JSON types a tool parameter may take, read from the tool's JSON schema.

Qwen3-Coder writes every parameter value as raw text (``<parameter=n>\\n12\\n</parameter>``), so
whether ``12`` is the integer 12 or the string "12" is for the tool's schema to say. This
module answers one question per parameter: which JSON types may its value be? Both the
Coder tool-call parser (``app.text.coder_tool_calls``: how to type a value) and the grammar
for forced Coder calls (``app.engine.grammar``: free text or a JSON value) ask it, so the two
cannot disagree.

Schemas are read the JSON-Schema way, leniently: ``type`` (a name or a list), ``enum`` and
``const`` (the types of their values), ``anyOf``/``oneOf`` (the union of the branches),
``allOf`` (the intersection) and local ``$ref`` s. A schema that says nothing about the type
(``{}``, a description only, a parameter the schema does not declare) admits every type. The
alternative rejected: typing only by ``type`` as a single name, as some servers do, which
turns ``["integer", "null"]`` or ``anyOf`` unions into strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

JSON_TYPES = frozenset({"string", "null", "boolean", "integer", "number", "object", "array"})
_MAX_DEPTH = 32


def json_type(value: Any) -> str:
    """The JSON type name of a decoded JSON value (``bool`` before ``int``: True is not 1)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def schema_types(schema: Any, root: Any = None, *, _depth: int = 0) -> frozenset[str]:
    """The JSON types ``schema`` admits; ``root`` is the document its local ``$ref`` s point
    into (default: ``schema`` itself). An empty set: no value fits."""
    if root is None:
        root = schema
    if schema is False:
        return frozenset()
    if not isinstance(schema, Mapping) or _depth > _MAX_DEPTH:
        return JSON_TYPES
    found = JSON_TYPES
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = _resolve(root, ref)
        if target is not None:
            found &= schema_types(target, root, _depth=_depth + 1)
    declared = schema.get("type")
    if isinstance(declared, str):
        found &= _named({declared})
    elif isinstance(declared, list):
        found &= _named({t for t in declared if isinstance(t, str)})
    if "const" in schema:
        found &= frozenset({json_type(schema["const"])})
    enum = schema.get("enum")
    if isinstance(enum, list):
        found &= frozenset(json_type(v) for v in enum)
    for union in ("anyOf", "oneOf"):
        branches = schema.get(union)
        if isinstance(branches, list) and branches:
            found &= frozenset().union(
                *(schema_types(b, root, _depth=_depth + 1) for b in branches)
            )
    every = schema.get("allOf")
    if isinstance(every, list):
        for branch in every:
            found &= schema_types(branch, root, _depth=_depth + 1)
    return found


def _named(names: set[str]) -> frozenset[str]:
    # "number" admits integers; an unknown type name admits nothing we could produce.
    known = names & JSON_TYPES
    return frozenset(known | {"integer"}) if "number" in known else frozenset(known)


def _resolve(root: Any, ref: str) -> Any:
    """A local JSON pointer (``#/$defs/Name``) into ``root``; None when it does not resolve."""
    if not ref.startswith("#"):
        return None
    node = root
    for part in ref[1:].split("/")[1:]:
        key = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return None
    return node


class ParameterTypes:
    """The types of each parameter of one tool, from its ``parameters`` schema."""

    def __init__(self, parameters: Mapping[str, Any] | None) -> None:
        self._root = parameters
        properties = parameters.get("properties") if parameters is not None else None
        self._properties: Mapping[str, Any] = properties if isinstance(properties, Mapping) else {}
        extra = parameters.get("additionalProperties") if parameters is not None else None
        # A parameter the schema does not declare is kept; additionalProperties types it.
        self._undeclared = (
            schema_types(extra, parameters) if isinstance(extra, Mapping) else JSON_TYPES
        )

    def of(self, name: str) -> frozenset[str]:
        if name in self._properties:
            return schema_types(self._properties[name], self._root)
        return self._undeclared
