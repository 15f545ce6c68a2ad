"""8-bit weights: dequantisation, quantisation, group checks and the quantised matmul."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from grok.params import release_groups
from grok.quant import (
    QuantizedWeight8bit,
    check_groups,
    dequantize,
    qdot,
    quantize,
)

BF16 = ml_dtypes.bfloat16


def _random_qw(rng, lead, k, n, g):
    weight = rng.integers(-127, 128, size=(*lead, k, n), dtype=np.int8)
    scales = rng.uniform(0.001, 2.0, size=(*lead, g, n)).astype(BF16)
    return weight, scales


def _np_dequant(weight, scales):
    *lead, k, n = weight.shape
    g = scales.shape[-2]
    grouped = weight.astype(np.float32).reshape(*lead, g, k // g, n)
    return (grouped * scales.astype(np.float32)[..., :, None, :]).reshape(weight.shape)


@pytest.mark.parametrize("lead", [(), (3,)])
@pytest.mark.parametrize("g", [1, 2, 4])
def test_dequantize_matches_numpy(g, lead):
    rng = np.random.default_rng(g)
    k, n = 8, 5
    weight, scales = _random_qw(rng, lead, k, n, g)
    out = dequantize(QuantizedWeight8bit(jnp.asarray(weight), jnp.asarray(scales)))
    assert out.dtype == jnp.bfloat16 and out.shape == (*lead, k, n)
    # int8 (8 bits) * bf16 (8 significant bits) is exact in float32, so the only rounding
    # is the final one to bf16: the comparison is exact.
    expected = _np_dequant(weight, scales).astype(BF16)
    np.testing.assert_array_equal(np.asarray(out), expected)
    # in float32 the result is the exact product
    out32 = dequantize(QuantizedWeight8bit(weight, scales), jnp.float32)
    np.testing.assert_array_equal(np.asarray(out32), _np_dequant(weight, scales))


def test_dequantize_group_rows():
    # group g scales exactly rows g*K/G .. (g+1)*K/G - 1, not interleaved rows
    weight = np.ones((4, 1), np.int8)
    scales = np.array([[1.0], [2.0]], BF16)
    out = dequantize(QuantizedWeight8bit(weight, scales), jnp.float32)
    np.testing.assert_array_equal(np.asarray(out)[:, 0], [1.0, 1.0, 2.0, 2.0])


def test_dequantize_float_passthrough():
    w = np.array([[1.0, 1.0 + 2**-10]], np.float32)
    out = dequantize(w)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out), w.astype(BF16))


@pytest.mark.parametrize("lead, g", [((), 1), ((), 4), ((2,), 2), ((2,), 8)])
def test_quantize_round_trip(lead, g):
    rng = np.random.default_rng(7)
    k, n = 16, 6
    w = rng.normal(size=(*lead, k, n)).astype(np.float32) * rng.uniform(0.1, 10, size=n)
    q = quantize(w, g)
    assert q.weight.dtype == np.int8 and q.weight.shape == w.shape
    assert q.scales.dtype == BF16 and q.scales.shape == (*lead, g, n)
    assert q.groups == g
    assert np.abs(q.weight.astype(np.int32)).max() <= 127
    back = np.asarray(dequantize(q, jnp.float32))
    # Each value is rint(w / s) * s with |w / s| <= 127 * (1 + 2^-8) (s is amax/127 rounded
    # to bf16, relative error <= 2^-9 each way), so the error is at most half a step s, plus
    # the clip at 127 which costs at most amax * 2^-8 < s; allow s (one step) per group.
    steps = np.repeat(q.scales.astype(np.float32), k // g, axis=-2)
    err = np.abs(back - w)
    assert np.all(err <= steps)
    # and for all but the clipped extremes, within half a step (+ slop for the float32
    # quotient w / s, relative 2^-24 of up to 127 steps: 1e-5 of a step)
    inner = np.abs(w) < 126 * steps
    assert np.all(err[inner] <= (0.5 + 1e-5) * steps[inner])
    # the quantisation is faithful: the group maximum uses (nearly) the full int8 range
    assert np.abs(q.weight.astype(np.int32)).max() >= 126


def test_quantize_zero_columns():
    w = np.zeros((8, 3), np.float32)
    w[:, 1] = np.linspace(-1, 1, 8)
    q = quantize(w, 2)
    out = np.asarray(dequantize(q, jnp.float32))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[:, 0], 0.0)
    np.testing.assert_array_equal(out[:, 2], 0.0)
    np.testing.assert_array_equal(q.weight[:, [0, 2]], 0)
    np.testing.assert_array_equal(q.scales.astype(np.float32)[:, [0, 2]], 0.0)


@pytest.mark.parametrize("g", [0, 3, 5])
def test_quantize_groups_must_divide_k(g):
    with pytest.raises(ValueError, match="groups"):
        quantize(np.ones((8, 4), np.float32), g)


def test_quantize_rejects_vectors():
    with pytest.raises(ValueError, match="rank"):
        quantize(np.ones((8,), np.float32))


@pytest.mark.parametrize("g", [1, 2, 3, 4, 6, 12])
def test_check_groups_accepts_divisors(g):
    check_groups((12, 5), (g, 5))
    check_groups((8, 12, 5), (8, g, 5), name="moe/linear_1/w")


@pytest.mark.parametrize("weight_shape, scales_shape", [
    ((12, 5), (5, 5)),  # G does not divide K
    ((12, 5), (0, 5)),  # no group
    ((12, 5), (1, 4)),  # wrong N
    ((12, 5), (1, 1, 5)),  # rank mismatch
    ((8, 12, 5), (4, 1, 5)),  # wrong experts axis
    ((12,), (1,)),  # a vector is no weight
])
def test_check_groups_rejects(weight_shape, scales_shape):
    pattern = rf"attn/w.*{_bracket(scales_shape)}.*{_bracket(weight_shape)}"
    with pytest.raises(ValueError, match=pattern):
        check_groups(weight_shape, scales_shape, name="attn/w")


def _bracket(shape):
    return r"\[" + ", ".join(str(s) for s in shape) + r"\]"


@pytest.mark.parametrize("path, shape, expected", [
    ("transformer/decoder_layer_0/multi_head_attention/linear/w", (6144, 6144), 8),
    ("transformer/decoder_layer_3/multi_head_attention/linear/w", (12, 6), 1),  # 12 % 8
    ("transformer/decoder_layer_0/moe/linear_1/w", (8, 32768, 6144), 8),
    ("transformer/decoder_layer_1/moe/linear_1/w", (4, 42, 32), 1),  # 42 % 8
    ("transformer/decoder_layer_0/multi_head_attention/query/w", (6144, 6144), 1),
    ("transformer/decoder_layer_0/multi_head_attention/key/w", (6144, 1024), 1),
    ("transformer/decoder_layer_0/multi_head_attention/value/w", (6144, 1024), 1),
    ("transformer/decoder_layer_0/moe/linear/w", (8, 6144, 32768), 1),
    ("transformer/decoder_layer_0/moe/linear_v/w", (8, 6144, 32768), 1),
    ("language_model/in_out_embed/embeddings", (131072, 6144), None),
    ("language_model/rms_norm/scale", (6144,), None),
    ("transformer/decoder_layer_0/rms_norm_2/scale", (6144,), None),
    ("transformer/decoder_layer_0/router/w", (6144, 8), None),
])
def test_release_groups(path, shape, expected):
    assert release_groups(path, shape) == expected


def test_quantized_weight_is_a_pytree():
    rng = np.random.default_rng(0)
    weight, scales = _random_qw(rng, (2,), 8, 3, 4)
    qw = QuantizedWeight8bit(jnp.asarray(weight), jnp.asarray(scales))
    assert qw.shape == (2, 8, 3)
    leaves, treedef = jax.tree_util.tree_flatten(qw)
    assert len(leaves) == 2
    assert leaves[0].dtype == jnp.int8 and leaves[1].dtype == jnp.bfloat16
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(rebuilt, QuantizedWeight8bit) and rebuilt.shape == (2, 8, 3)

    @jax.jit
    def f(w):
        return dequantize(w, jnp.float32), QuantizedWeight8bit(w.weight * 2, w.scales)

    out, doubled = f(qw)
    np.testing.assert_array_equal(np.asarray(out), _np_dequant(weight, scales))
    assert isinstance(doubled, QuantizedWeight8bit)
    np.testing.assert_array_equal(np.asarray(doubled.weight), weight * 2)
    # tree_map reaches both leaves
    mapped = jax.tree.map(lambda x: x.shape, qw)
    assert (mapped.weight, mapped.scales) == ((2, 8, 3), (2, 4, 3))


@pytest.mark.parametrize("g", [1, 4])
def test_qdot_matches_numpy(g):
    rng = np.random.default_rng(3)
    k, n = 64, 24
    weight, scales = _random_qw(rng, (), k, n, g)
    qw = QuantizedWeight8bit(jnp.asarray(weight), jnp.asarray(scales))
    x = rng.normal(size=(2, 3, k)).astype(BF16)
    out = jax.jit(lambda x, w: qdot("btk,kn->btn", x, w))(jnp.asarray(x), qw)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 3, n)
    w_bf16 = _np_dequant(weight, scales).astype(BF16)
    ref = np.einsum("btk,kn->btn", x.astype(np.float64), w_bf16.astype(np.float64))
    # The output is the float32 accumulation of 64 exact bf16 products (error <= ~64 * 2^-24
    # of |x| @ |w|, bounded here by 1e-6 of it), rounded once to bf16 (8 significant bits:
    # relative error <= 2^-8). Nothing else may differ from the float64 reference.
    # Measured: max relative error 0.0038 (< 2^-8 = 0.0039), 100% equal to round(ref).
    bound = np.einsum("btk,kn->btn", np.abs(x.astype(np.float64)),
                      np.abs(w_bf16.astype(np.float64)))
    err = np.abs(np.asarray(out, np.float64) - ref)
    assert np.all(err <= 2**-8 * np.abs(ref) + 1e-6 * bound)
    # and it is the bf16 rounding of the f32-accumulated product almost everywhere
    exact = ref.astype(np.float32).astype(BF16)
    assert np.mean(np.asarray(out) == exact) > 0.95


def test_qdot_float_weight_uses_weight_dtype():
    # a float32 weight is used as float32: x (bf16) is upcast, the result rounds to bf16
    rng = np.random.default_rng(4)
    x = rng.normal(size=(5, 16)).astype(BF16)
    w = rng.normal(size=(16, 7)).astype(np.float32)
    out = qdot("nk,kv->nv", jnp.asarray(x), jnp.asarray(w))
    assert out.dtype == jnp.bfloat16
    ref = x.astype(np.float64) @ w.astype(np.float64)
    # f32 accumulation (<= 1e-6 of |x| @ |w|) then one bf16 rounding (<= 2^-8 relative)
    bound = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64))
    err = np.abs(np.asarray(out, np.float64) - ref)
    assert np.all(err <= 2**-8 * np.abs(ref) + 1e-6 * bound)
