"""A structural check of JSON schemas (tool ``parameters``, ``response_format`` schemas).

OpenAI answers 400 to a tool whose ``parameters`` is not a JSON schema, whatever ``tool_choice``
says; before this check the server only noticed when it compiled a grammar (forced tools, JSON
output), and with ``tool_choice: auto`` a broken schema went into the prompt unchecked.

:func:`check_schema` checks that every keyword the JSON Schema vocabulary defines (drafts 4 to
2020-12) has a value of the right kind, recursively through the subschemas, without recursion
of its own. Unknown keywords pass (JSON Schema ignores them), and so do the values of annotation
keywords (``title``, ``default``, ``examples``...). Whether a grammar can be built from the schema
is a separate question, answered by :mod:`.grammar` when one is needed.
"""

from __future__ import annotations

import numbers
from typing import Any

from .protocol import APIError

TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
_SCHEMA = ("additionalProperties", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames",
           "unevaluatedProperties", "unevaluatedItems", "contentSchema")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties", "minContains",
           "maxContains")
_NUMBERS = ("minimum", "maximum", "multipleOf")
_STRINGS = ("pattern", "format", "$ref", "$id", "$schema", "$anchor", "contentEncoding", "contentMediaType")


def _number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _problem(schema: dict) -> str | None:
    """What is wrong with the keywords of one schema object (subschemas aside), or None."""
    t = schema.get("type")
    if t is not None:
        kinds = t if isinstance(t, list) else [t]
        if not kinds or any(not isinstance(k, str) or k not in TYPES for k in kinds):
            return f"type must be one of {', '.join(sorted(TYPES))} (or a list of them), got {t!r}"
    for key in _COUNTS:
        v = schema.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            return f"{key} must be a non-negative integer, got {v!r}"
    for key in _NUMBERS:
        v = schema.get(key)
        if v is not None and not _number(v):
            return f"{key} must be a number, got {v!r}"
    if "multipleOf" in schema and not schema["multipleOf"] > 0:
        return f"multipleOf must be > 0, got {schema['multipleOf']!r}"
    for key in ("exclusiveMinimum", "exclusiveMaximum"):        # a number, or a boolean in draft 4
        v = schema.get(key)
        if v is not None and not (_number(v) or isinstance(v, bool)):
            return f"{key} must be a number, got {v!r}"
    for key in _STRINGS:
        v = schema.get(key)
        if v is not None and not isinstance(v, str):
            return f"{key} must be a string, got {v!r}"
    req = schema.get("required")
    if req is not None and not (isinstance(req, list) and all(isinstance(r, str) for r in req)):
        return f"required must be a list of property names, got {req!r}"
    enum = schema.get("enum")
    if enum is not None and not (isinstance(enum, list) and enum):
        return f"enum must be a non-empty list, got {enum!r}"
    for key in _SCHEMA_MAPS:
        v = schema.get(key)
        if v is not None and not isinstance(v, dict):
            return f"{key} must be an object of schemas, got {type(v).__name__}"
    for key in _SCHEMA_LISTS:
        v = schema.get(key)
        if v is not None and not (isinstance(v, list) and v):
            return f"{key} must be a non-empty list of schemas"
    items = schema.get("items")
    if items is not None and not isinstance(items, (dict, bool, list)):
        return f"items must be a schema, got {type(items).__name__}"
    return None


def _subschemas(schema: dict):
    """(path suffix, subschema) for every place a schema may hold one."""
    for key in _SCHEMA:
        if key in schema:
            yield key, schema[key]
    for key in _SCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items():
            yield f"{key}.{name}", sub
    for key in _SCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or []):
            yield f"{key}[{i}]", sub
    items = schema.get("items")
    if isinstance(items, list):                  # draft 4-7 tuple form
        for i, sub in enumerate(items):
            yield f"items[{i}]", sub
    elif items is not None:
        yield "items", items
    deps = schema.get("dependencies")            # draft 4-7: a schema or a list of names per property
    if isinstance(deps, dict):
        for name, sub in deps.items():
            if not isinstance(sub, list):
                yield f"dependencies.{name}", sub


def check_schema(schema: Any, where: str, param: str) -> None:
    """Raise a 400 naming the first keyword of ``schema`` (or a subschema) with a wrong kind of value."""
    stack = [(schema, where)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, bool):               # true / false are schemas too
            continue
        if not isinstance(node, dict):
            raise APIError(400, f"{path} must be a JSON schema object, got {type(node).__name__}", param=param)
        why = _problem(node)
        if why:
            raise APIError(400, f"{path} is not a valid JSON schema: {why}", param=param)
        stack.extend((sub, f"{path}.{suffix}") for suffix, sub in _subschemas(node))
