"""Logit controls: logit_bias, the presence, frequency and repetition penalties, min_tokens
and stop_token_ids, on the device and through the engine.

The device's arithmetic is compared with NumPy's statement of each definition (OpenAI's
for presence and frequency, vLLM's and Hugging Face's for repetition), and greedy decoding
with every control set with a NumPy loop over full forward passes, up to the loop's first
near-tie (top-2 gap <= 0.125, test_generate.py's tolerance for a bf16 model run two ways).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_generate import CLEAR_GAP, NEW, P0, PA

from grok import Grok, demo
from grok.engine.request import GenerationSettings
from grok.errors import GrokError
from grok.sampling import (
    NEG,
    Controls,
    SamplingParams,
    apply_controls,
    bar_stop_tokens,
    count_tokens,
    sample,
)
from grok.tokenizer import default_allowed

V = 40


def reference(logits, bias, seen, counts, presence, frequency, repetition):
    """Each definition as written, in float64: bias added; tokens of the prompt or the
    output: positive logits divided by the repetition penalty, the rest multiplied; then
    frequency x count and presence x [count > 0] subtracted."""
    x = np.asarray(logits, np.float64) + bias
    repeated = seen | (counts > 0)
    r = np.asarray(repetition, np.float64)[:, None]
    x = np.where(repeated, np.where(x > 0, x / r, x * r), x)
    return (x - np.asarray(frequency, np.float64)[:, None] * counts
            - np.asarray(presence, np.float64)[:, None] * (counts > 0))


def random_controls(rng, rows, on):
    return Controls(
        on=np.asarray(on), bias=np.where(rng.random((rows, V)) < 0.2,
                                         rng.uniform(-100, 100, (rows, V)), 0).astype(np.float32),
        seen=rng.random((rows, V)) < 0.3, presence=rng.uniform(-2, 2, rows).astype(np.float32),
        frequency=rng.uniform(-2, 2, rows).astype(np.float32),
        repetition=rng.uniform(0.5, 2, rows).astype(np.float32),
        stop_tokens=np.zeros((rows, V), bool), min_tokens=np.zeros(rows, np.int32))


def neutral(controls: Controls, rows) -> Controls:
    """`controls` with rows `rows` steering nothing."""
    c = jax.tree.map(np.array, controls)
    c.on[rows] = False
    c.bias[rows] = 0
    c.seen[rows] = False
    c.presence[rows], c.frequency[rows], c.repetition[rows] = 0, 0, 1
    return c


def test_controls_compute_each_definition():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (6, V)).astype(np.float32)
    counts = rng.integers(0, 3, (6, V)).astype(np.int32) * (rng.random((6, V)) < 0.3)
    c = random_controls(rng, 6, [True] * 6)
    got = np.asarray(jax.jit(apply_controls)(logits, c, counts))
    want = reference(logits, c.bias, c.seen, counts, c.presence, c.frequency, c.repetition)
    # float32 arithmetic, a few roundings of numbers up to ~100: within 1e-4.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert (np.abs(got - logits) > 1e-3).mean() > 0.3  # the controls did change things


def test_rows_without_controls_are_untouched_bit_for_bit():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (4, V)).astype(np.float32)
    counts = rng.integers(0, 3, (4, V)).astype(np.int32)
    c = neutral(random_controls(rng, 4, [True] * 4), [1, 3])
    got = np.asarray(jax.jit(apply_controls)(logits, c, counts))
    np.testing.assert_array_equal(got[[1, 3]], logits[[1, 3]])
    assert not np.array_equal(got[0], logits[0])
    none_on = neutral(c, [0, 1, 2, 3])
    np.testing.assert_array_equal(jax.jit(apply_controls)(logits, none_on, counts), logits)


def test_stop_tokens_are_barred_until_min_tokens():
    allowed = np.ones((3, V), bool)
    c = random_controls(np.random.default_rng(2), 3, [False] * 3)._replace(
        stop_tokens=np.zeros((3, V), bool), min_tokens=np.array([0, 2, 5], np.int32))
    c.stop_tokens[:, [2, 7]] = True
    got = np.asarray(bar_stop_tokens(allowed, c, np.array([1, 1, 5], np.int32)))
    assert got[0].all() and got[2].all()  # no minimum; minimum reached
    assert not got[1, 2] and not got[1, 7] and got[1].sum() == V - 2


def test_counts_add_only_where_asked():
    counts = jnp.zeros((3, V), jnp.int32)
    out = np.asarray(count_tokens(counts, jnp.array([4, 4, 9]), jnp.array([1, 0, 1])))
    assert out[0, 4] == 1 and out[1].sum() == 0 and out[2, 9] == 1 and out.sum() == 2


def test_bias_steers_the_draw_and_logprobs_stay_raw():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(2, V)), jnp.float32)
    c = neutral(random_controls(rng, 2, [True, True]), [0, 1])
    c.on[:] = True
    c.bias[:, 11] = 100.0
    keys = jax.random.split(jax.random.key(0), 2)
    params = SamplingParams(jnp.array([0.0, 1.0]), jnp.ones(2), jnp.zeros(2, jnp.int32))
    out = jax.jit(sample)(logits, keys, params, None, c, jnp.zeros((2, V), jnp.int32))
    np.testing.assert_array_equal(out.tokens, [11, 11])
    raw = jax.nn.log_softmax(logits)[:, 11]
    np.testing.assert_allclose(out.logprobs, raw, rtol=1e-6)


@pytest.mark.parametrize("field, value, words", [
    ("presence_penalty", 2.5, "presence_penalty must be a number in [-2, 2]"),
    ("frequency_penalty", float("nan"), "frequency_penalty must be a number in [-2, 2]"),
    ("repetition_penalty", 0, "repetition_penalty must be a number > 0"),
    ("logit_bias", {"5": 1.0}, "logit_bias keys must be token ids"),
    ("logit_bias", {5: "high"}, "logit_bias[5] must be a number finite"),
    ("min_tokens", 200, "min_tokens must be an integer in [0, max_new_tokens=100]"),
    ("stop_token_ids", [1, -2], "stop_token_ids must be a list of token ids"),
])
def test_bad_settings_are_named(field, value, words):
    with pytest.raises(GrokError, match=words.replace("[", r"\[").replace("]", r"\]")):
        GenerationSettings(**{field: value})


def test_bias_is_clamped_and_ids_are_checked_against_the_vocabulary():
    s = GenerationSettings(logit_bias={3: 1e6, 4: -250})
    assert s.logit_bias == ((3, 100.0), (4, -100.0)) and s.steered
    model = demo.load()
    with pytest.raises(GrokError, match=r"logit_bias: token id 16 is out of range \[0, "
                                        r"vocab_size=16\)"):
        model.generate("1+1=", logit_bias={16: 1.0})
    with pytest.raises(GrokError, match="stop_token_ids: token id 99 is out of range"):
        model.generate("1+1=", stop_token_ids=[99])


# --- through the engine -----------------------------------------------------------------


@pytest.fixture(scope="module")
def grok(fixture_dir):
    return Grok.load(fixture_dir, fixture_dir / "config.json", mesh_shape=(1, 1))


STEERING = dict(presence_penalty=0.5, frequency_penalty=0.7, repetition_penalty=1.4,
                logit_bias={1180: 2.5, 3033: -1.5})


def test_greedy_with_every_control_matches_a_numpy_loop(grok):
    got = grok.generate(P0, max_new_tokens=NEW, temperature=0, **STEERING)
    allowed = default_allowed(grok.config)
    bias = np.zeros(grok.config.vocab_size)
    for token, b in STEERING["logit_bias"].items():
        bias[token] = b
    seen = np.zeros(grok.config.vocab_size, bool)
    seen[P0] = True
    ids, want, gaps = list(P0), [], []
    for _ in range(NEW):
        counts = np.bincount(want, minlength=grok.config.vocab_size)
        # Right-padded to one length (one compile): a causal model's logits at a position
        # do not depend on what follows it.
        padded = ids + [grok.config.pad_token] * (len(P0) + NEW - len(ids))
        x = reference(grok.logits([padded])[0, len(ids) - 1][None], bias, seen[None],
                      counts[None],
                      [STEERING["presence_penalty"]], [STEERING["frequency_penalty"]],
                      [STEERING["repetition_penalty"]])[0]
        x = np.where(allowed, x, NEG)
        top2 = np.sort(x)[-2:]
        gaps.append(top2[1] - top2[0])
        want.append(int(np.argmax(x)))
        ids.append(want[-1])
    clear = next((i for i, g in enumerate(gaps) if g <= CLEAR_GAP), NEW)
    assert clear >= 4, gaps  # enough steps to mean something
    assert got.output_ids[:clear] == want[:clear]
    plain = grok.generate(P0, max_new_tokens=NEW, temperature=0)
    assert plain.output_ids[:clear] != want[:clear]  # the controls changed the output


def test_minus_100_on_the_greedy_token_takes_the_next(grok):
    plain = grok.generate(P0, max_new_tokens=2, temperature=0)
    first, second = plain.top_alternatives[0][:2]
    assert first[1] - second[1] > CLEAR_GAP
    barred = grok.generate(P0, max_new_tokens=2, temperature=0,
                           logit_bias={plain.output_ids[0]: -100})
    assert barred.output_ids[0] == second[0]
    # Log-probabilities stay the model's: the first step's are unchanged.
    assert barred.top_alternatives[0] == plain.top_alternatives[0]


def test_stop_token_ids_end_the_row_and_min_tokens_bars_them(grok):
    plain = grok.generate(P0, max_new_tokens=NEW, temperature=0)
    i = next(i for i in range(1, NEW) if plain.output_ids[i] not in plain.output_ids[:i])
    token = plain.output_ids[i]
    stopped = grok.generate(P0, max_new_tokens=NEW, temperature=0, stop_token_ids=[token])
    assert stopped.output_ids == plain.output_ids[:i + 1]
    assert stopped.finish_reason == "stop"
    late = grok.generate(P0, max_new_tokens=NEW, temperature=0, stop_token_ids=[token],
                         min_tokens=i + 2)
    assert token not in late.output_ids[:i + 2] and len(late.output_ids) >= i + 2


def test_free_rows_keep_their_tokens_beside_steered_ones(grok):
    free = GenerationSettings(max_new_tokens=NEW, temperature=1.0, seed=5)
    engine = grok.engine(2, 32)
    from grok.engine.scheduler import Scheduler

    def run(second):
        sched = Scheduler(engine)
        ids = [sched.submit(engine.make_request(P0, free)),
               sched.submit(engine.make_request(PA, second))]
        done = {}
        while sched.has_work:
            done.update({e.request_id: e.completion for e in sched.step() if e.finished})
        return done[ids[0]], done[ids[1]]

    alone = run(free)
    mixed = run(GenerationSettings(max_new_tokens=NEW, temperature=1.0, seed=6, **STEERING,
                                   min_tokens=NEW))
    assert mixed[0].output_ids == alone[0].output_ids
    assert mixed[0].output_logprobs == alone[0].output_logprobs
    assert mixed[1].output_ids != alone[1].output_ids


def test_min_tokens_holds_eos_back_on_the_demo():
    model = demo.load()
    plain = model.generate("12+34=")
    assert plain.text == "46" and plain.finish_reason == "eos"
    held = model.generate("12+34=", min_tokens=5, max_new_tokens=8)
    assert len(held.output_ids) >= 5 and 2 not in held.output_ids[:5]
    assert held.text.startswith("46")
