"""Scanned layers: one compiled layer body over stacked weights gives the unrolled model's
numbers, loads the release's per-layer files into stacked arrays bit for bit, and updates
the stacked KV cache in place."""

import jax
import numpy as np
import pytest
from helpers import assert_matches_reference
from jax.sharding import PartitionSpec as P

from grok import Grok, checkpoint, model, sharding
from grok.config import GROK_1, NANO, TINY
from grok.engine.engine import PrefillRow
from grok.engine.request import GenerationSettings
from grok.errors import GrokError
from grok.layers import split_release_path, stack_params, unstack_params

NEW = 12


def test_scan_tree_stacks_every_layer_parameter():
    release = model.abstract_params(TINY)
    per_layer = {split_release_path(m + "/")[0].rstrip("/") for m in release
                 if split_release_path(m + "/") is not None}
    stacked = model.abstract_params(TINY, layers="scan")
    assert {m for m in stacked if m.startswith("transformer/")} == per_layer
    assert "transformer/moe/linear" in per_layer  # experts: outside the scanned body
    assert stacked["language_model/in_out_embed"] == release["language_model/in_out_embed"]
    full = model.abstract_params(GROK_1, layers="scan")  # one layer traced, not 64
    w = full["transformer/moe/linear_1"]["w"]
    assert w.weight.shape == (64, 8, 32768, 6144) and w.scales.shape == (64, 8, 8, 6144)
    assert full["transformer/decoder_layer/rms_norm"]["scale"].shape == (64, 6144)


def test_stack_and_unstack_round_trip():
    release = jax.tree.map(np.asarray, jax.jit(lambda key: model.init_params(NANO, key))(
        jax.random.key(0)))
    stacked = stack_params(release, NANO.num_layers)
    assert jax.tree.map(np.shape, stacked) == jax.tree.map(
        np.shape, model.abstract_params(NANO, quantized=False, layers="scan"))
    back = unstack_params(stacked, NANO.num_layers)
    assert jax.tree.structure(back) == jax.tree.structure(release)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(release), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(GrokError, match=r"expected layers 0\.\.2"):
        stack_params(release, 3)


@pytest.mark.parametrize("mesh_shape", [(1, 1), (2, 4)])
def test_stacked_load_equals_per_layer_load(fixture_dir, mesh_shape):
    """Every layer slice of every stacked array (int8 weights, bf16 scales, float norms)
    holds exactly the bytes the per-layer load places, and sits where the rule says."""
    mesh = sharding.make_mesh(mesh_shape)

    def load(stacked):
        return checkpoint.load_checkpoint(
            fixture_dir, model.abstract_params(TINY),
            lambda path, kind, shape: sharding.param_sharding(mesh, path, kind, shape),
            stacked=stacked)

    per_layer, stacked = load(False), load(True)
    expect = model.abstract_params(TINY, layers="scan")
    assert jax.tree.structure(stacked) == jax.tree.structure(expect)
    assert [(a.shape, a.dtype) for a in jax.tree.leaves(stacked)] == [
        (a.shape, a.dtype) for a in jax.tree.leaves(expect)]
    w = stacked["transformer/moe/linear"]["w"].weight
    assert w.sharding.spec == P(None, None, "data", "model")
    unstacked = unstack_params(jax.tree.map(np.asarray, stacked), TINY.num_layers)
    assert jax.tree.structure(unstacked) == jax.tree.structure(per_layer)
    for a, b in zip(jax.tree.leaves(unstacked), jax.tree.leaves(per_layer), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, np.asarray(b))


@pytest.fixture(scope="module")
def reference(fixture_dir):
    import json
    ref = json.loads((fixture_dir / "reference.json").read_text())
    return ref, np.load(fixture_dir / "reference_logits.npy")


@pytest.mark.parametrize("mesh_shape, weights", [
    ((1, 1), None), *(pytest.param(m, "int8", marks=pytest.mark.slow) for m in [(1, 8), (2, 4)])])
def test_scan_matches_release_and_unrolled(fixture_dir, reference, mesh_shape, weights):
    ref, want = reference
    tokens = np.asarray(ref["tokens"])
    scan = Grok.load(fixture_dir, "tiny", mesh_shape=mesh_shape, weights=weights,
                     layers="scan")
    unrolled = Grok.load(fixture_dir, "tiny", mesh_shape=mesh_shape, weights=weights,
                         layers="unrolled")
    got = scan.logits(tokens)
    assert_matches_reference(got, want)
    # The same ops on the same values, but XLA:CPU fuses and blocks the loop body's dots
    # otherwise, so float32 sums round to bf16 differently here and there and the change
    # grows through the layers: the tolerance of two independent bf16 implementations
    # (helpers.py; measured max 0.11, 147 of 65536 logits differing).
    assert_matches_reference(got, unrolled.logits(tokens))
    c = scan.generate(ref["prompt_ids"], max_new_tokens=NEW, temperature=0)
    assert c.output_ids[:6] == ref["greedy_ids"][:6]  # up to the release's first near-tie


def test_scan_routing_matches_unrolled(fixture_dir, reference):
    tokens = np.asarray(reference[0]["tokens"])
    scan = Grok.load(fixture_dir, "tiny", mesh_shape=(1, 1), layers="scan")
    unrolled = Grok.load(fixture_dir, "tiny", mesh_shape=(1, 1), layers="unrolled")
    a, b = scan.routing(tokens), unrolled.routing(tokens)
    assert a.experts.shape == (*tokens.shape, TINY.num_layers, 2)
    # The router reads bf16 activations, which the two programs round differently here and
    # there (see above): a gate moves by up to a few bf16 steps of its logits (measured
    # 0.01), and a choice may flip only where two experts' gates are that close.
    np.testing.assert_allclose(a.gates, b.gates, atol=0.03)
    same = (a.experts == b.experts).all(-1)
    assert same.mean() >= 0.9
    close = np.abs(b.gates[..., 1] - b.gates[..., 0]) < 0.03
    assert (same | close | (a.gates[..., 1] < 0.06)).all()


def test_decode_step_updates_the_stacked_cache_in_place(fixture_dir):
    """The decode state is donated and aliased to the step's output, and the step's
    temporaries do not grow with the cache (8 slots against 64, same rows): no per-step
    copy of any layer's keys or values. (On CPU the temporaries hold
    the layer's sliced weights; they are the same in both.)"""
    grok = Grok.load(fixture_dir, "tiny", mesh_shape=(1, 1), layers="scan")
    figures = []
    for slots in (8, 64):
        engine = grok.engine(max_batch=slots, max_seq_len=256)
        state = engine.init_state()
        request = engine.make_request([5, 6, 7], GenerationSettings(max_new_tokens=2))
        state, _, _ = engine.prefill([PrefillRow(request, 0, 0, 3)], state)
        active = engine.put_active(np.arange(engine.slots) == 0)
        state, _ = engine.generate(state, active, rows=engine.rows_for(1), filled=4)
        cache_bytes = state.cache.k.nbytes + state.cache.v.nbytes
        decode = engine.programs()[("decode", 1)]
        memory = decode.memory_analysis()
        assert memory.alias_size_in_bytes >= cache_bytes
        figures.append((cache_bytes, memory.temp_size_in_bytes))
    (small_cache, small_temp), (big_cache, big_temp) = figures
    assert big_cache == 8 * small_cache
    assert big_temp - small_temp < (big_cache - small_cache) / 16
