"""Sampling: greedy, temperature, the release's nucleus rule, top-k, masks, reported log-probs.

Draws are deterministic for fixed keys, so the statistical tests cannot flake; their
tolerances are still set from the binomial spread so that a correct sampler passes for
(almost) any keys and a wrong one fails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok.sampling import (
    NEG,
    TOP_ALTERNATIVES,
    SamplingParams,
    check_settings,
    filter_logits,
    sample,
)

sample_jit = jax.jit(sample)
filter_jit = jax.jit(filter_logits)


def params(batch, temperature=1.0, top_p=1.0, top_k=0) -> SamplingParams:
    return SamplingParams(jnp.broadcast_to(jnp.float32(temperature), (batch,)),
                          jnp.broadcast_to(jnp.float32(top_p), (batch,)),
                          jnp.broadcast_to(jnp.int32(top_k), (batch,)))


def keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


def draws(logits_row, n, p: SamplingParams, allowed_row=None, seed=0) -> np.ndarray:
    """n independent draws from one row: the row repeated n times, one key each."""
    logits = jnp.broadcast_to(jnp.asarray(logits_row, jnp.float32), (n, len(logits_row)))
    allowed = None if allowed_row is None else jnp.broadcast_to(allowed_row, logits.shape)
    return np.asarray(sample_jit(logits, keys(n, seed), p, allowed).tokens)


def reference_keep(logits, temperature, top_p, top_k, allowed):
    """The release's rule plus top-k, in float64 NumPy, written from the rule's statement.
    Also returns how far the cumulative sums come to 1 - top_p (float32 may differ there)."""
    x = np.where(allowed, logits / temperature, NEG)
    if 0 < top_k < len(x):
        x = np.where(x >= np.sort(x)[-top_k], x, NEG)
    ascending = np.sort(x)
    probs = np.exp(ascending - ascending.max())
    cumulative = np.cumsum(probs / probs.sum())
    position = np.argmax(cumulative >= 1 - top_p)
    margin = np.min(np.abs(cumulative - (1 - top_p)))
    return x >= ascending[position], margin


def test_greedy_is_argmax_whatever_the_key():
    logits = jax.random.normal(jax.random.key(1), (8, 50))
    for seed in range(3):
        out = sample_jit(logits, keys(8, seed), params(8, temperature=0.0))
        np.testing.assert_array_equal(out.tokens, np.argmax(logits, axis=-1))


def test_greedy_and_sampled_rows_share_a_batch():
    # Flat logits: a sampled row almost never hits the argmax, a greedy row always does.
    logits = jnp.broadcast_to(jnp.linspace(0.0, 0.1, 50), (8, 50))
    temperature = jnp.array([0, 1, 0, 1, 1, 0, 1, 1], jnp.float32)
    p = SamplingParams(temperature, jnp.ones(8), jnp.zeros(8, jnp.int32))
    seen = set()
    for seed in range(10):
        tokens = np.asarray(sample_jit(logits, keys(8, seed), p).tokens)
        assert (tokens[temperature == 0] == 49).all()
        seen |= set(tokens[temperature > 0].tolist())
    assert len(seen) > 20  # 50 draws from ~uniform over 50: about 32 distinct expected


def test_same_key_same_token_whatever_else_is_in_the_batch():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 50)), jnp.float32)
    k = keys(4)
    p = SamplingParams(jnp.array([1.0, 0.7, 0, 2.0]), jnp.array([1.0, 0.9, 1, 0.5]),
                       jnp.array([0, 10, 0, 3], jnp.int32))
    alone = sample_jit(logits, k, p).tokens
    np.testing.assert_array_equal(alone, sample_jit(logits, k, p).tokens)
    # Reverse the batch and replace row 0's neighbours: each row keeps its token.
    other = jnp.asarray(rng.normal(size=(4, 50)), jnp.float32).at[1].set(logits[2])
    mixed = SamplingParams(*(jnp.stack([v[3], v[2], v[1], v[0]]) for v in p))
    batch = jnp.stack([logits[3], other[1], logits[1], logits[0]])
    rows = sample_jit(batch, jnp.stack([k[3], keys(1, 9)[0], k[1], k[0]]), mixed).tokens
    np.testing.assert_array_equal(np.asarray(rows)[[3, 2, 0]], np.asarray(alone)[[0, 1, 3]])


def test_different_keys_give_different_draws():
    tokens = np.concatenate([draws(np.zeros(50), 8, params(8), seed=s) for s in range(8)])
    # 64 uniform draws over 50 tokens: 36 distinct on average, fewer than 25 has p < 1e-4.
    assert len(set(tokens.tolist())) >= 25


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.5])
def test_frequencies_match_softmax_over_temperature(temperature):
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 4000
    tokens = draws(logits, n, params(n, temperature=temperature), seed=3)
    expected = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
    freq = np.bincount(tokens, minlength=6) / n
    # 5 binomial standard deviations per token: a correct sampler exceeds it with
    # probability ~6e-7 per token; a 10% relative error on a 0.3-probability token is ~4 sd.
    sd = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) <= 5 * sd + 1e-12), (freq, expected)


def test_filtered_frequencies_are_renormalised_probabilities():
    logits = np.array([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    n = 4000
    tokens = draws(logits, n, params(n, top_k=3), seed=4)
    expected = np.zeros(6)
    expected[:3] = np.exp(logits[:3]) / np.exp(logits[:3]).sum()
    freq = np.bincount(tokens, minlength=6) / n
    sd = np.sqrt(expected * (1 - expected) / n)  # 5 sd, as above; zero outside the top 3
    assert np.all(np.abs(freq - expected) <= 5 * sd + 1e-12), (freq, expected)


def test_release_top_p_rule_by_hand():
    """probs [0.5, 0.3, 0.15, 0.05]; ascending: [0.05, 0.15, 0.3, 0.5], cumulative
    [0.05, 0.20, 0.50, 1.00]. The release keeps every logit >= the one at the first
    position whose cumulative sum reaches 1 - top_p:
      top_p 0.75: 1 - p = 0.25, first reached at 0.50 (prob 0.3)  -> keeps {0, 1}, mass 0.80
      top_p 0.85: 1 - p = 0.15, first reached at 0.20 (prob 0.15) -> keeps {0, 1, 2}
      top_p 0.40: 1 - p = 0.60, first reached at 1.00 (prob 0.5)  -> keeps {0}
      top_p 1.00: 1 - p = 0,    reached at once   (prob 0.05) -> keeps all
    The kept set is the smallest whose mass is strictly above top_p: at top_p 0.8,
    1 - p = 0.20 equals the second cumulative sum exactly, so the release keeps three
    tokens (mass 0.95), not two. Which way float32 rounds there is not a property of the
    rule, so that boundary is not asserted.
    """
    logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
    top_p = jnp.array([0.75, 0.85, 0.4, 1.0])
    p = SamplingParams(jnp.ones(4), top_p, jnp.zeros(4, jnp.int32))
    kept = np.asarray(filter_jit(jnp.broadcast_to(logits, (4, 4)), p)) > NEG / 2
    np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])


def test_top_p_one_keeps_everything():
    logits = jnp.array([[5.0, -30.0, 0.0, -80.0, 2.0]])
    kept = np.asarray(filter_jit(logits, params(1, top_p=1.0)))
    np.testing.assert_allclose(kept, logits - 5.0)  # shifted by the max, nothing removed


def test_top_k_top_p_and_mask_agree_with_reference_and_bound_draws():
    """Random rows with many ties (logits on a 0.5 grid), random temperature, top-k, top-p
    and allowed mask: the kept set equals the float64 reference, and 64 draws per row
    never leave it."""
    rng = np.random.default_rng(7)
    rows, vocab, per_row = 64, 32, 64
    logits = rng.integers(-6, 6, size=(rows, vocab)) * 0.5
    temperature = rng.choice([0.5, 1.0, 2.0], rows)
    top_p = rng.choice([0.1, 0.5, 0.9, 1.0, 0.33, 0.77], rows)
    top_k = rng.choice([0, 1, 2, 5, vocab, vocab + 3], rows)
    allowed = rng.random((rows, vocab)) < 0.7
    allowed[np.arange(rows), rng.integers(0, vocab, rows)] = True  # at least one per row
    p = SamplingParams(jnp.asarray(temperature, jnp.float32), jnp.asarray(top_p, jnp.float32),
                       jnp.asarray(top_k, jnp.int32))
    kept = np.asarray(filter_jit(jnp.asarray(logits, jnp.float32), p, allowed)) > NEG / 2

    checked = 0
    for r in range(rows):
        expected, margin = reference_keep(logits[r], temperature[r], top_p[r], top_k[r],
                                          allowed[r])
        # float32 cumulative sums over 32 terms are within ~1e-6 of float64; closer than
        # 1e-5 to 1 - top_p, the two may legitimately pick neighbouring positions.
        if margin > 1e-5:
            np.testing.assert_array_equal(kept[r], expected, err_msg=f"row {r}")
            checked += 1
        assert kept[r][allowed[r]].any() and not kept[r][~allowed[r]].any()
    assert checked >= rows * 3 // 4

    big = jnp.asarray(np.repeat(logits, per_row, axis=0), jnp.float32)
    tiled = SamplingParams(*(jnp.repeat(v, per_row) for v in p))
    tokens = np.asarray(sample_jit(big, keys(rows * per_row), tiled,
                                   jnp.asarray(np.repeat(allowed, per_row, axis=0))).tokens)
    assert kept[np.repeat(np.arange(rows), per_row), tokens].all()


def test_tiny_top_p_keeps_the_top_token():
    # 1 - 1e-8 rounds to 1.0 in float32, which this row's float32 cumulative sum never
    # reaches (checked below); the release would then keep everything, this keeps the top.
    logits = jax.random.normal(jax.random.key(5), (1, 5000))
    assert jnp.cumsum(jax.nn.softmax(jnp.sort(logits[0])))[-1] < jnp.float32(1) - 1e-8
    kept = np.asarray(filter_jit(logits, params(1, top_p=1e-8))) > NEG / 2
    np.testing.assert_array_equal(np.flatnonzero(kept[0]), [int(jnp.argmax(logits))])


def test_top_k_keeps_ties():
    logits = jnp.array([[3.0, 1.0, 2.0, 2.0, 0.0, 2.0]])
    kept = np.asarray(filter_jit(logits, params(1, top_k=2))) > NEG / 2
    np.testing.assert_array_equal(kept[0], [1, 0, 1, 1, 0, 1])  # 2nd largest is a 3-way tie


def test_allowed_mask_respected_at_temperature_zero():
    logits = jnp.array([[9.0, 1.0, 5.0, 7.0], [0.0, 0.0, 8.0, -1.0]])
    allowed = jnp.array([[False, True, True, False], [True, False, False, True]])
    out = sample_jit(logits, keys(2), params(2, temperature=0.0), allowed)
    np.testing.assert_array_equal(out.tokens, [2, 0])
    tokens = draws(jnp.array([9.0, 1.0, 5.0, 7.0]), 500, params(500, temperature=3.0),
                   allowed[0])
    assert set(tokens.tolist()) == {1, 2}


def test_reported_logprobs_are_of_the_raw_logits():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(6, 40)).astype(np.float32) * 3
    allowed = rng.random((6, 40)) < 0.5
    allowed[:, 0] = True
    p = SamplingParams(jnp.array([0, 0.3, 1, 2, 0.5, 1.5]), jnp.array([1, 0.5, 0.9, 1, 0.2, 1]),
                       jnp.array([0, 0, 4, 7, 0, 1], jnp.int32))
    out = sample_jit(jnp.asarray(logits), keys(6), p, jnp.asarray(allowed))
    z = logits.astype(np.float64)
    raw = z - z.max(-1, keepdims=True)
    raw -= np.log(np.exp(raw).sum(-1, keepdims=True))
    tokens = np.asarray(out.tokens)
    assert allowed[np.arange(6), tokens].all()
    # float32 log-softmax over 40 logits of size ~10: a few ulps of 10, well under 1e-5.
    np.testing.assert_allclose(out.logprobs, raw[np.arange(6), tokens], atol=1e-5)

    assert out.top_ids.shape == out.top_logprobs.shape == (6, TOP_ALTERNATIVES)
    assert out.top_ids.dtype == out.tokens.dtype == jnp.int32
    top = np.argsort(-z, axis=-1, kind="stable")[:, :TOP_ALTERNATIVES]
    np.testing.assert_array_equal(out.top_ids, top)  # normal logits: no ties to order
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(raw, top, -1), atol=1e-5)
    assert np.all(np.diff(np.asarray(out.top_logprobs), axis=-1) <= 0)


def test_fewer_than_eight_tokens_gives_that_many_alternatives():
    out = sample_jit(jnp.array([[0.0, 2.0, 1.0]]), keys(1), params(1))
    np.testing.assert_array_equal(out.top_ids, [[1, 2, 0]])


def test_tiny_temperature_acts_greedy_without_overflow():
    # logits / 1e-40 overflows float32 to inf; the max-shift keeps the result finite.
    logits = jnp.array([[1.0, 3.0, 2.0, 3.0 - 1e-6]])
    tokens = draws(logits[0], 200, params(200, temperature=1e-40))
    assert set(tokens.tolist()) == {1}
    assert np.isfinite(np.asarray(filter_jit(logits, params(1, temperature=1e-40)))).all()


@pytest.mark.parametrize("settings, message", [
    ((-0.1, 1.0, 0), r"temperature must be a finite number >= 0 \(0 = greedy\), got -0\.1"),
    ((float("nan"), 1.0, 0), r"temperature must be a finite number >= 0.*got nan"),
    ((float("inf"), 1.0, 0), r"temperature must be a finite number >= 0.*got inf"),
    ((1.0, 0.0, 0), r"top_p must be in \(0, 1\], got 0\.0"),
    ((1.0, 1.5, 0), r"top_p must be in \(0, 1\], got 1\.5"),
    ((1.0, 1.0, -1), r"top_k must be an integer in \[0, 2\*\*31\) \(0 = off\), got -1"),
    ((1.0, 1.0, 2**31), r"top_k must be an integer in \[0, 2\*\*31\).*got 2147483648"),
    ((1.0, 1.0, 2.5), r"top_k must be an integer, got 2\.5"),
    ((1.0, 1.0, True), r"top_k must be an integer, got True"),
    (("hot", 1.0, 0), r"temperature must be a number, got 'hot'"),
    (([0.5, -2.0], [1.0, 1.0], [0, 0]), r"temperature .* got -2\.0"),
])
def test_check_settings_rejects(settings, message):
    with pytest.raises(ValueError, match=message):
        check_settings(*settings)


def test_check_settings_accepts_the_valid_range():
    check_settings(0.0, 1.0, 0)
    check_settings(0.01, 1e-6, 131072)
    check_settings(np.array([0.0, 2.0]), np.array([0.5, 1.0]), np.array([0, 40], np.int32))


def test_shape_errors_are_named():
    with pytest.raises(ValueError, match=r"keys must be a typed PRNG key array of shape \(2,\)"):
        sample(jnp.zeros((2, 5)), jax.random.PRNGKey(0), params(2))
    with pytest.raises(ValueError, match=r"params.top_k must have shape \(2,\), got \(3,\)"):
        sample(jnp.zeros((2, 5)), keys(2), params(2)._replace(top_k=jnp.zeros(3, jnp.int32)))
    with pytest.raises(ValueError, match=r"allowed must have the logits' shape"):
        sample(jnp.zeros((2, 5)), keys(2), params(2), jnp.ones((2, 4), bool))
