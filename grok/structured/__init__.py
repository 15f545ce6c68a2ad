"""Structured output: a request's text constrained to a JSON schema, any JSON object, a
regular expression, one of several strings, or an EBNF grammar (xgrammar, the optional
`structured` extra)."""

from grok.structured.spec import Choice, Ebnf, JsonObject, JsonSchema, Regex, Structure

__all__ = ["Choice", "Ebnf", "JsonObject", "JsonSchema", "Regex", "Structure"]
