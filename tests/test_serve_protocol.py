"""The server's layers that need no model: the OpenAI wire format, step plans and their
encoding, chat templates, and admission. (tests/test_serve.py drives the whole server.)"""

import json

import pytest

pytest.importorskip("fastapi")

from grok.demo import DEMO_TOKENIZER
from grok.engine.request import Completion, GenerationSettings
from grok.errors import GrokError
from grok.serve import protocol
from grok.serve.chat import ChatTemplate, TemplateError
from grok.serve.plan import NewRequest, StepPlan
from grok.serve.protocol import ApiError, Message
from grok.serve.worker import Admission
from grok.structured import JsonSchema
from grok.tokenizer import Tokenizer


def completion(**fields):
    return protocol.parse_completion({"model": "m", "prompt": "1+1=", **fields})


def test_defaults_are_openais():
    p = completion()
    s = p.sampling
    assert p.prompts == ("1+1=",) and p.logprobs is None
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.n) == (16, 1.0, 1.0, 0, 1)
    assert (s.seed, s.stop, s.stream, s.include_usage, s.ignore_eos) == \
        (None, (), False, False, False)


def test_nulls_mean_the_default():
    s = completion(max_tokens=None, temperature=None, stop=None, seed=None, n=None).sampling
    assert (s.max_tokens, s.temperature, s.stop, s.seed, s.n) == (16, 1.0, (), None, 1)


@pytest.mark.parametrize("prompt, want", [
    ("a", ("a",)),
    (["a", "b"], ("a", "b")),
    ([5, 6, 7], ((5, 6, 7),)),
    ([[5, 6], [7]], ((5, 6), (7,))),
])
def test_prompt_shapes(prompt, want):
    assert completion(prompt=prompt).prompts == want


def test_settings_carry_every_field_and_seeds_count_up():
    s = completion(max_tokens=5, temperature=0.5, top_p=0.9, top_k=3, seed=7, stop=["x", "y"],
                   ignore_eos=True, n=3).sampling
    assert [s.settings(j).seed for j in range(3)] == [7, 8, 9]
    assert s.settings(1) == GenerationSettings(max_new_tokens=5, temperature=0.5, top_p=0.9,
                                               top_k=3, seed=8, stop=("x", "y"),
                                               ignore_eos=True)
    assert completion(stop="x").sampling.stop == ("x",)
    assert completion(top_k=-1).sampling.top_k == 0  # vLLM's "off"


def test_without_a_seed_each_choice_draws_its_own():
    s = completion(n=2).sampling
    assert len({s.settings(0).seed, s.settings(1).seed, s.settings(0).seed}) == 3


@pytest.mark.parametrize("fields, param, message", [
    ({"prompt": ""}, "prompt", "must not be empty"),
    ({"prompt": []}, "prompt", "prompt must be"),
    ({"prompt": [1, "a"]}, "prompt", "prompt must be"),
    ({"prompt": [[1], []]}, "prompt", "prompt must be"),
    ({"prompt": [True]}, "prompt", "prompt must be"),
    ({"prompt": 5}, "prompt", "prompt must be"),
    ({"model": 3}, "model", "model is required"),
    ({"max_tokens": 0}, "max_tokens", r"max_tokens must be >= 1 \(0 only with echo or "
                                      r"prompt_logprobs\), got 0"),
    ({"max_tokens": -1}, "max_tokens", r"max_tokens must be >= 0, got -1"),
    ({"max_tokens": "8"}, "max_tokens", "max_tokens must be an integer"),
    ({"max_tokens": 8.0}, "max_tokens", "max_tokens must be an integer"),
    ({"temperature": "hot"}, "temperature", "temperature must be a number"),
    ({"temperature": True}, "temperature", "temperature must be a number"),
    ({"n": 0}, "n", "n must be >= 1"),
    ({"logprobs": 9}, "logprobs", r"logprobs must be in \[0, 8\], got 9"),
    ({"logprobs": True}, "logprobs", "logprobs must be an integer"),
    ({"stop": ["a", ""]}, "stop", "stop must be"),
    ({"stop": 3}, "stop", "stop must be"),
    ({"stream": "yes"}, "stream", "stream must be true or false"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed with"),
    ({"stream": True, "stream_options": []}, "stream_options", "must be an object"),
    ({"ignore_eos": 1}, "ignore_eos", "ignore_eos must be true or false"),
    ({"user": 5}, "user", "user must be a string"),
    ({"seed": 1.5}, "seed", "seed must be an integer"),
    ({"echo": 1}, "echo", "echo must be true or false"),
    ({"use_beam_search": True}, "use_beam_search",
     r"does not support use_beam_search \(only use_beam_search: false\)"),
    ({"suffix": "x"}, "suffix", "does not support suffix"),
    ({"best_of": 2}, "best_of", "does not support best_of"),
    ({"presence_penalty": "0.5"}, "presence_penalty", "presence_penalty must be a number"),
    ({"logit_bias": [[5, 1]]}, "logit_bias", "logit_bias must be an object"),
    ({"logit_bias": {"five": 1}}, "logit_bias", r"keys must be token ids \(strings of"),
    ({"logit_bias": {"-5": 1}}, "logit_bias", "keys must be token ids"),
    ({"logit_bias": {"5": None}}, "logit_bias", r"logit_bias\[5\] must be a number"),
    ({"min_tokens": -1}, "min_tokens", "min_tokens must be >= 0"),
    ({"stop_token_ids": [2, "3"]}, "stop_token_ids", "stop_token_ids must be a list"),
    ({"stop_token_ids": 2}, "stop_token_ids", "stop_token_ids must be a list"),
])
def test_bad_fields_name_themselves(fields, param, message):
    with pytest.raises(ApiError, match=message) as e:
        completion(**fields)
    assert e.value.status == 400 and e.value.param == param
    assert e.value.body()["error"]["param"] == param


@pytest.mark.parametrize("fields, message", [
    ({"temperature": -1}, "temperature must be a finite number >= 0"),
    ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
    ({"top_k": -2}, "top_k must be >= -1"),
    ({"seed": 2**63}, r"seed must be in \[-9223372036854775808, 9223372036854775807\]"),
    ({"presence_penalty": 2.5}, r"presence_penalty must be a number in \[-2, 2\]"),
    ({"frequency_penalty": -3}, r"frequency_penalty must be a number in \[-2, 2\]"),
    ({"repetition_penalty": 0}, "repetition_penalty must be a number > 0"),
    ({"min_tokens": 20, "max_tokens": 10}, r"min_tokens must be an integer in \[0, "
                                            r"max_new_tokens=10\]"),
])
def test_the_engines_own_range_checks_are_400s(fields, message):
    with pytest.raises(ApiError, match=message) as e:
        completion(**fields)
    assert e.value.status == 400
    assert e.value.param == next(iter(fields))


def test_chat_takes_the_steering_fields_too():
    s = chat(logit_bias={"4": -100}, repetition_penalty=1.1, min_tokens=1,
             stop_token_ids=[2]).sampling.settings(0)
    assert s.logit_bias == ((4, -100.0),) and s.repetition_penalty == 1.1
    assert s.min_tokens == 1 and s.stop_token_ids == (2,)
    with pytest.raises(ApiError, match="does not support echo"):
        chat(echo=True)


def test_steering_fields_reach_the_settings():
    s = completion(presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.2,
                   logit_bias={"7": 150, "3": -1.5}, min_tokens=2, stop_token_ids=[9],
                   max_tokens=4).sampling.settings(0)
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -1, 1.2)
    assert s.logit_bias == ((3, -1.5), (7, 100.0))  # clamped to [-100, 100]
    assert s.min_tokens == 2 and s.stop_token_ids == (9,)


def test_no_op_values_that_benchmark_tools_send_are_accepted():
    completion(best_of=1, repetition_penalty=1.0, logprobs=None, echo=False, suffix=None,
               presence_penalty=0, frequency_penalty=0.0, logit_bias={}, min_tokens=0,
               use_beam_search=False)


def test_unknown_fields_are_reported_not_refused():
    body = {"model": "m", "prompt": "1", "best_of": 1, "frobnicate": 1, "ignore_eos": True}
    protocol.parse_completion(body)
    assert protocol.unknown_fields(body, protocol.COMPLETION_FIELDS) == ["frobnicate"]


@pytest.mark.parametrize("body", [[], "x", None, 3])
def test_the_body_must_be_an_object(body):
    with pytest.raises(ApiError, match="must be a JSON object"):
        protocol.parse_completion(body)


def chat(**fields):
    return protocol.parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                **fields})


def test_chat_parsing():
    p = chat(max_completion_tokens=5, logprobs=True, top_logprobs=2)
    assert p.messages == (Message("user", "hi"),)
    assert (p.sampling.max_tokens, p.logprobs, p.top_logprobs) == (5, True, 2)
    parts = protocol.parse_chat({"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"},
                                     {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None}]})
    assert parts.messages == (Message("user", "ab"), Message("assistant", ""))


@pytest.mark.parametrize("fields, message", [
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": [{"content": "x"}]}, "string role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text parts"),
    ({"messages": [{"role": "user", "content": 5}]}, "must be a string or a list"),
    ({"top_logprobs": 2}, "top_logprobs needs logprobs"),
    ({"tools": [{"type": "function"}]}, "does not support tools"),
    ({"response_format": {"type": "xml"}}, "response_format: type must be"),
])
def test_bad_chat_requests(fields, message):
    with pytest.raises(ApiError, match=message) as e:
        chat(**fields)
    assert e.value.status == 400


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(DEMO_TOKENIZER)


def test_logprobs_entries_add_up_to_the_text(tokenizer):
    texts = protocol.TokenTexts(tokenizer, eos_id=2)
    ids = [*tokenizer.encode("579"), 2]
    top = [[(t, -0.5), (4, -1.0), (5, -2.0)] for t in ids]
    whole = protocol.CompletionLogprobs(texts, 2).entries(ids, [-0.1] * 4, top, last=True)
    assert whole["tokens"] == ["5", "7", "9", "</s>"]
    assert whole["text_offset"] == [0, 1, 2, 3]
    assert whole["top_logprobs"][0] == {"5": -0.5, "0": -1.0}
    # Token by token, as a stream builds them: the same entries.
    stream = protocol.CompletionLogprobs(texts, 2)
    parts = [stream.entries([t], [-0.1], [a], last=i == 3)
             for i, (t, a) in enumerate(zip(ids, top, strict=True))]
    assert {k: [x for p in parts for x in p[k]] for k in whole} == whole
    assert protocol.chat_logprobs(texts, ids[:1], [-0.1], top[:1], 1)["content"] == [
        {"token": "5", "logprob": -0.1, "bytes": [53],
         "top_logprobs": [{"token": "5", "logprob": -0.5, "bytes": [53]}]}]


def test_finish_reasons_in_openais_words():
    def done(reason):
        return Completion(None, [5], [6], [-0.1], [[]], "x", reason)
    assert [protocol.completion_choice(0, done(r), None)["finish_reason"]
            for r in ("eos", "stop", "length")] == ["stop", "stop", "length"]


def test_server_sent_events():
    assert protocol.sse({"a": "é"}) == 'data: {"a": "é"}\n\n'.encode()
    assert protocol.DONE == b"data: [DONE]\n\n"
    assert json.loads(protocol.sse({"b": 1})[6:]) == {"b": 1}


def test_plans_survive_their_encoding():
    settings = GenerationSettings(max_new_tokens=3, temperature=0.5, top_p=0.9, top_k=2,
                                  seed=-5, stop=("a", "é"), ignore_eos=True,
                                  allowed_tokens=(1, 2), presence_penalty=0.5,
                                  frequency_penalty=-1.0, repetition_penalty=1.2,
                                  logit_bias={7: -3.5, 2: 100}, min_tokens=2,
                                  stop_token_ids=(9, 4), prompt_logprobs=True)
    shaped = GenerationSettings(structure=JsonSchema({"type": "object", "properties": {
        "b": {"type": "string"}, "a": {"type": "integer"}}}))
    plan = StepPlan((NewRequest(3, (5, 6), settings), NewRequest(4, (7,),
                                                                 GenerationSettings()),
                     NewRequest(5, (8,), shaped)), cancels=(1, 2), stop=True)
    assert StepPlan.decode(plan.encode()) == plan
    assert StepPlan.decode(StepPlan().encode()) == StepPlan()
    assert plan.submits[0].request(None).prompt_ids == (5, 6)
    compiled = []
    request = plan.submits[2].request(lambda spec: compiled.append(spec) or "grammar")
    assert compiled == [shaped.structure] and request.grammar == "grammar"


def test_chat_template_renders_as_hugging_faces():
    template = ChatTemplate(
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system') }}"
        "{% endif %}<{{ m.role }}>{{ m.content }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}", eos_token="</s>")
    assert template.render([Message("user", "a"), Message("assistant", "b")]) == \
        "<user>a</s>\n<assistant>b</s>\n<assistant>"
    with pytest.raises(TemplateError, match="no system"):
        template.render([Message("system", "x")])
    with pytest.raises(GrokError, match="chat template"):
        ChatTemplate("{% for %}")


def test_chat_template_files(tmp_path):
    (tmp_path / "t.jinja").write_text("{{ messages[0].content }}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "[{{ "
                                                                "messages[0].content }}]"}))
    (tmp_path / "bad.json").write_text("{}")
    one = [Message("user", "x")]
    assert ChatTemplate.from_file(tmp_path / "t.jinja").render(one) == "x"
    assert ChatTemplate.from_file(tmp_path / "tokenizer_config.json").render(one) == "[x]"
    with pytest.raises(GrokError, match="chat_template"):
        ChatTemplate.from_file(tmp_path / "bad.json")
    with pytest.raises(GrokError, match="No such file"):
        ChatTemplate.from_file(tmp_path / "missing.jinja")
    # The sandbox: a template cannot reach Python's internals.
    with pytest.raises(TemplateError):
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render(one)


def test_admission_is_bounded_and_exact():
    a = Admission(3)
    assert a.try_take(2) and not a.try_take(2) and a.try_take(1) and not a.try_take(1)
    a.give_back(2)
    assert a.in_flight == 1 and a.try_take(2)
