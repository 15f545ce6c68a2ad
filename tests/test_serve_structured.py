"""Structured output over HTTP: the `openai` client's structured outputs
(`chat.completions.parse` with a Pydantic model, `response_format` on completions), vLLM's
`structured_outputs`, streaming, and the 400s for what cannot be honoured, on the
upstream-tiny fixture (a random model: its free output is noise) with the release's
tokenizer, and on the demo model, whose digits-only vocabulary writes JSON numbers.
"""

import json
import random
import re

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("xgrammar")

import openai
from conftest import TOKENIZER
from test_generate import P0
from test_serve import running_server
from test_structured import Item

from grok import Grok, demo
from grok.serve.chat import ChatTemplate

MODEL = "tiny"
SLOTS, MAX_LEN = 4, 128
PROMPT = "The answer is"  # its tokens fit the fixture's 4096-token vocabulary
# 1000 choices of 200 characters: an automaton of 200,000 states.
SLOW = ["".join(random.Random(i).choice("abcdefghij ") for _ in range(200))
        for i in range(1000)]


@pytest.fixture(scope="module")
def model(fixture_dir):
    if not TOKENIZER.is_file():
        pytest.skip(f"tokenizer not found at {TOKENIZER}")
    grok = Grok.load(fixture_dir, fixture_dir / "config.json", tokenizer_path=TOKENIZER,
                     mesh_shape=(1, 1))
    # So that the time-limit test is quick: the test's other structures compile in under
    # 0.1 s, SLOW in about 2.6 s on a 2-core machine.
    grok.grammars.timeout_s = 1.0
    yield grok
    grok.grammars.close()


@pytest.fixture(scope="module")
def url(model):
    template = ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}")
    with running_server(model, lambda: model.engine(SLOTS, MAX_LEN), MODEL, MAX_LEN, SLOTS,
                        chat_template=template) as url:
        yield url


def item_format() -> dict:
    return {"type": "json_schema",
            "json_schema": {"name": "Item", "schema": Item.model_json_schema(), "strict": True}}


def test_openai_parse_with_a_pydantic_model(client):
    for seed in range(3):
        completion = client.chat.completions.parse(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}], response_format=Item,
            max_tokens=100, temperature=1.0, seed=seed)
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Item), choice.message.content


def test_response_format_on_completions_and_streamed_chat(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=100, seed=1,
                                    temperature=1.0, n=2, extra_body={"response_format":
                                                                      item_format()})
    for choice in out.choices:
        Item.model_validate_json(choice.text)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=100, seed=2,
        temperature=1.0, stream=True, response_format=item_format())
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    Item.model_validate_json(text)


# (structured_outputs, a check of a finished text, a check of a text cut at max_tokens
# where the grammar allows outputs of any length)
@pytest.mark.parametrize("outputs, check, unbounded", [
    ({"choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue"), None),
    ({"regex": "[A-Z][a-z]{1,5} [0-9]{2}"},
     lambda t: re.fullmatch("[A-Z][a-z]{1,5} [0-9]{2}", t), None),
    ({"grammar": 'root ::= "<" ("a" | "b")+ ">"'}, lambda t: re.fullmatch("<[ab]+>", t),
     lambda t: re.fullmatch("<[ab]+", t)),
    ({"json": {"type": "object", "properties": {"ok": {"type": "boolean"}},
               "required": ["ok"]}}, lambda t: isinstance(json.loads(t)["ok"], bool), None),
    ({"json_object": True, "disable_any_whitespace": True},
     lambda t: isinstance(json.loads(t), dict), lambda t: t.startswith("{")),
])
def test_vllm_structured_outputs(http, outputs, check, unbounded):
    r = http.post("/v1/completions", json={
        "model": MODEL, "prompt": P0, "max_tokens": 40, "temperature": 1.0, "seed": 5,
        "structured_outputs": outputs})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if unbounded is not None and choice["finish_reason"] == "length":
        assert unbounded(choice["text"]), choice
    else:
        assert choice["finish_reason"] == "stop" and check(choice["text"]), choice


@pytest.mark.parametrize("fields, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format", "'uniqueItems' at /"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format", "with a schema"),
    ({"response_format": {"type": "structural_tag"}}, "response_format", "type must be"),
    ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs",
     "regex does not compile: Regex parsing error"),
    ({"structured_outputs": {"regex": "(ab"}, "response_format": None}, "structured_outputs",
     "regex does not compile"),  # a null field names nothing
    ({"structured_outputs": {"grammar": "root ::= nothing"}}, "structured_outputs",
     "grammar does not compile"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs",
     "exactly one of"),
    ({"structured_outputs": {"choice": "ab"}}, "structured_outputs", "list of strings"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs",
     "'structural_tag' is not supported"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
     "structured_outputs", "not both"),
    ({"structured_outputs": {"choice": SLOW}}, "structured_outputs", "took longer than 1 s"),
])
def test_bad_structures_are_400s_and_the_server_keeps_serving(http, fields, param, message):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": P0, "max_tokens": 4,
                                           **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and re.search(message, error["message"]), error
    assert "\n" not in error["message"] and len(error["message"]) < 400
    ok = http.post("/v1/completions", json={"model": MODEL, "prompt": P0, "max_tokens": 4,
                                            "structured_outputs": {"choice": ["a", "b"]}})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] in ("a", "b")


# --- the demo model: a tokenizer of digits, "+" and "=" ------------------------------------


@pytest.fixture(scope="module")
def demo_client():
    grok = demo.load()
    with running_server(grok, lambda: grok.engine(2, 32), "demo", 32, 2) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0,
                            timeout=120)
    grok.grammars.close()


def test_the_demo_model_answers_sums_as_json_numbers(demo_client):
    schema = {"type": "json_schema",
              "json_schema": {"name": "sum", "schema": {"type": "integer", "minimum": 0}}}
    for a, b in ((12, 34), (305, 28)):
        out = demo_client.completions.create(model="demo", prompt=f"{a}+{b}=", max_tokens=8,
                                             temperature=0,
                                             extra_body={"response_format": schema})
        assert json.loads(out.choices[0].text) == a + b
    with pytest.raises(openai.BadRequestError, match="no token of the model's vocabulary"):
        demo_client.completions.create(model="demo", prompt="1+2=", max_tokens=8,
                                       extra_body={"response_format": {"type": "json_object"}})
