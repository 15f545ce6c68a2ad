"""Scoring and steering over HTTP, on the demo model, with the `openai` client and httpx:
`echo` with `logprobs` as lm_eval's `local-completions` sends it (token-id prompts,
max_tokens 1) and as a scorer sends it (max_tokens 0), vLLM's `prompt_logprobs`, and the
sampling controls, each checked against the library (`Grok.score`, `Grok.generate`).

Log-probabilities are compared within 1/4: the server's prefill attends through its cache in
other shapes than `Grok.score`'s forward pass (see test_scoring.py).
"""

import json
import re

import pytest

pytest.importorskip("fastapi")

import openai
from test_serve import running_server

from grok import demo

MODEL = "grok-1-demo"
SLOTS, MAX_LEN = 4, 64
TOL = 1 / 4


@pytest.fixture(scope="module")
def model():
    return demo.load()


@pytest.fixture(scope="module")
def url(model):
    with running_server(model, lambda: model.engine(SLOTS, MAX_LEN, prefill_chunk=16),
                        MODEL, MAX_LEN, SLOTS) as url:
        yield url


def complete(http, **body) -> dict:
    r = http.post("/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


PAIRS = [("12+34=", "46"), ("12+34=", "47"), ("305+28=", "333"), ("7+5=", "21")]


def test_lm_eval_s_loglikelihood_request(model, http):
    """Token ids of context + continuation, echo, max_tokens 1, logprobs 1: the sum of
    token_logprobs[len(context):-1] and lm_eval's greedy rule (each token's logprob equals
    the best alternative's) give what `Grok.score` gives."""
    tok = model.tokenizer
    contexts = [tok.encode(c) for c, _ in PAIRS]
    wholes = [tok.encode(c + x) for c, x in PAIRS]
    out = complete(http, prompt=wholes, max_tokens=1, temperature=0, logprobs=1, echo=True,
                   seed=1234)
    want = model.score([c for c, _ in PAIRS], [x for _, x in PAIRS])
    choices = sorted(out["choices"], key=lambda c: c["index"])
    assert len(choices) == len(PAIRS)
    for context, whole, choice, score in zip(contexts, wholes, choices, want, strict=True):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(whole) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        continuation = lp["token_logprobs"][len(context):-1]
        assert sum(continuation) == pytest.approx(score.total, abs=TOL * len(continuation))
        tops = lp["top_logprobs"][len(context):-1]
        greedy = all(x == max(top.values()) for x, top in zip(continuation, tops, strict=True))
        assert greedy == score.greedy
        assert choice["text"].startswith(tok.decode(whole))
    assert [s.greedy for s in want] == [True, False, True, False]


def test_echo_with_max_tokens_0_scores_the_prompt_only(model, http):
    prompt = "305+28=333"
    out = complete(http, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    (choice,) = out["choices"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    ids = model.tokenizer.encode(prompt)
    assert lp["tokens"] == [model.tokenizer.piece(t) for t in ids]
    assert lp["text_offset"] == list(range(len(prompt)))  # one character per demo token
    assert all(len(top) == 2 for top in lp["top_logprobs"][1:])
    (score,) = model.score([ids[:1]], [ids[1:]])
    assert lp["token_logprobs"][1:] == pytest.approx(score.logprobs, abs=TOL)
    assert out["usage"]["prompt_tokens"] == len(ids)
    assert out["usage"]["completion_tokens"] == 0


def test_streamed_echo_adds_up_to_the_response(http):
    body = dict(prompt="12+34=", max_tokens=4, temperature=0, echo=True, logprobs=1)
    whole = complete(http, **body)["choices"][0]
    with http.stream("POST", "/v1/completions",
                     json={"model": MODEL, "stream": True, **body}) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]
    choices = [c["choices"][0] for c in chunks]
    assert choices[0]["text"].startswith("12+34=")
    assert "".join(c["text"] for c in choices) == whole["text"] == "12+34=46"
    tokens = [t for c in choices for t in c["logprobs"]["tokens"]]
    offsets = [t for c in choices for t in c["logprobs"]["text_offset"]]
    assert tokens == whole["logprobs"]["tokens"]
    assert offsets == whole["logprobs"]["text_offset"]


def test_vllm_prompt_logprobs(model, http):
    out = complete(http, prompt="12+34=", max_tokens=1, temperature=0, prompt_logprobs=3)
    (choice,) = out["choices"]
    ids = model.tokenizer.encode("12+34=")
    entries = choice["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    (score,) = model.score([ids[:1]], [ids[1:]])
    for token, entry, want in zip(ids[1:], entries[1:], score.logprobs, strict=True):
        assert entry[str(token)]["logprob"] == pytest.approx(want, abs=TOL)
        assert entry[str(token)]["decoded_token"] == model.tokenizer.piece(token)
        # The top 3 and the token itself (ranked 4th or lower when not among them).
        ranks = sorted(e["rank"] for e in entry.values())
        assert ranks[:3] == [1, 2, 3] and (len(ranks) == 3 or ranks[3] > 3)
    assert choice["text"] == "46"[:1]  # no echo: the completion alone


def test_logit_bias_min_tokens_and_penalties_reach_the_engine(model, client):
    plain = client.completions.create(model=MODEL, prompt="12+34=", max_tokens=4,
                                      temperature=0)
    assert plain.choices[0].text == "46"
    four = model.tokenizer.encode("4")[0]
    barred = client.completions.create(model=MODEL, prompt="12+34=", max_tokens=4,
                                       temperature=0, logit_bias={str(four): -100})
    want = model.generate("12+34=", logit_bias={four: -100}, max_new_tokens=4)
    assert barred.choices[0].text == want.text != "46"
    longer = client.completions.create(model=MODEL, prompt="12+34=", max_tokens=6,
                                       temperature=0, extra_body={"min_tokens": 5})
    assert longer.usage.completion_tokens >= 5
    assert longer.choices[0].text.startswith("46")
    chat_like = client.completions.create(
        model=MODEL, prompt="12+34=", max_tokens=4, temperature=0, presence_penalty=1.5,
        frequency_penalty=0.5, extra_body={"repetition_penalty": 1.3})
    want = model.generate("12+34=", presence_penalty=1.5, frequency_penalty=0.5,
                          repetition_penalty=1.3, max_new_tokens=4)
    assert chat_like.choices[0].text == want.text


@pytest.mark.parametrize("body, param, message", [
    ({"logit_bias": {"16": 5}}, "prompt", r"logit_bias: token id 16 is out of range"),
    ({"logit_bias": {"x": 5}}, "logit_bias", "keys must be token ids"),
    ({"presence_penalty": 3}, "presence_penalty", r"in \[-2, 2\]"),
    ({"stop_token_ids": [99]}, "prompt", "stop_token_ids: token id 99 is out of range"),
    ({"max_tokens": 0}, "max_tokens", r"0 only with echo or prompt_logprobs"),
    ({"prompt_logprobs": 9}, "prompt_logprobs", r"in \[0, 8\]"),
])
def test_bad_values_are_400s_and_the_server_keeps_serving(client, body, param, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="1+1=", max_tokens=2,
                                  extra_body=body)
    error = e.value.body
    assert e.value.status_code == 400 and error["param"] == param
    assert re.search(message, error["message"])
    ok = client.completions.create(model=MODEL, prompt="1+1=", max_tokens=2, temperature=0)
    assert ok.choices[0].text == "2"
