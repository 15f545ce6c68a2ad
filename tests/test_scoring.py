"""Scoring given text: `Grok.score` and `Grok.score_rolling` (lm_eval's loglikelihood and
loglikelihood_rolling), and prompt log-probabilities from the engine's prefill, on the demo
model (always here: vocab 16, context 64).

Reference numbers are the float64 log-softmax of `Grok.logits` over the same tokens. The
scoring program pads to other shapes than `Grok.logits` does, and the model's logits are
bf16, rounded to 8 significant bits: a shape that rounds one logit the other way moves a
log-probability by up to a bf16 step of the largest logits (0.25 where the demo's reach 46
after a BOS it never saw in training; measured 0.09). Tolerance: 1/16 plus 1/128 of the
value; a wrong position or an off-by-one is off by whole units.
"""

import numpy as np
import pytest
from conftest import TOKENIZER

from grok import demo
from grok.engine.request import GenerationSettings
from grok.engine.scheduler import Scheduler
from grok.errors import GrokError
from grok.scoring import encode_pair, rolling_windows
from grok.tokenizer import Tokenizer

TOL = 1 / 16


def assert_close(got, want):
    np.testing.assert_allclose(got, want, rtol=1 / 128, atol=TOL)


@pytest.fixture(scope="module")
def model():
    return demo.load()


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference(model, context, continuation):
    """Each continuation token's log-probability from one full forward pass."""
    whole = list(context) + list(continuation)
    lp = log_softmax(model.logits([whole[:-1]])[0])
    n = len(context)
    return [lp[n - 1 + i, t] for i, t in enumerate(continuation)], \
        [int(np.argmax(lp[n - 1 + i])) == t for i, t in enumerate(continuation)]


def test_scores_equal_the_logits(model):
    tok = model.tokenizer
    pairs = [("12+34=", "46"), ("12+34=", "47"), ("7+5=", "12"), ("1", "23+4=27")]
    ids = [encode_pair(tok, c, x) for c, x in pairs]
    scores = model.score([c for c, _ in pairs], [x for _, x in pairs])
    for (context, continuation), score in zip(ids, scores, strict=True):
        want, best = reference(model, context, continuation)
        assert score.tokens == continuation
        assert_close(score.logprobs, want)
        assert score.total == pytest.approx(sum(want), abs=TOL * len(want))
        assert score.greedy == all(best)
    assert scores[0].greedy and not scores[1].greedy  # the demo knows 12+34
    assert scores[0].total > scores[1].total
    # Token ids give the same numbers as text.
    again = model.score([c for c, _ in ids], [x for _, x in ids])
    assert [s.logprobs for s in again] == [s.logprobs for s in scores]


@pytest.mark.slow
def test_scores_on_a_mesh_equal_one_device_s(model):
    """Rows split over `data` (the batch padded to it), heads over `model`."""
    spread = demo.load(mesh_shape=(2, 4))
    contexts, continuations = ["12+34=", "7+5=", "1"], ["46", "21", "23+4=27"]
    for one, many in zip(model.score(contexts, continuations),
                         spread.score(contexts, continuations), strict=True):
        assert many.tokens == one.tokens and many.greedy == one.greedy
        assert_close(many.logprobs, one.logprobs)


def test_greedy_continuations_are_flagged_greedy(model):
    prompts = ["305+28=", "9+9=", "123+456="]
    answers = [c.text for c in model.generate(prompts)]
    scores = model.score(prompts, answers)
    assert all(s.greedy for s in scores)


def test_the_context_s_trailing_space_moves_to_the_continuation():
    if not TOKENIZER.is_file():
        pytest.skip(f"tokenizer not found at {TOKENIZER}")
    tok = Tokenizer(TOKENIZER)
    context, continuation = encode_pair(tok, "The answer is ", "forty-two")
    assert context == tok.encode("The answer is")
    assert context + continuation == tok.encode("The answer is forty-two")
    assert tok.decode(continuation) == " forty-two" or tok.piece(continuation[0])[0] == " "


def test_rolling_scores_every_token_in_windows_of_the_context(model):
    window = model.config.sequence_len
    text = "+".join(f"{a}+{a}={2 * a}" for a in range(40))  # ~260 tokens: five windows
    ids = model.tokenizer.encode(text)
    assert len(ids) > 3 * window
    (score,) = model.score_rolling([text])
    assert score.tokens == ids and len(score.logprobs) == len(ids)
    bos = model.tokenizer.bos_id
    # The first window given BOS; the third given the one token before it (lm_eval's
    # windows are disjoint, each with a context of one token).
    first, _ = reference(model, [bos], ids[:window])
    assert_close(score.logprobs[:window], first)
    at = 2 * window
    third, _ = reference(model, ids[at - 1:at], ids[at:at + window])
    assert_close(score.logprobs[at:at + window], third)
    windows = rolling_windows(ids, bos, window)
    assert [len(x) for _, x in windows[:-1]] == [window] * (len(windows) - 1)
    assert sum(len(x) for _, x in windows) == len(ids)
    assert all(len(c) + len(x) - 1 <= window for c, x in windows)


@pytest.mark.parametrize("call, message", [
    (lambda m: m.score(["1+1="], ["2", "3"]), "same length"),
    (lambda m: m.score([[]], [[5]]), "context 0 is empty"),
    (lambda m: m.score([[5]], [[]]), "continuation 0 is empty"),
    (lambda m: m.score([[5]], [[99]]), r"token id 99 is outside \[0, vocab_size=16\)"),
    (lambda m: m.score(["1+"], [[5]]), "both be text or both token ids"),
    (lambda m: m.score([[5]], [list(range(1, 16)) * 5]), "more than sequence_len=64"),
    (lambda m: m.score_rolling("12"), "texts must be a list"),
    (lambda m: m.score_rolling([""]), "text 0 is empty"),
])
def test_bad_input_is_named(model, call, message):
    with pytest.raises(GrokError, match=message):
        call(model)


def run_engine(engine, prompt, **settings):
    sched = Scheduler(engine)
    rid = sched.submit(engine.make_request(prompt, GenerationSettings(**settings)))
    events = []
    while sched.has_work:
        events += [e for e in sched.step() if e.request_id == rid]
    return events


@pytest.mark.parametrize("chunk", [None, 4])
def test_prefill_reports_the_prompt_s_logprobs(model, chunk):
    """Whole or in chunks of 4, with or without new tokens: each prompt token scored given
    those before it, as `score` scores it."""
    engine = model.engine(2, 32, prefill_chunk=chunk)
    prompt = model.tokenizer.encode("305+28=333+12+34=")
    want = model.score([prompt[:1]], [prompt[1:]])[0]
    for new in (0, 3):
        events = run_engine(engine, prompt, max_new_tokens=new, temperature=0,
                            prompt_logprobs=True, ignore_eos=True)
        got = events[-1].completion.prompt_logprobs
        assert events[0].prompt_logprobs == got
        assert got.logprobs[0] is None and got.top_alternatives[0] == []
        # The engine attends through its cache (float32 on CPU) in other shapes again:
        # two bf16 steps at the demo's logit magnitudes (16 to 32) apart at most.
        np.testing.assert_allclose(got.logprobs[1:], want.logprobs, atol=1 / 4)
        for t, (token, alternatives, rank) in enumerate(zip(
                prompt[1:], got.top_alternatives[1:], got.ranks[1:], strict=True)):
            ids = [i for i, _ in alternatives]
            assert rank == ids.index(token) + 1 if token in ids else rank > len(ids)
            # The token's own number and the alternatives' come from one log-softmax.
            assert dict(alternatives).get(token, got.logprobs[t + 1]) == got.logprobs[t + 1]
        completion = events[-1].completion
        assert len(completion.output_ids) == new
        if new == 0:
            assert len(events) == 1 and events[0].token is None
            assert completion.finish_reason == "length" and completion.text == ""


def test_max_new_tokens_zero_needs_prompt_logprobs():
    with pytest.raises(GrokError, match=r"max_new_tokens must be an integer >= 1 \(0 only "
                                        r"with prompt_logprobs\)"):
        GenerationSettings(max_new_tokens=0)


def test_scored_and_plain_prompts_share_a_prefill(model):
    """One batched prefill: the scored prompt gets its numbers, the plain one its tokens,
    each as when alone."""
    engine = model.engine(2, 32)
    scored, plain = model.tokenizer.encode("305+28="), model.tokenizer.encode("12+34=")
    sched = Scheduler(engine)
    ids = [sched.submit(engine.make_request(scored, GenerationSettings(
               max_new_tokens=4, temperature=0, prompt_logprobs=True))),
           sched.submit(engine.make_request(plain, GenerationSettings(
               max_new_tokens=4, temperature=0)))]
    done = {}
    while sched.has_work:
        done.update({e.request_id: e.completion for e in sched.step() if e.finished})
    assert engine.programs().keys() >= {("prefill", 2, 16)}  # together
    alone = run_engine(engine, scored, max_new_tokens=4, temperature=0,
                       prompt_logprobs=True)[-1].completion
    assert done[ids[0]].prompt_logprobs.tokens == scored
    assert_close(done[ids[0]].prompt_logprobs.logprobs[1:], alone.prompt_logprobs.logprobs[1:])
    assert done[ids[0]].output_ids == alone.output_ids
    assert done[ids[1]].prompt_logprobs is None
    assert done[ids[1]].text == model.generate("12+34=").text
