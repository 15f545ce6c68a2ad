"""Generation on the upstream-tiny fixture: the KV cache, greedy parity with the release,
batching, seeds, sampling filters, stopping, streaming, compile reuse and input checks.

Tolerances. The fixture's logits lie within about +-6.2, where bf16 (the dtype the model
computes them in) has steps of 1/32. Two correct bf16 paths to the same logits (prefill +
cached decode versus one full forward; another batch size or mesh) round differently where
dot blocking or the number of attended (masked) slots differs: measured, at most one step
(1/32) per logit. We allow LOGIT_TOL = 2/32. A log-softmax moves by at most twice what its
logits move (the logit, and the logsumexp), hence LOGPROB_TOL = 2 * LOGIT_TOL. A greedy
choice can only flip where the best two logits are within 2 * LOGIT_TOL = 0.125 of each
other, the same threshold reference.json uses (CLEAR_GAP): token sequences are compared up
to the first step whose top-2 gap is not clear (ties may break either way after it).

Compile cost dominates, so shapes are shared: every call uses NEW = 12 new tokens and
prompts of 5..16 tokens, i.e. one prompt bucket (16) and one cache length (32), on a 1x1
mesh, with batches of 1 and 3 or 4 rows (padded to 4).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOKENIZER

from grok import Grok
from grok.kv_cache import init_cache

NEW = 12
LOGIT_TOL = 2 / 32
LOGPROB_TOL = 2 * LOGIT_TOL
CLEAR_GAP = 0.125

# Prompts as token ids (all < the fixture's vocab 4096). P0 is the reference prompt; PA and
# PB were picked from random ids because their greedy paths have no near-tie in 12 steps
# (every top-2 gap > CLEAR_GAP), so comparisons of them cover all 12 tokens; PE is a prompt
# after which EOS beats token 1687 by 3.1 (P0 and PB prefer 1687 by >= 1.3 at every step).
P0 = [422, 3033, 356, 1180, 333]
PA = [1824, 2205, 2122, 1408, 3875, 1513, 2695, 1535]
PB = [2748, 3297, 95, 3309, 1922, 2112, 2582, 1172, 4012, 223, 1140, 1572]
PE = [1272, 3864, 2854, 1474, 554, 3215, 1634, 2423, 2538, 1207]
SEEDS = [0, 1, 2, 3]  # four draws per step in one batch of four


@pytest.fixture(scope="module")
def reference(fixture_dir):
    return json.loads((fixture_dir / "reference.json").read_text())


@pytest.fixture(scope="module")
def grok(fixture_dir):
    tokenizer = TOKENIZER if TOKENIZER.is_file() else None
    return Grok.load(fixture_dir, fixture_dir / "config.json", tokenizer_path=tokenizer,
                     mesh_shape=(1, 1))


@pytest.fixture
def tokenized(grok):
    if grok.tokenizer is None:
        pytest.skip(f"released tokenizer not found at {TOKENIZER}")
    return grok


@pytest.fixture(scope="module")
def alone(grok):
    """Greedy completions of each prompt on its own (batch 1, 1x1 mesh)."""
    return {name: grok.generate(p, max_new_tokens=NEW, temperature=0)
            for name, p in (("P0", P0), ("PA", PA), ("PB", PB))}


def clear_steps(gaps) -> int:
    """Number of leading steps whose top-2 gap exceeds CLEAR_GAP."""
    return next((i for i, gap in enumerate(gaps) if gap <= CLEAR_GAP), len(gaps))


def gaps_of(completion) -> list[float]:
    return [alts[0][1] - alts[1][1] for alts in completion.top_alternatives]


def assert_same_greedy(got, want) -> int:
    """`got` has `want`'s tokens up to `want`'s first near-tie; returns how many compared."""
    k = clear_steps(gaps_of(want))
    assert got.prompt_ids == want.prompt_ids
    assert got.output_ids[:k] == want.output_ids[:k]
    return k


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def sample4(grok, **settings):
    """P0 four times at temperature 1 with seeds 0..3: 48 draws in one call."""
    return grok.generate([P0] * 4, max_new_tokens=NEW, temperature=1.0, seed=SEEDS, **settings)


def draws(rows):
    """(row, step, token, its log-prob, the step's top-8 alternatives) for every draw."""
    return [(r, i, tok, lp, alts) for r, c in enumerate(rows)
            for i, (tok, lp, alts) in enumerate(zip(c.output_ids, c.output_logprobs,
                                                   c.top_alternatives, strict=True))]


def rank(lp, alts) -> int:
    """How many of the step's alternatives are strictly more likely than log-prob lp."""
    return sum(a_lp > lp for _, a_lp in alts)


# --- the cache -------------------------------------------------------------------------


def test_cached_decoding_matches_full_forward(grok):
    """Two rows with prompts of 5 and 9 tokens prefilled together (right padded, num_new per
    row), then decoded one token at a time (a row that is done gets num_new 0) into a
    32-slot cache: every position's logits equal `Grok.logits` of the whole sequence.
    Measured max |diff| 1/32 (one bf16 step); allowed LOGIT_TOL."""
    seqs = np.array([P0 + PB[:11], PB + PA[:4]], np.int32)  # both 16 tokens
    lengths = np.array([5, 9], np.int32)
    want = np.stack([grok.logits(s[None])[0] for s in seqs])  # [2, 16, V]

    apply = jax.jit(grok.model.apply)
    prefill = np.full((2, lengths.max()), grok.config.pad_token, np.int32)
    for b, n in enumerate(lengths):
        prefill[b, :n] = seqs[b, :n]
    cache = init_cache(grok.config, 2, 32)
    logits, cache = apply(grok.params, jnp.asarray(prefill), cache, jnp.asarray(lengths))
    logits = np.asarray(logits, np.float32)
    got = [list(logits[b, :n]) for b, n in enumerate(lengths)]
    pos = lengths.copy()
    while (pos < seqs.shape[1]).any():
        live = pos < seqs.shape[1]
        step = np.where(live, seqs[np.arange(2), np.minimum(pos, seqs.shape[1] - 1)],
                        grok.config.pad_token).astype(np.int32)[:, None]
        logits, cache = apply(grok.params, jnp.asarray(step), cache,
                              jnp.asarray(live.astype(np.int32)))
        logits = np.asarray(logits, np.float32)
        for b in np.flatnonzero(live):
            got[b].append(logits[b, 0])
        pos += live
    np.testing.assert_array_equal(np.asarray(cache.lengths), [16, 16])
    got = np.stack([np.stack(row) for row in got])
    assert got.shape == want.shape
    diff = np.abs(got - want)
    where = np.unravel_index(diff.argmax(), diff.shape)
    assert diff.max() <= LOGIT_TOL, f"max |diff| {diff.max()} at (row, position, id) {where}"


# --- greedy parity with the release ----------------------------------------------------


def test_greedy_reproduces_release(grok, reference):
    """Temperature 0 gives the release's greedy tokens up to its first near-tie (step 6,
    gap 0.125); measured: all 12 match."""
    c = grok.generate(reference["prompt_ids"], max_new_tokens=NEW, temperature=0)
    k = clear_steps(reference["greedy_top2_gaps"])
    assert k == 6
    assert c.prompt_ids == reference["prompt_ids"]
    assert c.output_ids[:k] == reference["greedy_ids"][:k]
    assert len(c.output_ids) == NEW and c.finish_reason == "length"


def test_text_prompt_goes_through_tokenizer(tokenized, reference, alone):
    c = tokenized.generate(reference["prompt"], max_new_tokens=NEW, temperature=0)
    assert c.prompt == reference["prompt"]
    assert c.prompt_ids == reference["prompt_ids"]
    assert c.output_ids == alone["P0"].output_ids  # the same computation as from the ids
    assert c.text == tokenized.tokenizer.decode(c.output_ids)
    assert c.text.startswith(tokenized.tokenizer.decode(reference["greedy_ids"][:6]))
    # (Measured: the whole text equals the release's reference["sampled_text"].)


# --- batching --------------------------------------------------------------------------


def test_batch_rows_get_their_own_tokens(grok, alone):
    """Three prompts of 12, 5 and 8 tokens in one batch (padded to 4 rows inside) each get
    the tokens they get alone. Measured: all 36 identical; asserted to the first near-tie."""
    rows = grok.generate([PB, P0, PA], max_new_tokens=NEW, temperature=0)
    assert len(rows) == 3
    compared = sum(assert_same_greedy(c, alone[name])
                   for c, name in zip(rows, ["PB", "P0", "PA"], strict=True))
    assert compared >= 30  # 12 + 6 + 12: not vacuous


@pytest.mark.slow
def test_batch_on_mesh_with_data_axis(fixture_dir, alone):
    """The same batch of 3 on a (2, 4) mesh: rows split over data=2 (padded to 4), heads over
    model=4; each row still gets its single-prompt 1x1 tokens."""
    grok = Grok.load(fixture_dir, fixture_dir / "config.json", mesh_shape=(2, 4))
    assert dict(grok.mesh.shape) == {"data": 2, "model": 4}
    rows = grok.generate([P0, PA, PB], max_new_tokens=NEW, temperature=0)
    compared = sum(assert_same_greedy(c, alone[name])
                   for c, name in zip(rows, ["P0", "PA", "PB"], strict=True))
    assert compared >= 30


# --- seeds -----------------------------------------------------------------------------


def test_seeds_reproduce_and_differ(grok, alone):
    """Same seed and settings: the same tokens, alone or sharing a batch at either position
    (a row's keys come from its own seed and step only). Exact: the row's logits could at
    most move by bf16 noise across batch shapes, which flips a draw only when two
    Gumbel-perturbed logits lie within 1/32; measured identical. Other seeds differ."""
    settings = dict(max_new_tokens=NEW, temperature=1.0)
    first = grok.generate(P0, seed=42, **settings)
    assert grok.generate(P0, seed=42, **settings).output_ids == first.output_ids
    batch = grok.generate([PB, P0, PA], seed=[5, 42, 9], **settings)
    shuffled = grok.generate([P0, PA, PB], seed=[42, 9, 5], **settings)
    assert batch[1].output_ids == first.output_ids
    assert shuffled[0].output_ids == first.output_ids
    assert shuffled[2].output_ids == batch[0].output_ids
    assert shuffled[1].output_ids == batch[2].output_ids
    other = grok.generate(P0, seed=43, **settings)
    assert other.output_ids != first.output_ids
    assert first.output_ids != alone["P0"].output_ids  # temperature 1 does sample


# --- stopping --------------------------------------------------------------------------


def test_eos_stops_row(grok):
    eos = grok.config.eos_token
    c = grok.generate(P0, max_new_tokens=NEW, temperature=0, allowed_tokens=[eos])
    assert (c.output_ids, c.finish_reason, c.text) == ([eos], "eos", "")

    # Greedy over {1687, eos}: PE's row takes EOS at once, the others never (margins in
    # the comment at the top); the finished row does not stop or change the others.
    rows = grok.generate([P0, PE, PB], max_new_tokens=NEW, temperature=0,
                         allowed_tokens=[1687, eos])
    assert (rows[1].output_ids, rows[1].finish_reason, rows[1].text) == ([eos], "eos", "")
    for c in (rows[0], rows[2]):
        assert c.output_ids == [1687] * NEW and c.finish_reason == "length"
        if grok.tokenizer is not None:
            assert c.text == "fig" * NEW


@pytest.mark.parametrize("stop, text, n_tokens", [
    ("issues", "figfigfigfig ", 5),
    ("fig issues", "figfigfig", 5),  # spans tokens 4 ("fig") and 5 (" issues")
    ("gfi", "fi", 2),  # spans tokens 1 and 2
    (["zzz", "issues", "fig issues"], "figfigfig", 5),  # cut at the earliest match
])
def test_stop_string(tokenized, reference, stop, text, n_tokens):
    """The greedy text is 'figfigfigfig issues issues issues...'; it is cut before the stop
    string, after the token that completes it (all within the 6 clear steps)."""
    settings = dict(max_new_tokens=NEW, temperature=0, stop=stop)
    c = tokenized.generate(P0, **settings)
    assert (c.text, c.finish_reason) == (text, "stop")
    assert c.output_ids == reference["greedy_ids"][:n_tokens]
    pieces = list(tokenized.stream(P0, **settings))
    assert pieces and all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == text
    stops = [stop] if isinstance(stop, str) else stop
    assert not any(s in p for s in stops for p in pieces)


def test_stop_in_one_row_leaves_the_others(tokenized, alone):
    rows = tokenized.generate([P0, PB, PA], max_new_tokens=NEW, temperature=0,
                              stop="issues")
    assert (rows[0].text, rows[0].finish_reason) == ("figfigfigfig ", "stop")
    assert len(rows[0].output_ids) == 5
    for c, name in ((rows[1], "PB"), (rows[2], "PA")):
        assert "issues" not in alone[name].text
        assert c.finish_reason == "length" and len(c.output_ids) == NEW
        assert assert_same_greedy(c, alone[name]) == NEW
        assert c.text == alone[name].text


# --- log-probabilities and alternatives ------------------------------------------------


def test_logprobs_and_alternatives(grok, alone):
    """output_logprobs[i] is log_softmax(Grok.logits(prompt + output))[position, token]
    within LOGPROB_TOL (measured 0.031: one bf16 step of the logits); top_alternatives has 8
    distinct ids, best first, the first being the greedy token."""
    c = alone["P0"]
    assert c.finish_reason == "length"
    assert len(c.output_ids) == len(c.output_logprobs) == len(c.top_alternatives) == NEW
    logits = grok.logits([P0 + c.output_ids[:-1]])[0, len(P0) - 1:]  # [12, V]
    want = log_softmax(logits)
    np.testing.assert_allclose(c.output_logprobs, want[np.arange(NEW), c.output_ids],
                               atol=LOGPROB_TOL, rtol=0)
    for i, (tok, lp, alts) in enumerate(zip(c.output_ids, c.output_logprobs,
                                            c.top_alternatives, strict=True)):
        ids, lps = [a[0] for a in alts], [a[1] for a in alts]
        assert len(alts) == 8 and len(set(ids)) == 8
        assert lps == sorted(lps, reverse=True)
        assert ids[0] == tok and lps[0] == lp  # greedy: the best alternative, same number
        np.testing.assert_allclose(lps, want[i, ids], atol=LOGPROB_TOL, rtol=0)
        assert want[i, tok] >= want[i].max() - 2 * LOGPROB_TOL


# --- sampling filters ------------------------------------------------------------------


def test_top_k(grok, alone):
    """Over 48 draws at temperature 1: top_k=1 only ever takes a most likely token (the
    greedy path, up to its first near-tie); top_k=3 only the 3 most likely, by the engine's
    own log-probs (exact; ties kept) and by `Grok.logits` (within LOGIT_TOL)."""
    best = sample4(grok, top_k=1)
    for r, i, tok, lp, alts in draws(best):
        assert lp == alts[0][1], (r, i, tok)
    for c in best:
        assert assert_same_greedy(c, alone["P0"]) == 6

    rows = sample4(grok, top_k=3)
    for r, i, tok, lp, alts in draws(rows):
        assert rank(lp, alts) < 3, (r, i, tok, alts)
    for c in rows:
        logits = grok.logits([P0 + c.output_ids[:-1]])[0, len(P0) - 1:]
        third = np.sort(logits, axis=-1)[:, -3]
        assert (logits[np.arange(NEW), c.output_ids] >= third - LOGIT_TOL).all()
    # Not vacuous: top_k=3 does draw below the best, and without top_k draws go further.
    assert any(rank(lp, alts) > 0 for *_, lp, alts in draws(rows))
    assert any(rank(lp, alts) >= 3 for *_, lp, alts in draws(sample4(grok, top_k=0)))


def test_top_p(grok):
    """Nucleus as the release: a token is kept iff the tokens strictly more likely than it
    hold at most top_p of the probability. Checked on all 48 draws with the engine's own
    log-probs; slack 1e-3 for float32 cumulative sums over 4096 terms (n * eps ~ 2.5e-4)."""
    top_p = 0.03

    def mass_above(lp, alts):
        return sum(np.exp(a_lp) for _, a_lp in alts if a_lp > lp)

    rows = sample4(grok, top_p=top_p)
    for r, i, tok, lp, alts in draws(rows):
        assert mass_above(lp, alts) <= top_p + 1e-3, (r, i, tok, alts)
    # Not vacuous: it draws below the best, and with top_p 1 draws fall outside the nucleus.
    assert any(rank(lp, alts) > 0 for *_, lp, alts in draws(rows))
    assert any(mass_above(lp, alts) > top_p + 1e-3
               for *_, lp, alts in draws(sample4(grok, top_p=1.0)))


def test_allowed_tokens(grok):
    allowed = [7, 500, 1310, 2400, 4095]
    sampled = [tok for *_, tok, _, _ in draws(sample4(grok, allowed_tokens=allowed))]
    assert set(sampled) <= set(allowed)
    assert len(set(sampled)) >= 2  # it does sample among them
    greedy = grok.generate(P0, max_new_tokens=NEW, temperature=0, allowed_tokens=allowed)
    assert set(greedy.output_ids) <= set(allowed)


# --- compiled steps --------------------------------------------------------------------


def test_same_bucket_compiles_nothing_new(grok):
    rng = np.random.default_rng(7)
    ids = [int(t) for t in rng.integers(3, 4096, 20)]
    grok.generate(ids[:5], max_new_tokens=NEW, temperature=0)
    count = grok.compile_count
    assert count >= 2  # a prefill and a decode step
    grok.generate(ids[:6], max_new_tokens=NEW, temperature=0)  # same bucket 16
    assert grok.compile_count == count
    grok.generate(ids[:20], max_new_tokens=NEW, temperature=0)  # bucket 32: a new prefill
    assert grok.compile_count > count


# --- streaming -------------------------------------------------------------------------


def test_stream(tokenized, reference):
    settings = dict(max_new_tokens=NEW, temperature=0)
    pieces = list(tokenized.stream(reference["prompt"], **settings))
    assert len(pieces) > 1 and all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == tokenized.generate(reference["prompt"], **settings).text

    pairs = list(tokenized.stream([reference["prompt"], PB, PA], **settings))
    assert all(isinstance(i, int) and isinstance(p, str) for i, p in pairs)
    assert {i for i, _ in pairs} == {0, 1, 2}
    completions = tokenized.generate([reference["prompt"], PB, PA], **settings)
    for index in (0, 1, 2):
        assert "".join(p for i, p in pairs if i == index) == completions[index].text
    assert completions[0].text == "".join(pieces)


# --- bad input -------------------------------------------------------------------------


BAD_INPUT = [
    ("", {}, "prompt 0 is empty"),
    ([[]], {}, "prompt 0 is empty"),
    ([], {}, "no prompts"),
    ([5] * 250, {"max_new_tokens": 10},
     r"250 tokens; with max_new_tokens=10 it needs 260 positions, more than sequence_len=256"),
    (P0, {"temperature": -0.5}, r"temperature must be .*>= 0.*got -0\.5"),
    (P0, {"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0\.0"),
    (P0, {"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1\.5"),
    (P0, {"top_k": -1}, r"top_k must be an integer in \[0, .*got -1"),
    ([1, 4096], {}, r"token id 4096 is outside \[0, vocab_size=4096\)"),
    ([-1, 5], {}, r"token id -1 is outside \[0, vocab_size=4096\)"),
    (P0, {"max_new_tokens": 0}, r"max_new_tokens must be an integer >= 1 \(0 only with "
                                r"prompt_logprobs\), got 0"),
]


@pytest.mark.parametrize("prompt, settings, message", BAD_INPUT)
def test_bad_input_is_a_clear_error(grok, prompt, settings, message):
    with pytest.raises(ValueError, match=message):
        grok.generate(prompt, **settings)


def test_text_needs_a_tokenizer(grok):
    bare = Grok(grok.config, grok.params, grok.mesh, layers=grok.layers)
    with pytest.raises(ValueError, match="text prompts need a tokenizer"):
        bare.generate("The answer", max_new_tokens=NEW)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        bare.generate(P0, max_new_tokens=NEW, stop="fig")


def test_text_prompt_outside_model_vocab_is_a_clear_error(tokenized):
    assert tokenized.tokenizer.encode("hello") == [21560]
    # 1 + 16 tokens: the same prompt bucket and cache length as the other tests.
    with pytest.raises(ValueError, match=r"21560.*vocab_size=4096"):
        tokenized.generate("hello", max_new_tokens=16, temperature=0)
