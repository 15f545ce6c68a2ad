"""Sparse expert dispatch against the dense (release) formulation, and the weight modes.

Tolerance for sparse vs dense: both compute each expert's output in bf16 from the same
bf16 operands with float32 accumulation; only the dot's blocking (one row, a tile of
rows, or all rows) changes the float32 summation order, which can move a bf16 result by
one unit in the last place. We allow 1 ulp of the largest output (2^-7 relative).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_matches_reference

from grok import Grok, moe
from grok.quant import ExpertWeights, quantize

E, D, F, X = 8, 32, 48, 2


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    return (quantize(rng.normal(size=(E, D, F)) / 6, 1),
            quantize(rng.normal(size=(E, D, F)) / 6, 1),
            quantize(rng.normal(size=(E, F, D)) / 7, 8))


def split(w):
    return ExpertWeights(jax.tree.map(lambda a, i=i: a[i], w) for i in range(E))


def routing(n: int, kind: str, seed: int = 1):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, E)).astype(np.float32)
    if kind == "all-to-one":  # every token's first choice is expert 3
        logits[:, 3] += 10
    if kind == "idle-experts":  # experts 0..5 get no tokens at all
        logits[:, 6:] += 10
    gates, chosen = jax.lax.top_k(jax.nn.softmax(jnp.asarray(logits)), X)
    return gates, chosen


def assert_close_bf16(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=2.0 ** -7 * np.abs(want).max())


@pytest.mark.parametrize("kind", ["random", "all-to-one", "idle-experts"])
@pytest.mark.parametrize("n", [1, 2, 7, 64, 300])
@pytest.mark.parametrize("layout", ["stacked", "per-expert"])
def test_sparse_matches_dense(weights, n, kind, layout):
    x = jnp.asarray(np.random.default_rng(n).normal(size=(n, D)), jnp.bfloat16)
    gates, chosen = routing(n, kind)
    if kind == "idle-experts":
        assert set(np.unique(chosen)) == {6, 7}
    w = weights if layout == "stacked" else tuple(split(a) for a in weights)
    want = jax.jit(moe.dense)(x, gates, chosen, *weights)
    got = jax.jit(moe.sparse)(x, gates, chosen, *w)
    assert got.shape == (n, D) and got.dtype == jnp.bfloat16
    assert_close_bf16(got, want)


@pytest.mark.parametrize("n", [3, 37])  # the per-expert and the tiled path
@pytest.mark.parametrize("layout", ["stacked", "per-expert"])
def test_padding_runs_through_no_expert(weights, n, layout):
    """Tokens that are not live (a step's padding) come out zero, which no expert's output
    gives, while the live ones get dense's numbers."""
    x = jnp.asarray(np.random.default_rng(n + 1).normal(size=(n, D)), jnp.bfloat16)
    gates, chosen = routing(n, "random")
    live = np.random.default_rng(n).random(n) < 0.6
    w = weights if layout == "stacked" else tuple(split(a) for a in weights)
    got = np.asarray(jax.jit(moe.sparse)(x, gates, chosen, *w, jnp.asarray(live)), np.float32)
    want = moe.dense(x, gates, chosen, *weights)
    assert_close_bf16(got[live], np.asarray(want, np.float32)[live])
    assert np.all(got[~live] == 0) and np.all(np.abs(got[live]).max(axis=1) > 0)


@pytest.mark.parametrize("tile", [1, 8, 128])
def test_grouped_tiles_of_any_size(weights, tile):
    """Tiles smaller than, equal to and larger than the expert groups."""
    n = 37
    x = jnp.asarray(np.random.default_rng(5).normal(size=(n, D)), jnp.bfloat16)
    gates, chosen = routing(n, "random")
    want = moe.dense(x, gates, chosen, *weights)
    got = jax.jit(lambda *a: moe.grouped(*a, tile=tile))(x, gates, chosen, *weights)
    assert_close_bf16(got, want)


def test_dispatch_picks_by_token_count(weights, monkeypatch):
    calls = []
    monkeypatch.setattr(moe, "per_expert", lambda *a: calls.append("per_expert") or a[0])
    monkeypatch.setattr(moe, "grouped",
                        lambda *a, tile, live: calls.append(("grouped", tile)) or a[0])
    x = jnp.zeros((4, D), jnp.bfloat16)
    gates, chosen = routing(4, "random")
    moe.sparse(x, gates, chosen, *weights)  # 8 copies for 8 experts: one each
    moe.sparse(jnp.zeros((300, D), jnp.bfloat16), *routing(300, "random"), *weights)
    assert calls == ["per_expert", ("grouped", 128)]


@pytest.mark.parametrize("layout", ["stacked", "per-expert"])
def test_program_size_does_not_grow_with_the_batch(weights, layout):
    """Compile time follows the program's size: the few-token path must hold E expert
    bodies for 1 token as for 4 (a per-copy switch held 2 x E of them for 1, 8 x E for 4)."""
    w = weights if layout == "stacked" else tuple(split(a) for a in weights)

    def size(n):
        x = jnp.zeros((n, D), jnp.bfloat16)
        text = jax.jit(moe.sparse).lower(x, *routing(n, "random"), *w).as_text()
        return text.count("dot_general")

    assert size(1) == size(4) == 3 * E


def test_unknown_strategy_is_an_error(weights):
    with pytest.raises(ValueError, match="unknown MoE strategy 'ragged'"):
        moe.dispatch("ragged", jnp.zeros((1, D), jnp.bfloat16), *routing(1, "random"),
                     *weights)


# --- whole model: weight modes and strategies on the fixture --------------------------

@pytest.fixture(scope="module")
def reference(fixture_dir):
    ref = json.loads((fixture_dir / "reference.json").read_text())
    return ref, np.load(fixture_dir / "reference_logits.npy")


@pytest.mark.parametrize("weights_mode, moe_mode", [
    ("int8", "sparse"), ("dequantized", "sparse"),
    *(pytest.param(w, "dense", marks=pytest.mark.slow) for w in ("int8", "dequantized"))])
def test_weight_modes_give_the_same_logits(fixture_dir, reference, weights_mode, moe_mode):
    """Both storage modes compute with the same bf16 weight values, so they agree with each
    other within the sparse/dense tolerance and with the release's logits within the
    parity tolerances (see test_parity.py), and reproduce its greedy continuation."""
    ref, want = reference
    grok = Grok.load(fixture_dir, "tiny", mesh_shape=(1, 1), weights=weights_mode, moe=moe_mode)
    leaves = jax.tree_util.tree_leaves(grok.params)
    assert any(leaf.dtype == jnp.int8 for leaf in leaves) == (weights_mode == "int8")
    got = grok.logits(ref["tokens"])
    assert_matches_reference(got, want)
    baseline = Grok.load(fixture_dir, "tiny", mesh_shape=(1, 1), weights="int8", moe="dense")
    np.testing.assert_allclose(got, baseline.logits(ref["tokens"]), rtol=0, atol=2 / 32)
    out = grok.generate(ref["prompt_ids"], max_new_tokens=len(ref["greedy_ids"]),
                        temperature=0)
    clear = next(i for i, gap in enumerate(ref["greedy_top2_gaps"]) if gap <= 0.125)
    assert out.output_ids[:clear] == ref["greedy_ids"][:clear]


def test_cpu_splits_expert_weights(fixture_dir):
    grok = Grok.load(fixture_dir, "tiny", mesh_shape=(2, 2))
    w = grok.params["transformer/decoder_layer_0/moe/linear"]["w"]
    assert isinstance(w, ExpertWeights) and w.shape == (8, 256, 1368)
    assert w.experts[0].dtype == jnp.float32  # CPU default: dequantized
    # Each expert keeps the stacked weight's placement: K over data, N over model.
    want = jax.sharding.NamedSharding(grok.mesh, jax.sharding.PartitionSpec("data", "model"))
    assert w.experts[0].sharding.is_equivalent_to(want, 2)


def test_bad_load_options(fixture_dir):
    with pytest.raises(ValueError, match="weights must be one of"):
        Grok.load(fixture_dir, "tiny", weights="fp8")
    with pytest.raises(ValueError, match="moe must be one of"):
        Grok.load(fixture_dir, "tiny", moe="ragged")
