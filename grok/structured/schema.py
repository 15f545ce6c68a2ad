"""JSON-schema keywords the grammar engine would drop without a word, refused up front.

xgrammar (0.2.9) compiles most of JSON Schema into a grammar but ignores some keywords
silently: a schema with `uniqueItems` compiles, and `[1, 1]` is then allowed. A user who
asked for a constraint must get it or be told, so each keyword below was checked against
xgrammar (compile, then feed a violating value) and is refused here with its location.
Annotations (title, description, default, ...) and unknown keywords are left alone, as
JSON Schema itself ignores them.
"""

from __future__ import annotations

from typing import Any

from grok.errors import GrokError

MAX_DEPTH = 64  # nesting of subschemas; a deeper schema is refused before compiling

# Keywords xgrammar ignores, each with why it cannot be honoured.
_IGNORED = {
    "not": "negation", "if": "conditionals", "then": "conditionals", "else": "conditionals",
    "dependentRequired": "dependencies", "dependentSchemas": "dependencies",
    "dependencies": "dependencies", "contains": "contains", "minContains": "contains",
    "maxContains": "contains", "$anchor": "anchors", "$dynamicRef": "dynamic references",
    "$dynamicAnchor": "dynamic references", "$recursiveRef": "recursive references",
    "$recursiveAnchor": "recursive references",
}
# string formats xgrammar enforces; any other is accepted by it as a plain string
FORMATS = frozenset({
    "date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uri",
    "uri-reference", "uri-template", "uuid", "json-pointer", "relative-json-pointer"})
# Keywords that say nothing about validity: fine anywhere.
_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$comment", "deprecated", "readOnly",
    "writeOnly", "$schema", "$id", "$defs", "definitions", "discriminator"})
# Keywords whose siblings xgrammar ignores (other than annotations).
_EXCLUSIVE = ("$ref", "anyOf", "oneOf", "allOf")
_SUBSCHEMA = ("additionalProperties", "propertyNames", "items", "unevaluatedProperties",
              "unevaluatedItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")


def _refuse(at: str, what: str) -> GrokError:
    return GrokError(f"json_schema: {what} at {at or '/'} is not supported: the grammar engine "
                     f"would not enforce it")


def check_schema(schema: Any) -> None:
    """Raises GrokError naming the first keyword (and its JSON pointer) that structured
    output would not enforce."""
    stack = [(schema, "", 0)]
    while stack:
        node, at, depth = stack.pop()
        if isinstance(node, bool):
            continue
        if not isinstance(node, dict):
            raise GrokError(f"json_schema: the subschema at {at or '/'} must be an object or "
                            f"a boolean, got {type(node).__name__}")
        if depth > MAX_DEPTH:
            raise GrokError(f"json_schema: nested deeper than {MAX_DEPTH} levels at {at}")
        _check_node(node, at)
        for key in _SUBSCHEMA:
            if isinstance(node.get(key), (dict, bool)):
                stack.append((node[key], f"{at}/{key}", depth + 1))
        for key in _SUBSCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                stack += [(sub, f"{at}/{key}/{name}", depth + 1)
                          for name, sub in node[key].items()]
        for key in _SUBSCHEMA_LISTS:
            if isinstance(node.get(key), list):
                stack += [(sub, f"{at}/{key}/{i}", depth + 1)
                          for i, sub in enumerate(node[key])]


def _check_node(node: dict, at: str) -> None:
    for key, why in _IGNORED.items():
        if key in node:
            raise _refuse(at, f"{key!r} ({why})")
    if node.get("uniqueItems") is True:
        raise _refuse(at, "'uniqueItems'")
    ref = node.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
        raise _refuse(at, f"the $ref {str(ref)[:60]!r} (only references within the schema, "
                          f"'#...')")
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
        raise _refuse(at, "'allOf' with more than one subschema")
    if "oneOf" in node and "discriminator" not in node:
        raise _refuse(at, "'oneOf' (a value matching several branches is allowed; use "
                          "anyOf, or a discriminated union)")
    exclusive = [k for k in _EXCLUSIVE if k in node]
    if exclusive:
        others = sorted(k for k in node if k not in _ANNOTATIONS and k not in _EXCLUSIVE)
        if others or len(exclusive) > 1:
            extra = others[0] if others else exclusive[1]
            raise _refuse(at, f"{extra!r} beside {exclusive[0]!r}")
    types = node.get("type")
    types = set(types) if isinstance(types, list) else {types}
    if "multipleOf" in node and "integer" not in types:
        raise _refuse(at, "'multipleOf' on a number that is not an integer")
    lengths = [k for k in ("minLength", "maxLength") if k in node]
    fmt = node.get("format")
    if fmt is not None and (types == {None} or "string" in types):
        if fmt not in FORMATS:
            raise _refuse(at, f"the string format {str(fmt)[:40]!r} (known: "
                              f"{', '.join(sorted(FORMATS))})")
        if lengths or "pattern" in node:
            raise _refuse(at, f"{(lengths or ['pattern'])[0]!r} beside 'format'")
    if "pattern" in node and lengths:
        raise _refuse(at, f"{lengths[0]!r} beside 'pattern'")
