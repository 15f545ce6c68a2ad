"""What shape a request's output must take: one small frozen dataclass per mode.

Specs are plain, hashable values (a schema is held as its JSON text), so that they key the
compiled-grammar cache, travel in a multi-process step plan, and are checked here, before
anything is compiled: a schema keyword the grammar engine would silently ignore is refused
by `grok.structured.schema`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

from grok.errors import GrokError
from grok.structured.schema import check_schema

# Texts longer than this are refused before compiling: a grammar is a description, not data.
MAX_SPEC_CHARS = 256 * 1024
MAX_CHOICES = 1024


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise GrokError(f"{name} must be a non-empty string, got {json.dumps(value)[:80]}")
    if len(value) > MAX_SPEC_CHARS:
        raise GrokError(f"{name} has {len(value)} characters, more than {MAX_SPEC_CHARS}")
    return value


@dataclasses.dataclass(frozen=True)
class JsonSchema:
    """JSON that validates against `schema` (a dict or its JSON text), as OpenAI's
    `response_format: json_schema`. Properties come in the schema's order."""

    schema: str
    kind: ClassVar[str] = "json_schema"

    def __post_init__(self):
        value = self.schema
        if isinstance(value, str):
            try:
                value = json.loads(_text("json_schema", value))
            except ValueError as e:
                raise GrokError(f"json_schema is not valid JSON: {e}") from None
        if not isinstance(value, (dict, bool)):
            raise GrokError(f"json_schema must be a JSON object, got {json.dumps(value)[:80]}")
        check_schema(value)
        object.__setattr__(self, "schema", _text("json_schema", json.dumps(
            value, separators=(",", ":"), ensure_ascii=False)))


@dataclasses.dataclass(frozen=True)
class JsonObject:
    """Any JSON object, as OpenAI's `response_format: json_object`."""

    kind: ClassVar[str] = "json_object"


@dataclasses.dataclass(frozen=True)
class Regex:
    """Text that matches the regular expression as a whole."""

    pattern: str
    kind: ClassVar[str] = "regex"

    def __post_init__(self):
        _text("regex", self.pattern)


@dataclasses.dataclass(frozen=True)
class Choice:
    """Exactly one of the given strings."""

    options: tuple[str, ...]
    kind: ClassVar[str] = "choice"

    def __post_init__(self):
        options = self.options
        if isinstance(options, str) or not isinstance(options, (list, tuple)) or not options \
                or len(options) > MAX_CHOICES:
            raise GrokError(f"choice must be a list of 1 to {MAX_CHOICES} strings, got "
                            f"{json.dumps(options, default=str)[:80]}")
        for option in options:
            _text("each choice", option)
        if sum(len(o) for o in options) > MAX_SPEC_CHARS:
            raise GrokError(f"choice holds more than {MAX_SPEC_CHARS} characters")
        object.__setattr__(self, "options", tuple(options))


@dataclasses.dataclass(frozen=True)
class Ebnf:
    """Text of a grammar in xgrammar's EBNF (GBNF-like), whose start rule is `root`."""

    grammar: str
    kind: ClassVar[str] = "grammar"

    def __post_init__(self):
        _text("grammar", self.grammar)


Structure = JsonSchema | JsonObject | Regex | Choice | Ebnf
KINDS: dict[str, type] = {cls.kind: cls for cls in (JsonSchema, JsonObject, Regex, Choice,
                                                     Ebnf)}


def to_json(spec: Structure) -> dict:
    """A spec as a JSON-able dict (for a step plan): {"kind": ..., its fields...}."""
    return {"kind": spec.kind, **{f.name: getattr(spec, f.name)
                                  for f in dataclasses.fields(spec)}}


def from_json(raw: dict) -> Structure:
    raw = dict(raw)
    kind = raw.pop("kind", None)
    if kind not in KINDS:
        raise GrokError(f"structure kind must be one of {sorted(KINDS)}, got {kind!r:.40}")
    return KINDS[kind](**raw)


def check_structure(value: Any) -> Structure | None:
    """`value` if it is a spec (or None); a clear error otherwise."""
    if value is None or isinstance(value, (JsonSchema, JsonObject, Regex, Choice, Ebnf)):
        return value
    raise GrokError(f"structure must be one of JsonSchema, JsonObject, Regex, Choice or Ebnf "
                    f"(grok.structured), got {type(value).__name__}")
