"""Unit checks of each piece of the forward pass against small hand-written NumPy."""

import dataclasses

import haiku as hk
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from grok import moe
from grok.config import GROK_1, NANO
from grok.kv_cache import init_cache
from grok.model import (
    Attention,
    MoE,
    Part,
    Reach,
    RMSNorm,
    Segment,
    abstract_params,
    apply_rope,
    build,
    init_params,
    rotate_half,
    soft_cap,
)
from grok.quant import QuantizedWeight8bit, quantize

BF16 = ml_dtypes.bfloat16


def bf16(x):
    """Rounds to bf16 (round to nearest even), as a float64 array for the references."""
    return np.asarray(x, np.float64).astype(np.float32).astype(BF16).astype(np.float64)


def bf16_weight(rng, shape, scale=1.0):
    """A float32 weight holding bf16-representable values (as `Grok.load` stores them), so
    the model's float32 matmuls and the float64 references use the same numbers."""
    return (rng.normal(size=shape) * scale).astype(BF16).astype(np.float32)


def ulp_distance(a, b):
    """Distance in bf16 units in the last place between two bf16 arrays."""
    def ordered(x):
        bits = np.asarray(x, BF16).view(np.int16).astype(np.int32)
        return np.where(bits < 0, -(bits & 0x7FFF), bits)
    return np.abs(ordered(a) - ordered(b))


def np_rope(x, positions):
    """Rotate-half RoPE in float64: x [B, T, H, C], positions [B, T]."""
    c = x.shape[-1]
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, c, 2) / c)
    phase = positions[..., None].astype(np.float64) * inv_freq
    phase = np.concatenate([phase, phase], axis=-1)[:, :, None, :]
    x1, x2 = np.split(x, 2, axis=-1)
    rotated = np.concatenate([-x2, x1], axis=-1)
    return x * np.cos(phase) + rotated * np.sin(phase)


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# --- RMSNorm ----------------------------------------------------------------------------


def test_rms_norm_matches_numpy():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2, 5, 16)) * rng.uniform(0.01, 30, size=(2, 5, 1))).astype(BF16)
    scale = rng.uniform(0.5, 2.0, size=16).astype(np.float32)
    fn = hk.without_apply_rng(hk.transform(lambda x: RMSNorm(name="rms_norm")(x)))
    params = fn.init(None, jnp.asarray(x))
    assert jax.tree.map(lambda p: (p.shape, p.dtype), params) == {
        "rms_norm": {"scale": ((16,), jnp.float32)}}
    np.testing.assert_array_equal(params["rms_norm"]["scale"], 1.0)  # init: ones
    out = fn.apply({"rms_norm": {"scale": jnp.asarray(scale)}}, jnp.asarray(x))
    assert out.dtype == jnp.bfloat16 and out.shape == x.shape
    x32 = x.astype(np.float32)
    ref = (x32 * (1 / np.sqrt(np.mean(x32**2, axis=-1, keepdims=True) + np.float32(1e-5)))
           * scale).astype(BF16)
    # Both compute in float32 then round once to bf16; rsqrt vs 1/sqrt may differ by an
    # f32 ulp, which can move a value across a bf16 rounding boundary: at most 1 bf16 ulp.
    # Measured: bit-identical.
    assert ulp_distance(out, ref).max() <= 1
    assert np.mean(np.asarray(out) == ref) > 0.95


def test_rms_norm_epsilon():
    # for a tiny input the 1e-5 epsilon dominates: x * rsqrt(x^2 + 1e-5) ~= x / sqrt(1e-5)
    fn = hk.without_apply_rng(hk.transform(lambda x: RMSNorm(name="rms_norm")(x)))
    x = jnp.full((1, 4), 1e-4, jnp.float32)
    out = fn.apply({"rms_norm": {"scale": jnp.ones(4)}}, x)
    expected = 1e-4 / np.sqrt(1e-8 + 1e-5)
    # float32 throughout: relative 1e-6
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6)


# --- RoPE --------------------------------------------------------------------------------


def test_rotate_half():
    x = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    np.testing.assert_array_equal(rotate_half(x), [-4.0, -5.0, -6.0, 1.0, 2.0, 3.0])


def test_apply_rope_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 3, 16)).astype(np.float32)
    positions = np.stack([np.arange(5, 10), np.arange(17, 22)])  # per-row offsets
    out = apply_rope(jnp.asarray(x), jnp.asarray(positions))
    assert out.dtype == jnp.float32
    ref = np_rope(x.astype(np.float64), positions)
    # float32 phases up to 21 rad (error ~21 * 2^-24) and f32 cos/sin/products: 1e-5 for
    # entries of order 1. Measured: 6e-7.
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    # position 0 is the identity
    zero = apply_rope(jnp.asarray(x), jnp.zeros((2, 5), jnp.int32))
    np.testing.assert_array_equal(np.asarray(zero), x)
    # the lowest frequency pair is not a neighbouring pair: rotate-half, not interleaved
    one = np.asarray(apply_rope(jnp.asarray(x[:1, :1]), jnp.ones((1, 1), jnp.int32)))[0, 0]
    np.testing.assert_allclose(one[:, 0], x[0, 0, :, 0] * np.cos(1) - x[0, 0, :, 8] * np.sin(1),
                               atol=1e-6)


def test_apply_rope_bf16_rounds_once():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 4, 2, 8)).astype(BF16)
    positions = np.arange(3, 7)[None]
    out = apply_rope(jnp.asarray(x), jnp.asarray(positions))
    assert out.dtype == jnp.bfloat16
    ref = np_rope(x.astype(np.float64), positions).astype(np.float32).astype(BF16)
    # computed in float32 and rounded once: equal to the f64 reference's rounding up to 1 ulp
    # (measured: bit-identical)
    assert ulp_distance(out, ref).max() <= 1


def test_rope_preserves_norm_and_relative_position():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(1, 1, 1, 16)).astype(np.float32)
    k = rng.normal(size=(1, 1, 1, 16)).astype(np.float32)

    def rope_at(x, p):
        return np.asarray(apply_rope(jnp.asarray(x), jnp.full((1, 1), p)))[0, 0, 0]

    for p in (0, 1, 7, 100):
        # a rotation: the norm is kept up to float32 rounding (relative 1e-6)
        np.testing.assert_allclose(np.linalg.norm(rope_at(q, p)), np.linalg.norm(q), rtol=1e-6)
    for delta in (0, 3, -5):
        dots = [rope_at(q, m) @ rope_at(k, m - delta) for m in (10, 20, 60)]
        # phases up to 65 rad in float32 (error ~65 * 2^-24 = 4e-6 rad) times |q||k| ~ 16
        np.testing.assert_allclose(dots, dots[0], atol=2e-4)
    # and the dot does change with the relative distance
    d0 = rope_at(q, 10) @ rope_at(k, 10)
    d3 = rope_at(q, 10) @ rope_at(k, 7)
    assert abs(d0 - d3) > 1e-2


# --- soft cap ---------------------------------------------------------------------------


def test_soft_cap():
    x = np.array([-1e6, -100.0, -30.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 30.0, 100.0, 1e6],
                 np.float32)
    out = np.asarray(soft_cap(jnp.asarray(x)))
    # float32 tanh: relative 1e-6
    np.testing.assert_allclose(out, 30 * np.tanh(x.astype(np.float64) / 30), rtol=1e-6,
                               atol=1e-6)
    assert np.all(np.abs(out) <= 30.0)
    np.testing.assert_allclose(out[np.abs(x) <= 1], x[np.abs(x) <= 1], rtol=4e-4)  # x^3/2700
    assert out[-1] == pytest.approx(30.0) and out[0] == pytest.approx(-30.0)
    assert np.all(np.diff(out) >= 0)


# --- attention --------------------------------------------------------------------------

# 6 query heads over 2 kv heads (R = 3): grouping h // R gives [0,0,0,1,1,1], h % K would
# give [0,1,0,1,0,1].
ATTN_CFG = dataclasses.replace(NANO, num_q_heads=6, num_kv_heads=2, key_size=8, emb_size=48)


def _attention_fn(cfg):
    def f(x, positions, key_mask):
        (out,), kv = Attention(cfg)((x,), (Part(positions, key_mask, None, None, None),), None, 0)
        assert kv is None
        return out
    return hk.without_apply_rng(hk.transform(f))


def _attention_params(cfg, rng, q_scale=20.0):
    d, c = cfg.emb_size, cfg.key_size
    hq, hk_ = cfg.num_q_heads * c, cfg.num_kv_heads * c
    # q is scaled up so that attention logits exceed the soft cap's linear range.
    return {
        "multi_head_attention/query": {"w": bf16_weight(rng, (d, hq), q_scale / np.sqrt(d))},
        "multi_head_attention/key": {"w": bf16_weight(rng, (d, hk_), 1 / np.sqrt(d))},
        "multi_head_attention/value": {"w": bf16_weight(rng, (d, hk_), 1 / np.sqrt(d))},
        "multi_head_attention/linear": {"w": bf16_weight(rng, (hq, d), 1 / np.sqrt(hq))},
    }


def np_attention_heads(cfg, params, x, key_mask, groups=None, cap=True):
    """Per-head attention output [B, T, H, C] with the release's roundings (float64 + bf16)."""
    b, t, _ = x.shape
    h, k, c = cfg.num_q_heads, cfg.num_kv_heads, cfg.key_size
    w = {name.split("/")[-1]: np.asarray(p["w"], np.float64) for name, p in params.items()}
    x = np.asarray(x, np.float64)
    pos = np.broadcast_to(np.arange(t), (b, t))
    q = bf16(np_rope(bf16(x @ w["query"]).reshape(b, t, h, c), pos))
    kk = bf16(np_rope(bf16(x @ w["key"]).reshape(b, t, k, c), pos))
    v = bf16(x @ w["value"]).reshape(b, t, k, c)
    groups = np.arange(h) // (h // k) if groups is None else groups
    out = np.zeros((b, t, h, c))
    for head in range(h):
        g = groups[head]
        logits = bf16(np.einsum("btc,bsc->bts", q[:, :, head], kk[:, :, g]))
        logits = logits * cfg.attn_output_multiplier
        logits = 30 * np.tanh(logits / 30) if cap else logits
        logits = np.where(key_mask, logits, -1e30)
        weights = bf16(np_softmax(logits))
        out[:, :, head] = bf16(np.einsum("bts,bsc->btc", weights, v[:, :, g]))
    return out, w["linear"]


def _causal_mask(tokens):
    t = tokens.shape[1]
    return np.tril(np.ones((t, t), bool))[None] & (tokens > 0)[:, None, :]


def test_attention_matches_numpy_gqa():
    cfg = ATTN_CFG
    rng = np.random.default_rng(4)
    params = _attention_params(cfg, rng)
    b, t = 2, 7
    x = rng.normal(size=(b, t, cfg.emb_size)).astype(BF16)
    tokens = np.array([[5, 6, 7, 8, 9, 10, 11], [5, 6, 0, 8, 9, 10, 11]])  # a pad key
    key_mask = _causal_mask(tokens)
    positions = np.broadcast_to(np.arange(t), (b, t))
    fn = _attention_fn(cfg)
    out = jax.jit(fn.apply)(params, jnp.asarray(x), jnp.asarray(positions),
                            jnp.asarray(key_mask))
    assert out.dtype == jnp.bfloat16 and out.shape == (b, t, cfg.emb_size)
    heads, wo = np_attention_heads(cfg, params, x, key_mask)
    ref = bf16(heads.reshape(b, t, -1) @ wo)
    # Every intermediate is rounded to bf16 in both; float32 (model) vs float64 (reference)
    # accumulation could flip a rounding by 1 ulp (2^-8 relative) upstream, moving the output
    # by a few ulps of its scale: allow 2^-6 of max |ref| (4 ulps at the largest value).
    # Measured: bit-identical. Without the soft cap the reference moves by 0.086 of max |ref|,
    # with grouping h % K by more than 0.1 of it (checked below).
    scale = np.abs(ref).max()
    err = np.abs(np.asarray(out, np.float64) - ref)
    assert err.max() <= 2**-6 * scale, err.max() / scale

    # The reference with the other grouping (h % K) or without the soft cap is far off
    # (q is scaled so that raw logits reach ~66, median ~9): this test distinguishes them.
    wrong, _ = np_attention_heads(cfg, params, x, key_mask, groups=np.arange(6) % 2)
    assert np.abs(bf16(wrong.reshape(b, t, -1) @ wo) - ref).max() > 0.1 * scale
    uncapped, _ = np_attention_heads(cfg, params, x, key_mask, cap=False)
    assert np.abs(bf16(uncapped.reshape(b, t, -1) @ wo) - ref).max() > 2**-4 * scale


def test_attention_grouping_is_h_div_r():
    """Changing kv head 1's weights changes exactly q heads 3, 4, 5 (= h // 3 == 1)."""
    cfg = ATTN_CFG
    rng = np.random.default_rng(5)
    params = _attention_params(cfg, rng)
    hq = cfg.num_q_heads * cfg.key_size
    # output projection = identity, so the output is the concatenated heads
    params["multi_head_attention/linear"]["w"] = np.eye(hq, dtype=np.float32)
    perturbed = jax.tree.map(np.copy, params)
    c = cfg.key_size
    for name in ("key", "value"):
        w = perturbed[f"multi_head_attention/{name}"]["w"]
        w[:, c:2 * c] = bf16_weight(rng, (cfg.emb_size, c), 1 / np.sqrt(cfg.emb_size))
    t = 6
    x = jnp.asarray(rng.normal(size=(1, t, cfg.emb_size)).astype(BF16))
    positions = jnp.arange(t)[None]
    mask = jnp.asarray(np.tril(np.ones((t, t), bool))[None])
    fn = jax.jit(_attention_fn(cfg).apply)
    a = np.asarray(fn(params, x, positions, mask), np.float32).reshape(1, t, 6, c)
    b = np.asarray(fn(perturbed, x, positions, mask), np.float32).reshape(1, t, 6, c)
    changed = np.abs(a - b).max(axis=(0, 1, 3)) > 0
    np.testing.assert_array_equal(changed, [False, False, False, True, True, True])
    # and query head h's output is block h of the concatenation: changing the query weights
    # of head h changes block h only (so blocks 3..5 above are q heads 3..5, not 1, 3, 5)
    for h in range(6):
        q_changed = jax.tree.map(np.copy, params)
        q_changed["multi_head_attention/query"]["w"][:, h * c:(h + 1) * c] *= -1.5
        out = np.asarray(fn(q_changed, x, positions, mask), np.float32).reshape(1, t, 6, c)
        moved = np.abs(out - a).max(axis=(0, 1, 3)) > 0
        np.testing.assert_array_equal(moved, np.arange(6) == h)
    # position 0 attends only to itself: its output is exactly its own value row (bf16)
    v = np.asarray(x, np.float64) @ params["multi_head_attention/value"]["w"]
    np.testing.assert_array_equal(a[0, 0, :3], np.broadcast_to(bf16(v[0, 0, :c]), (3, c)))
    np.testing.assert_array_equal(a[0, 0, 3:], np.broadcast_to(bf16(v[0, 0, c:]), (3, c)))


# --- MoE --------------------------------------------------------------------------------


def _moe_weights(rng, cfg, identical=False):
    e, d, f = cfg.num_experts, cfg.emb_size, cfg.ffn_size
    ws = [bf16_weight(rng, (e, d, f), 1 / np.sqrt(d)), bf16_weight(rng, (e, d, f), 1 / np.sqrt(d)),
          bf16_weight(rng, (e, f, d), 1 / np.sqrt(f))]
    if identical:
        ws = [np.broadcast_to(w[:1], w.shape).copy() for w in ws]
    return ws


def np_experts(x, w_gelu, w_up, w_down):
    """All experts on all tokens, with the release's bf16 roundings: [N, E, D]."""
    x = np.asarray(x, np.float64)
    a = bf16(np.einsum("nd,edf->nef", x, w_gelu))
    u = bf16(np.einsum("nd,edf->nef", x, w_up))
    h = bf16(bf16(np_gelu_tanh(a)) * u)
    return bf16(np.einsum("nef,efd->ned", h, w_down))


def np_moe(x, router_w, w_gelu, w_up, w_down, top=2):
    """Router softmax in float64, top-2, raw (unrenormalised) gates, bf16 combine."""
    probs = np_softmax(np.asarray(x, np.float64) @ router_w)  # [N, E]
    order = np.argsort(-probs, axis=-1)
    chosen = order[:, :top]
    gates = np.take_along_axis(probs, chosen, axis=-1)
    out = np_experts(x, w_gelu, w_up, w_down)
    picked = np.take_along_axis(out, chosen[:, :, None], axis=1)
    combined = bf16(bf16(gates[:, 0, None]) * picked[:, 0])
    for j in range(1, top):
        combined = bf16(combined + bf16(bf16(gates[:, j, None]) * picked[:, j]))
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    margin = (sorted_probs[:, top - 1] - sorted_probs[:, top]).min()
    return combined, gates, chosen, margin


# Expert outputs are bf16 values of magnitude ~1. The matmuls agree bit for bit with the
# float64 reference rounded to bf16, but jax.nn.gelu on a bf16 input evaluates the tanh
# formula in bf16 arithmetic (as the release does), differing from the reference's
# once-rounded float64 gelu by up to ~2^-8 of the activations' scale in ~40% of entries;
# through the down projection and the bf16 gated sum that is ~2^-7 of the output's scale.
# Allow 2^-6 of the largest output; measured: 0.0036 (one token), 0.0081 (MoE module).
MOE_RTOL = 2**-6


@pytest.mark.parametrize("quantized", [False, True])
def test_expert_ffn_one_token(quantized):
    cfg = NANO
    rng = np.random.default_rng(6)
    w_gelu, w_up, w_down = _moe_weights(rng, cfg)
    if quantized:
        # 8-bit weights as the release stores them; the reference uses their bf16 values
        qs = [quantize(w_gelu), quantize(w_up), quantize(w_down, 8)]
        w_gelu, w_up, w_down = (np.asarray(q.weight, np.float64).reshape(
            *q.weight.shape[:-2], q.groups, -1, q.weight.shape[-1])
            * q.scales.astype(np.float64)[..., :, None, :] for q in qs)
        w_gelu, w_up, w_down = (bf16(w).reshape(q.shape) for w, q in
                                zip((w_gelu, w_up, w_down), qs, strict=True))
        args = [QuantizedWeight8bit(jnp.asarray(q.weight), jnp.asarray(q.scales)) for q in qs]
    else:
        args = [jnp.asarray(w) for w in (w_gelu, w_up, w_down)]
    x = rng.normal(size=(1, cfg.emb_size)).astype(BF16)
    gates = np.array([[0.55, 0.25]], np.float32)
    chosen = np.array([[2, 0]], np.int32)
    out = moe.dense(jnp.asarray(x), jnp.asarray(gates), jnp.asarray(chosen), *args)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, cfg.emb_size)
    experts = np_experts(x, w_gelu, w_up, w_down)[0]  # [E, D]
    ref = bf16(bf16(bf16(0.55) * experts[2]) + bf16(bf16(0.25) * experts[0]))
    scale = np.abs(ref).max()
    err = np.abs(np.asarray(out, np.float64) - ref)
    assert err.max() <= MOE_RTOL * scale, err.max() / scale
    # the expert's formula really is (gelu(x W1) * x Wv) W2: swapping the branches is far off
    swapped = np_experts(x, w_up, w_gelu, w_down)[0]
    ref_swapped = bf16(bf16(0.55) * swapped[2]) + bf16(bf16(0.25) * swapped[0])
    assert np.abs(ref_swapped - ref).max() > 0.1 * scale


def _moe_fn(cfg, strategy="dense"):
    return hk.without_apply_rng(hk.transform(lambda x, rw: MoE(cfg, strategy)(x, rw)))


def _moe_params(w_gelu, w_up, w_down):
    return {"moe/linear": {"w": w_gelu}, "moe/linear_v": {"w": w_up},
            "moe/linear_1": {"w": w_down}}


@pytest.mark.parametrize("strategy", sorted(moe.STRATEGIES))
def test_moe_module_matches_numpy(strategy):
    cfg = NANO
    rng = np.random.default_rng(7)
    ws = _moe_weights(rng, cfg)
    router_w = rng.normal(size=(cfg.emb_size, cfg.num_experts)).astype(np.float32) * 0.5
    x = rng.normal(size=(2, 6, cfg.emb_size)).astype(BF16)
    fn = _moe_fn(cfg, strategy)
    params = jax.eval_shape(fn.init, jax.random.key(0), jnp.asarray(x), jnp.asarray(router_w))
    assert jax.tree.map(lambda p: p.shape, params) == {
        "moe/linear": {"w": (4, 32, 48)}, "moe/linear_v": {"w": (4, 32, 48)},
        "moe/linear_1": {"w": (4, 48, 32)}}
    out, routing = jax.jit(fn.apply)(_moe_params(*ws), jnp.asarray(x), jnp.asarray(router_w))
    assert out.dtype == jnp.bfloat16 and out.shape == x.shape
    ref, gates, chosen, margin = np_moe(x.reshape(-1, cfg.emb_size), router_w, *ws)
    # The routing the module reports is the one it used: NumPy's top-2, in order.
    np.testing.assert_array_equal(np.asarray(routing.experts).reshape(chosen.shape), chosen)
    np.testing.assert_allclose(np.asarray(routing.gates).reshape(gates.shape), gates,
                               atol=1e-5)
    # routing is a discrete choice: the test needs clear margins between 2nd and 3rd expert
    assert margin > 1e-3
    # tokens use different experts (the test exercises the selection)
    assert len({tuple(sorted(c)) for c in chosen}) > 2
    # the gates are not renormalised: they sum to clearly less than 1
    assert np.all(gates.sum(-1) < 0.999)
    scale = np.abs(ref).max()
    err = np.abs(np.asarray(out, np.float64).reshape(ref.shape) - ref)
    assert err.max() <= MOE_RTOL * scale, err.max() / scale


@pytest.mark.parametrize("strategy", sorted(moe.STRATEGIES))
def test_moe_gates_are_raw_softmax_probabilities(strategy):
    """With identical experts the output is (p1 + p2) * expert(x): the raw top-2 softmax
    probabilities, not renormalised to sum to 1 (which would give expert(x) itself)."""
    cfg = NANO
    rng = np.random.default_rng(8)
    ws = _moe_weights(rng, cfg, identical=True)
    d = cfg.emb_size
    x = rng.normal(size=(1, 3, d)).astype(BF16)
    # router logits = x . r_e: make them [2, 1.5, 1, 0.5] * (x . u) / |x . u| exactly
    # enough, by putting every expert's weight along one direction u
    u = np.asarray(x[0, 0], np.float64) / np.sum(np.asarray(x[0, 0], np.float64) ** 2)
    router_w = np.outer(u, [2.0, 1.5, 1.0, 0.5]).astype(np.float32)
    out = np.asarray(jax.jit(_moe_fn(cfg, strategy).apply)(_moe_params(*ws), jnp.asarray(x),
                                                 jnp.asarray(router_w))[0], np.float64)[0]
    expert = np_experts(x[0], *ws)[:, 0]  # [N, D], every expert the same
    probs = np_softmax(np.asarray(x[0], np.float64) @ router_w.astype(np.float64))
    top2 = np.sort(probs, axis=-1)[:, -2:].sum(-1)
    # token 0's router logits are [2, 1.5, 1, 0.5]: p1 + p2 = 0.7311 (a renormalised
    # output would be 1.37x larger)
    assert top2[0] == pytest.approx(0.7311, abs=1e-4)
    # bf16 gates (2^-8 relative each), bf16 products and sum: 2^-6 of the scale
    for n in range(3):
        scale = np.abs(expert[n]).max()
        np.testing.assert_allclose(out[n], top2[n] * expert[n], atol=MOE_RTOL * scale)
        assert np.abs(out[n] - expert[n]).max() > 0.1 * scale


# --- the whole model --------------------------------------------------------------------


T = 8  # sequence length of the whole-model tests: one compiled shape per batch size


@pytest.fixture(scope="module")
def nano():
    params = jax.jit(init_params, static_argnums=0)(NANO, jax.random.key(0))
    return params, jax.jit(build(NANO).apply)


def test_forward_shape_and_dtype(nano):
    params, apply = nano
    tokens = jnp.asarray(np.random.default_rng(9).integers(1, NANO.vocab_size, (2, T)))
    logits, cache = apply(params, tokens)
    assert cache is None
    assert logits.shape == (2, T, NANO.vocab_size) and logits.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(logits, np.float32)))
    # not degenerate: positions and tokens give different distributions
    assert np.asarray(logits, np.float32).std(axis=-1).min() > 0.1


def test_forward_final_projection_is_tied_embedding(nano):
    """logits = rms_norm(h) @ E^T * output_multiplier, with the input embedding E: doubling
    row 5 of E (token 5 not among the inputs) doubles vocabulary column 5 and nothing else."""
    params, apply = nano
    tokens = jnp.asarray([[7, 8, 9, 10, 11, 12, 13, 14]])
    base = np.asarray(apply(params, tokens)[0], np.float64)
    emb = np.asarray(params["language_model/in_out_embed"]["embeddings"]).copy()
    emb[5] *= 2
    p2 = dict(params)
    p2["language_model/in_out_embed"] = {"embeddings": jnp.asarray(emb)}
    out = np.asarray(apply(p2, tokens)[0], np.float64)
    np.testing.assert_array_equal(np.delete(out, 5, axis=-1), np.delete(base, 5, axis=-1))
    # scaling by 2 is exact in float32 and commutes with every bf16 rounding: exactly 2x
    np.testing.assert_array_equal(out[..., 5], 2 * base[..., 5])
    assert np.abs(base[..., 5]).min() > 0


def test_forward_is_causal(nano):
    params, apply = nano
    rng = np.random.default_rng(10)
    tokens = rng.integers(1, NANO.vocab_size, (2, T))
    changed = tokens.copy()
    changed[:, 6] = (tokens[:, 6] + 17) % (NANO.vocab_size - 1) + 1
    a = np.asarray(apply(params, jnp.asarray(tokens))[0])
    b = np.asarray(apply(params, jnp.asarray(changed))[0])
    # each position's computation reads only earlier rows; masked logits are replaced by
    # -1e30 (exp gives exactly 0), so earlier positions are bit-identical
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert np.all(np.abs(a[:, 6:].astype(np.float32) - b[:, 6:].astype(np.float32))
                  .max(axis=-1) > 0)


def test_forward_batch_invariance(nano):
    params, apply = nano
    rng = np.random.default_rng(11)
    tokens = rng.integers(1, NANO.vocab_size, (3, T))
    batch = np.asarray(apply(params, jnp.asarray(tokens))[0])
    for i in range(3):
        alone = np.asarray(apply(params, jnp.asarray(tokens[i:i + 1]))[0])
        # Exact: no operation mixes batch rows (matmuls contract over D, attention and the
        # router are per row/token), and XLA:CPU uses the same per-row reduction order for
        # batch 1 and 3 (measured: bit-identical). The release's batch-flattening defect
        # would break this.
        np.testing.assert_array_equal(batch[i], alone[0])
    assert not np.array_equal(batch[0], batch[1])


def test_pad_keys_are_masked(nano):
    """A pad (token 0) in the middle: no other position reads its embedding row."""
    params, apply = nano
    tokens = jnp.asarray([[11, 12, 13, 0, 14, 15, 16, 17]])
    emb = np.asarray(params["language_model/in_out_embed"]["embeddings"]).copy()
    p2 = dict(params)
    emb[0] = np.random.default_rng(12).normal(size=NANO.emb_size) * 3
    p2["language_model/in_out_embed"] = {"embeddings": jnp.asarray(emb)}
    a = np.asarray(apply(params, tokens)[0])[0]
    b = np.asarray(apply(p2, tokens)[0])[0]
    # vocabulary column 0 (the pad's own logit, h @ E[0]) changes with E[0]; compare the rest
    others = [0, 1, 2, 4, 5, 6, 7]
    np.testing.assert_array_equal(a[others, 1:], b[others, 1:])
    assert np.abs(a[3].astype(np.float32) - b[3].astype(np.float32)).max() > 0  # the pad row
    # the same change on a non-pad token does reach later positions (the check can fail)
    emb2 = np.asarray(params["language_model/in_out_embed"]["embeddings"]).copy()
    emb2[13] = emb[0]
    p3 = dict(params)
    p3["language_model/in_out_embed"] = {"embeddings": jnp.asarray(emb2)}
    c = np.asarray(apply(p3, tokens)[0])[0]
    assert np.abs(a[4:, 14:].astype(np.float32) - c[4:, 14:].astype(np.float32)).max() > 0


def test_kv_cache_matches_full_forward(nano):
    params, apply = nano
    rng = np.random.default_rng(13)
    seq0 = rng.integers(1, NANO.vocab_size, T)
    seq1 = rng.integers(1, NANO.vocab_size, T - 2)
    seq0[2] = 0  # a pad inside the first prompt: masked as a key in both paths
    full = np.asarray(apply(params, jnp.asarray(np.stack([seq0, np.r_[seq1, 0, 0]])))[0])

    cache = init_cache(NANO, 2, max_len=16)
    # prompts of 5 and 3 tokens, the second right-padded with 0
    prefill = np.stack([seq0[:5], np.r_[seq1[:3], 0, 0]])
    logits, cache = apply(params, jnp.asarray(prefill), cache, jnp.asarray([5, 3], jnp.int32))
    np.testing.assert_array_equal(cache.lengths, [5, 3])
    got0, got1 = [np.asarray(logits[0, :5])], [np.asarray(logits[1, :3])]
    for j in range(3):
        step = np.array([[seq0[5 + j]], [seq1[3 + j]]])
        logits, cache = apply(params, jnp.asarray(step), cache, jnp.asarray([1, 1], jnp.int32))
        got0.append(np.asarray(logits[0]))
        got1.append(np.asarray(logits[1]))
    np.testing.assert_array_equal(cache.lengths, [8, 6])
    np.testing.assert_array_equal(np.asarray(cache.key_valid).sum(-1), [7, 6])
    got0, got1 = np.concatenate(got0), np.concatenate(got1)
    assert got0.shape == (8, NANO.vocab_size) and got1.shape == (6, NANO.vocab_size)
    # Attention over 16 slots (masked ones contribute exp(-1e30 - max) = 0 exactly) vs over
    # the T real ones, with different matmul shapes: the sums could differ in float32
    # rounding order; allow 2 bf16 ulps on at most 1% of logits. Measured: bit-identical.
    for got, ref in ((got0, full[0]), (got1, full[1, :6])):
        dist = ulp_distance(got, ref)
        assert dist.max() <= 2, dist.max()
        assert np.mean(dist > 0) <= 0.01
    # the cache really is used: the last token without its context (at position 0) differs
    alone = np.asarray(apply(params, jnp.asarray(np.roll(seq0, 1)[None]))[0])[0, 0]
    assert ulp_distance(alone, full[0, T - 1]).max() > 2


def test_a_reach_reads_only_the_length_it_chooses(nano):
    """A 20-token prompt and a decode step through a cache of 64 slots whose slots from 32
    on hold NaN, attending as far as a `Reach` of (16, 32, 64) chooses at run time. Chosen
    32, they give the bits of a step compiled to attend 32 slots (the branch is that
    step's arithmetic), with no NaN: the unchosen branches read nothing. Chosen 64, the
    NaN comes through (0 x NaN is NaN), so the choice is not a mask over a full read."""
    params, _ = nano
    tokens = jnp.asarray(np.random.default_rng(15).integers(1, NANO.vocab_size, (1, 21)))
    cache = init_cache(NANO, 1, max_len=64)
    cache = cache._replace(k=cache.k.at[:, :, :, 32:].set(jnp.nan),
                           v=cache.v.at[:, :, :, 32:].set(jnp.nan))
    reach_apply = jax.jit(build(NANO).apply)
    static_apply = jax.jit(build(NANO).apply, static_argnames="attend_len")

    def steps(attend_len):
        apply = static_apply if isinstance(attend_len, int) else reach_apply
        prefilled, after = apply(params, tokens[:, :20], cache, attend_len=attend_len)
        decoded, _ = apply(params, tokens[:, 20:], after, attend_len=attend_len)
        return np.concatenate([np.asarray(prefilled, np.float32)[0],
                               np.asarray(decoded, np.float32)[0]])

    chosen = steps(Reach((16, 32, 64), jnp.int32(1)))
    assert np.isfinite(chosen).all()
    np.testing.assert_array_equal(chosen, steps(32))
    assert np.isnan(steps(Reach((16, 32, 64), jnp.int32(2)))).all()


def test_segments_share_a_step_and_give_the_numbers_of_separate_steps(nano):
    """A decode step's rows and a prompt into a free row as one step (`Segment`s, the
    engine's mixed step) against the two as separate steps: the same logits and cache. Row
    3 is free in the decode segment (its write is meaningless) and is the prompt's: the
    prompt's writes, later, must win. Tolerance as test_kv_cache_matches_full_forward (the
    joined step multiplies 10 tokens where each alone multiplies 4 and 6); measured
    bit-identical."""
    params, apply = nano
    into = jax.jit(lambda p, tokens, cache, num_new, rows: build(NANO).apply(
        p, tokens, cache, num_new, rows=rows))
    rng = np.random.default_rng(14)
    cache = init_cache(NANO, 4, max_len=16)
    first = rng.integers(1, NANO.vocab_size, (2, 5))
    _, cache = into(params, jnp.asarray(first), cache, jnp.asarray([5, 3], jnp.int32),
                    jnp.asarray([0, 1], jnp.int32))
    step = jnp.asarray(rng.integers(1, NANO.vocab_size, (4, 1)))
    on = jnp.asarray([1, 1, 0, 0], jnp.int32)
    prompt = jnp.asarray(rng.integers(1, NANO.vocab_size, (1, 6)))
    six, row3 = jnp.asarray([6], jnp.int32), jnp.asarray([3], jnp.int32)

    decoded, apart = apply(params, step, cache, on)
    prompted, apart = into(params, prompt, apart, six, row3)
    (decoded_j, prompted_j), joined = apply(
        params, (Segment(step, on), Segment(prompt, six, row3)), cache)

    for got, want in ((decoded_j[:2], decoded[:2]), (prompted_j, prompted)):
        dist = ulp_distance(np.asarray(got), np.asarray(want))
        assert dist.max() <= 2 and np.mean(dist > 0) <= 0.01, dist.max()
    np.testing.assert_array_equal(joined.lengths, [6, 4, 0, 6])
    np.testing.assert_array_equal(joined.key_valid, apart.key_valid)
    for a, b in ((joined.k, apart.k), (joined.v, apart.v)):
        # Row 2 took the free row's meaningless write in both; rows 0, 1 and 3 hold keys.
        dist = ulp_distance(np.asarray(a[:, [0, 1, 3]]), np.asarray(b[:, [0, 1, 3]]))
        assert dist.max() <= 2 and np.mean(dist > 0) <= 0.01, dist.max()


# --- the real model's parameter tree ----------------------------------------------------

_LAYER_ORDER = [
    "moe/linear", "moe/linear_1", "moe/linear_v", "multi_head_attention/key",
    "multi_head_attention/linear", "multi_head_attention/query",
    "multi_head_attention/value", "rms_norm", "rms_norm_1", "rms_norm_2", "rms_norm_3",
    "router",
]
_QUANTIZED = {  # module -> (weight shape, scales shape)
    "moe/linear": ((8, 6144, 32768), (8, 1, 32768)),
    "moe/linear_v": ((8, 6144, 32768), (8, 1, 32768)),
    "moe/linear_1": ((8, 32768, 6144), (8, 8, 6144)),
    "multi_head_attention/query": ((6144, 6144), (1, 6144)),
    "multi_head_attention/key": ((6144, 1024), (1, 1024)),
    "multi_head_attention/value": ((6144, 1024), (1, 1024)),
    "multi_head_attention/linear": ((6144, 6144), (8, 6144)),
}


def test_grok1_abstract_param_tree():
    tree = abstract_params(GROK_1)
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, QuantizedWeight8bit))
    assert len(flat) == 770
    names = [(path[0].key, path[1].key) for path, _ in flat]
    expected = [("language_model/in_out_embed", "embeddings"),
                ("language_model/rms_norm", "scale")]
    for i in sorted(range(64), key=str):  # keys sort as strings: 0, 1, 10, 11, ..., 2, 20
        for module in _LAYER_ORDER:
            param = "scale" if module.startswith("rms_norm") else "w"
            expected.append((f"transformer/decoder_layer_{i}/{module}", param))
    assert names == expected
    assert names[2] == ("transformer/decoder_layer_0/moe/linear", "w")
    assert names[4] == ("transformer/decoder_layer_0/moe/linear_v", "w")
    assert names.index(("transformer/decoder_layer_10/router", "w")) < names.index(
        ("transformer/decoder_layer_2/moe/linear", "w"))

    for (module, param), (_, leaf) in zip(names, flat, strict=True):
        local = module.split("/", 2)[-1]
        if local in _QUANTIZED:
            assert isinstance(leaf, QuantizedWeight8bit), module
            w_shape, s_shape = _QUANTIZED[local]
            assert (leaf.weight.shape, leaf.weight.dtype) == (w_shape, jnp.int8), module
            assert (leaf.scales.shape, leaf.scales.dtype) == (s_shape, jnp.bfloat16), module
            assert leaf.shape == w_shape
        else:
            assert isinstance(leaf, jax.ShapeDtypeStruct), module
            assert leaf.dtype == jnp.float32, module
            if param == "embeddings":
                assert leaf.shape == (131072, 6144)
            elif local == "router":
                assert leaf.shape == (6144, 8)
            else:
                assert param == "scale" and leaf.shape == (6144,), module
