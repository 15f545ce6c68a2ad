"""Structured output: specs and the schema keywords refused, packed masks on the device,
the grammar compiler (errors, time limit, cache), the matcher's handling of SentencePiece's
leading space, and generation on the upstream-tiny fixture (a random model whose free
output is noise) with the release's tokenizer.

Generated JSON is validated with Pydantic against the model class the schema came from;
regexes with `re.fullmatch`. A row beside a constrained one must draw exactly the tokens
it draws beside a free one (same shapes, so the same arithmetic: equality, no tolerance).
"""

import dataclasses
import datetime
import json
import re
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOKENIZER
from test_generate import P0, PA

from grok import Grok
from grok.engine.request import GenerationSettings
from grok.engine.scheduler import Scheduler
from grok.errors import GrokError
from grok.sampling import SamplingParams, sample, unpack_token_mask
from grok.structured import Choice, Ebnf, JsonObject, JsonSchema, Regex
from grok.structured.spec import from_json, to_json

pydantic = pytest.importorskip("pydantic")


class Item(pydantic.BaseModel):
    name: str = pydantic.Field(pattern=r"^[a-z]{1,6}$")
    title: str = pydantic.Field(max_length=8)
    ok: bool
    count: int = pydantic.Field(ge=0, le=99)
    kind: Literal["a", "b"]
    note: Literal["x"] | None = None


ITEM = JsonSchema(Item.model_json_schema())


# --- specs ------------------------------------------------------------------------------


@pytest.mark.parametrize("schema, message", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
     "'uniqueItems' at / is not supported"),
    ({"type": "object", "properties": {"a": {"not": {"type": "null"}}}},
     "'not' .* at /properties/a"),
    ({"type": "integer", "if": {"minimum": 0}, "then": {"maximum": 5}}, "'if'"),
    ({"allOf": [{"type": "integer"}, {"maximum": 5}]}, "'allOf' with more than one"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "'oneOf'"),
    ({"$ref": "http://example.com/s.json"}, "only references within the schema"),
    ({"$defs": {"i": {"type": "integer"}}, "$ref": "#/$defs/i", "maximum": 3},
     "'maximum' beside '\\$ref'"),
    ({"type": "number", "multipleOf": 0.5}, "'multipleOf' on a number"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "'maxLength' beside 'pattern'"),
    ({"type": "string", "format": "email", "minLength": 3}, "'minLength' beside 'format'"),
    ({"type": "string", "format": "zip-code"}, "the string format 'zip-code'"),
    ({"type": "array", "contains": {"const": 1}}, "'contains'"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "'dependentRequired'"),
    ({"type": "object", "properties": {"a": 5}}, "subschema at /properties/a must be"),
    ([1, 2], "must be a JSON object"),
    ("{nope", "not valid JSON"),
])
def test_schema_features_xgrammar_would_drop_are_refused(schema, message):
    with pytest.raises(GrokError, match=message) as e:
        JsonSchema(schema)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


class Address(pydantic.BaseModel):
    street: str
    zip: str = pydantic.Field(pattern=r"^[0-9]{5}$")


class Cat(pydantic.BaseModel):
    pet: Literal["cat"]
    lives: int


class Dog(pydantic.BaseModel):
    pet: Literal["dog"]


class Person(pydantic.BaseModel):
    """Nested models, optional fields, lists, enums and a discriminated union: what
    Pydantic emits for everyday models must pass the check."""

    name: str = pydantic.Field(description="full name", max_length=20)
    address: Address
    tags: list[str] = pydantic.Field(default_factory=list, max_length=3)
    born: datetime.date | None = None
    pet: Cat | Dog = pydantic.Field(discriminator="pet")


def test_pydantic_schemas_pass_and_specs_round_trip():
    spec = JsonSchema(Person.model_json_schema())
    assert JsonSchema(json.loads(spec.schema)) == spec  # canonical text: one cache key
    assert list(json.loads(spec.schema)["properties"]) == list(Person.model_fields)
    for s in (spec, JsonObject(), Regex("[0-9]+"), Choice(["a", "b"]), Ebnf('root ::= "x"')):
        assert from_json(json.loads(json.dumps(to_json(s)))) == s
    for bad, message in ((lambda: Choice([]), "choice must be a list"),
                         (lambda: Choice(["a", ""]), "each choice must be a non-empty"),
                         (lambda: Regex(""), "regex must be a non-empty string"),
                         (lambda: Ebnf(5), "grammar must be a non-empty string")):
        with pytest.raises(GrokError, match=message):
            bad()


# --- the device side -----------------------------------------------------------------------


def test_unpack_token_mask_is_xgrammars_layout():
    rng = np.random.default_rng(0)
    vocab = 100  # not a multiple of 32: the last word is partly padding
    words = rng.integers(-(2**31), 2**31, (3, 4), dtype=np.int64).astype(np.int32)
    want = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    got = jax.jit(unpack_token_mask, static_argnums=1)(words, vocab)
    np.testing.assert_array_equal(np.asarray(got), want.astype(bool))


def test_sampling_under_a_mask_draws_only_allowed_tokens():
    rng = np.random.default_rng(1)
    rows, vocab = 64, 70
    allowed = rng.random((rows, vocab)) < 0.1
    allowed[:, 5] = True
    words = np.packbits(np.pad(allowed, ((0, 0), (0, 26))), axis=1,
                        bitorder="little").view(np.int32)
    logits = jnp.asarray(rng.normal(0, 3, (rows, vocab)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), rows)
    for temperature in (0.0, 1.0):
        params = SamplingParams(jnp.full(rows, temperature), jnp.ones(rows),
                                jnp.zeros(rows, jnp.int32))
        drawn = sample(logits, keys, params, unpack_token_mask(jnp.asarray(words), vocab))
        assert allowed[np.arange(rows), np.asarray(drawn.tokens)].all()


# --- compiling (needs xgrammar and the release's tokenizer) -----------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("xgrammar")
    if not TOKENIZER.is_file():
        pytest.skip(f"tokenizer not found at {TOKENIZER}")
    from grok.tokenizer import Tokenizer

    return Tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    from grok.structured.compiler import GrammarCompiler

    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size, timeout_s=3.0)
    yield compiler
    compiler.close()


def allowed_ids(mask: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")).tolist())


def test_compile_errors_are_one_bounded_line_and_cached(compiler):
    with pytest.raises(GrokError, match=r"^regex: regex does not compile: Regex parsing error"
                       ) as e:
        compiler.compile(Regex("(ab"))
    assert "\n" not in str(e.value) and "/project/" not in str(e.value)
    assert compiler.submit(Regex("(ab")).exception() is not None  # the failure is kept
    with pytest.raises(GrokError, match="grammar does not compile"):
        compiler.compile(Ebnf("root ::= undefined_rule"))
    first = compiler.submit(Choice(["yes", "no"]))
    assert compiler.submit(Choice(("yes", "no"))) is first  # one compile per spec


def test_a_compile_past_the_time_limit_is_killed_and_the_next_one_works(compiler):
    with pytest.raises(GrokError, match="took longer than 3 s: simplify it"):
        compiler.compile(Regex(".{0,300}x.{0,300}"))
    grammar = compiler.compile(Regex("[0-9]{2}"))
    assert grammar.matcher().mask.any()


def test_leading_space_forms_make_the_decoded_text_match(compiler, tokenizer):
    """SentencePiece drops a generation's first "▁": the text `{"a": 1}` may begin with
    the piece "▁{" or "{"; the byte piece <0x20> keeps its space, so it may begin the
    output only where the spec allows a leading space."""
    spec = JsonSchema({"type": "object", "properties": {"a": {"type": "integer"}},
                       "required": ["a"]})
    pieces = tokenizer.raw_pieces()
    first = {pieces[i] for i in allowed_ids(compiler.compile(spec).matcher().mask)}
    assert {"▁{", "{"} <= first and "<0x20>" not in first
    for text in ('{"a": 12}', ' {"a": 12}'):  # as SentencePiece encodes each
        matcher, ids = compiler.compile(spec).matcher(), tokenizer.encode(text)
        accepted = [matcher.accept(t) for t in ids]
        assert all(accepted) == (tokenizer.decode(ids) == '{"a": 12}'), (text, accepted)
        if all(accepted):
            assert matcher.finished
    spaced = compiler.compile(Regex(" x"))  # the text must begin with a space
    space_byte, word_x = pieces.index("<0x20>"), pieces.index("x")
    spaces, space_x = pieces.index("▁▁"), pieces.index("▁x")
    for ids in ([space_byte, word_x], [spaces, word_x], [pieces.index("▁")] * 2 + [word_x],
                [space_x], [word_x], [spaces, space_x]):
        matcher = spaced.matcher()
        ok = all(matcher.accept(t) for t in ids) and matcher.finished
        assert ok == (tokenizer.decode(ids) == " x"), ids


def test_json_never_holds_a_control_character(compiler, tokenizer):
    """xgrammar 0.2.9 lets control characters into strings with a maxLength; JSON without
    free whitespace holds none anywhere, so their tokens are barred."""
    pieces = tokenizer.raw_pieces()
    matcher = compiler.compile(JsonSchema({"type": "string", "maxLength": 8})).matcher()
    assert matcher.accept(pieces.index("<0x22>"))
    allowed = allowed_ids(matcher.mask)
    assert pieces.index("a") in allowed and pieces.index("<0x41>") in allowed
    for control in ("<0x02>", "<0x1F>", "\t", "\n"):
        assert pieces.index(control) not in allowed, control
    text = compiler.compile(Regex("a[\\t]b")).matcher()  # other specs may hold them
    assert text.accept(pieces.index("a")) and pieces.index("\t") in allowed_ids(text.mask)


# --- generation on the tiny fixture ------------------------------------------------------------


@pytest.fixture(scope="module")
def grok(fixture_dir, tokenizer):
    return Grok.load(fixture_dir, fixture_dir / "config.json", tokenizer_path=TOKENIZER,
                     mesh_shape=(1, 1))


def test_a_json_schema_gives_valid_json_for_every_seed(grok):
    seeds = list(range(20))
    out = grok.generate([P0] * len(seeds), max_new_tokens=100, temperature=1.0, seed=seeds,
                        structure=ITEM)
    for c in out:
        assert c.finish_reason == "stop", c.text
        Item.model_validate_json(c.text)
        assert grok.config.eos_token not in c.output_ids  # ended by the grammar, not EOS
    assert len({c.text for c in out}) > 10  # sampled, not one fixed answer
    free = grok.generate(P0, max_new_tokens=20, temperature=1.0, seed=0)
    with pytest.raises(ValueError):
        json.loads(free.text)  # the model alone writes noise


def finish(engine, requests):
    scheduler = Scheduler(engine, shrink_rows=False)
    ids = [scheduler.submit(r) for r in requests]
    done = {}
    while scheduler.has_work:
        done |= {e.request_id: e.completion for e in scheduler.step() if e.finished}
    return [done[i] for i in ids]


def test_free_rows_draw_the_same_beside_constrained_ones(grok):
    """The free row has the longer prompt, so it alone sets the attended length whether
    its neighbour ends early or not: both runs have the same shapes at every step."""
    engine = grok.engine(2, 32)
    settings = GenerationSettings(max_new_tokens=12, temperature=1.0, seed=7)
    free = engine.make_request(PA, settings)
    plain = engine.make_request(P0, dataclasses.replace(settings, seed=3))
    shaped = engine.make_request(P0, dataclasses.replace(settings, seed=3,
                                                         structure=JsonObject()))
    beside_plain, beside_shaped = finish(engine, [free, plain]), finish(engine, [free, shaped])
    assert beside_shaped[0].output_ids == beside_plain[0].output_ids
    assert beside_shaped[1].output_ids != beside_plain[1].output_ids
    assert beside_shaped[1].text.startswith("{")


@pytest.mark.parametrize("spec, check", [
    (Choice(["yes", "no", "maybe not"]), lambda t: t in ("yes", "no", "maybe not")),
    (Regex(r"[0-9]{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
    (Ebnf('root ::= "(" [0-9]+ ("," [0-9]+)* ")"'),
     lambda t: re.fullmatch(r"\([0-9]+(,[0-9]+)*\)", t)),
])
def test_choices_regexes_and_grammars(grok, spec, check):
    out = grok.generate([P0] * 4, max_new_tokens=24, temperature=1.0, seed=[0, 1, 2, 3],
                        structure=spec)
    for c in out:
        if c.finish_reason == "stop":
            assert check(c.text), c.text
        else:  # the grammar allows ever more digits; the prefix still fits
            assert c.finish_reason == "length" and isinstance(spec, Ebnf), c
    greedy = grok.generate(P0, max_new_tokens=24, temperature=0, structure=spec)
    assert greedy.finish_reason != "stop" or check(greedy.text)


def test_settings_that_cannot_combine_are_refused(grok):
    with pytest.raises(GrokError, match="allowed_tokens and structure cannot be combined"):
        grok.generate(P0, allowed_tokens=[5, 6], structure=JsonObject())
    with pytest.raises(GrokError, match="structure must be one of JsonSchema"):
        grok.generate(P0, structure={"type": "object"})
