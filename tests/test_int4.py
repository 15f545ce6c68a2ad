"""4-bit expert weights: requantisation, packing, slice-wise loading on every mesh, errors.

Tolerances: int4 values are a second rounding of the release's int8 ones, so int4 logits
are compared with int8 logits only loosely (a bound on their distance, measured well below
it); everything else here is exact: the same requantisation computed whole or slice by
slice, on the host or read back from the devices, must give the same bits.
"""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from grok import Grok, checkpoint, model, sharding
from grok.config import GrokConfig
from grok.errors import GrokError
from grok.params import PARAM_KINDS, kind_of, spec_for, storage
from grok.quant import (
    INT4,
    QuantizedWeight4bit,
    QuantizedWeight8bit,
    dequantize,
    int8_values,
    nbytes,
    quantize,
    quantize4,
    quantize_params,
    requantize4,
)

BF16 = ml_dtypes.bfloat16
# Widths that 4-bit groups of 32 rows divide on every mesh below: D = 128, F = 256.
CONFIG = GrokConfig(vocab_size=512, pad_token=0, eos_token=2, sequence_len=64,
                    embedding_multiplier_scale=78.38367176906169,
                    output_multiplier_scale=0.5773502691896257, emb_size=128,
                    widening_factor=3.0, key_size=8, num_q_heads=16, num_kv_heads=8,
                    num_layers=2, attn_output_multiplier=0.25, num_experts=8,
                    num_selected_experts=2)
GROUP = 16


def _int8(rng, lead, k, n, groups):
    weight = rng.integers(-127, 128, size=(*lead, k, n), dtype=np.int8)
    scales = rng.uniform(0.001, 0.05, size=(*lead, groups, n)).astype(BF16)
    return QuantizedWeight8bit(weight, scales)


def test_requantize4_is_symmetric_round_to_nearest():
    """Each group's scale is its largest |value| / 7 in bf16; values round to the nearest
    multiple of it; the result stays within half a step of every value."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((2, 64, 5)).astype(np.float32)
    q, scales = requantize4(values, 16)
    assert q.dtype == INT4 and scales.dtype == BF16 and scales.shape == (2, 4, 5)
    grouped = values.reshape(2, 4, 16, 5)
    want_scales = (np.abs(grouped).max(axis=2) / 7).astype(BF16)
    np.testing.assert_array_equal(scales, want_scales)
    step = scales.astype(np.float32)[:, :, None, :]
    want_q = np.clip(np.rint(grouped / step), -7, 7)
    np.testing.assert_array_equal(q.astype(np.int8).reshape(2, 4, 16, 5), want_q)
    assert np.abs(q.astype(np.int8).reshape(2, 4, 16, 5) * step - grouped).max() \
        <= step.max() / 2 + 1e-6
    zeros, zero_scales = requantize4(np.zeros((32, 3), np.float32), 32)  # no division by 0
    assert not zeros.astype(np.int8).any() and not zero_scales.astype(np.float32).any()


def test_int4_round_trips_through_the_devices_and_dequantizes_exactly():
    """Packed two to a byte on the device, the values come back unchanged, and the device's
    dequantisation is round_bf16(q * scale), as a NumPy computation gives it."""
    rng = np.random.default_rng(1)
    w4 = quantize4(_int8(rng, (3,), 64, 24, 8), 32)
    on_device = QuantizedWeight4bit(jnp.asarray(w4.weight), jnp.asarray(w4.scales))
    assert on_device.weight.dtype == jnp.int4
    np.testing.assert_array_equal(np.asarray(on_device.weight), w4.weight)
    got = np.asarray(jax.jit(dequantize)(on_device))
    assert w4.weight.shape == (3, 24, 64) and w4.shape == (3, 64, 24)  # held K-last
    assert w4.scales.shape == (3, 24, 2) and w4.groups == 2
    want = (np.swapaxes(w4.weight, -1, -2).astype(np.float32).reshape(3, 2, 32, 24)
            * np.swapaxes(w4.scales, -1, -2).astype(np.float32)[:, :, None, :]
            ).reshape(3, 64, 24).astype(BF16)
    assert got.dtype == BF16
    np.testing.assert_array_equal(got, want)
    assert nbytes(w4.weight.shape, w4.weight.dtype) == 3 * 64 * 24 // 2


@pytest.mark.parametrize("first, rows", [(0, 32), (32, 32), (16, 48), (0, 96)])
def test_a_slice_converts_as_its_part_of_the_whole(first, rows):
    """A device's slice of rows, requantised from its own int8 rows and the whole weight's
    scales, is exactly its part of the whole tensor's conversion."""
    rng = np.random.default_rng(2)
    w8 = _int8(rng, (2,), 96, 10, 8)  # 8-bit groups of 12 rows: slices cut through them
    whole = quantize4(w8, 16)
    block = int8_values(w8.weight[:, first:first + rows], w8.scales, first, 96)
    q, scales = requantize4(block, 16)
    np.testing.assert_array_equal(q, np.swapaxes(whole.weight, -1, -2)[:, first:first + rows])
    np.testing.assert_array_equal(
        scales, np.swapaxes(whole.scales, -1, -2)[:, first // 16:(first + rows) // 16])


@pytest.mark.parametrize("group, message", [
    (24, r"int4_group=24 does not divide the 64 rows .*; use a group size that does, such "
         r"as 16"),
    (0, r"int4_group must be a positive integer, got 0"),
    (True, r"int4_group must be a positive integer, got True"),
])
def test_bad_groups_are_clear_errors(group, message):
    with pytest.raises(GrokError, match=message):
        requantize4(np.zeros((64, 4), np.float32), group)


def test_every_parameter_has_one_kind():
    """Every parameter of both trees is recognised by exactly one row of the table, whose
    logical shape and placement have the parameter's rank; unknown names are errors."""
    for layers in ("unrolled", "scan"):
        for module, bundle in model.abstract_params(CONFIG, False, layers).items():
            for name, value in bundle.items():
                path = f"{module}/{name}"
                kind = kind_of(path)
                assert sum(1 for k in PARAM_KINDS if re.search(k.pattern, path)) == 1
                assert len(spec_for(path)) == len(value.shape)
                assert len(kind.shape) == len(value.shape) - ((layers == "scan"
                                                                and "decoder_layer/" in path)
                                                                or "transformer/moe/" in path)
    with pytest.raises(GrokError, match=r"unknown parameter 'transformer/decoder_layer_0/bias'"):
        kind_of("transformer/decoder_layer_0/bias")
    assert storage("transformer/decoder_layer_0/moe/linear_1/w", "int4") == "int4"
    assert storage("transformer/decoder_layer_0/multi_head_attention/linear/w", "int4") == "int8"
    with pytest.raises(GrokError, match=r"weights must be one of"):
        storage("transformer/decoder_layer_0/moe/linear/w", "fp8")


@pytest.fixture(scope="module")
def int4_ckpt(tmp_path_factory):
    """A random checkpoint of CONFIG in the release's format, and its 8-bit parameters."""
    root = tmp_path_factory.mktemp("int4")
    params = jax.tree.map(np.asarray, model.init_params(CONFIG, jax.random.key(3)))
    params = quantize_params(params)
    checkpoint.write_checkpoint(root, params)
    return root, params


def _host(x):
    return np.asarray(sharding.fetch(x))


# Two meshes in the quick run; the rest with the slow tests.
@pytest.mark.parametrize("mesh_shape, layers", [
    ((1, 1), "unrolled"), ((2, 4), "scan"),
    *(pytest.param(*m, marks=pytest.mark.slow) for m in [((1, 8), "unrolled"), ((4, 2), "scan")])])
def test_loading_requantizes_each_slice_as_the_whole(int4_ckpt, mesh_shape, layers):
    """Loaded with int4 weights on any mesh, stacked or not, each expert weight holds the
    bits of its whole-tensor conversion, and attention weights keep the release's int8."""
    root, params = int4_ckpt
    mesh = sharding.make_mesh(mesh_shape)
    loaded = checkpoint.load_checkpoint(
        root, model.abstract_params(CONFIG),
        lambda path, kind, shape: sharding.param_sharding(mesh, path, kind, shape),
        progress=False, stacked=layers == "scan", int4_group=GROUP)
    for i in range(CONFIG.num_layers):
        for name in ("linear", "linear_v", "linear_1"):
            want = quantize4(params[f"transformer/decoder_layer_{i}/moe/{name}"]["w"], GROUP)
            if layers == "scan":
                got = loaded[f"transformer/moe/{name}"]["w"]
                weight, scales = _host(got.weight)[i], _host(got.scales)[i]
            else:
                got = loaded[f"transformer/decoder_layer_{i}/moe/{name}"]["w"]
                weight, scales = _host(got.weight), _host(got.scales)
            assert isinstance(got, QuantizedWeight4bit) and got.weight.dtype == jnp.int8  # CPU
            np.testing.assert_array_equal(weight, want.weight)
            np.testing.assert_array_equal(scales, want.scales)
    attention = ("transformer/decoder_layer/multi_head_attention/linear" if layers == "scan"
                 else "transformer/decoder_layer_0/multi_head_attention/linear")
    assert isinstance(loaded[attention]["w"], QuantizedWeight8bit)


@pytest.fixture(scope="module")
def int4_logits(int4_ckpt):
    root, _ = int4_ckpt
    tokens = np.random.default_rng(4).integers(3, CONFIG.vocab_size, (2, 12))
    int8 = Grok.load(root, CONFIG, mesh_shape=(1, 1), weights="int8").logits(tokens)
    int4 = Grok.load(root, CONFIG, mesh_shape=(1, 1), weights="int4",
                     int4_group=GROUP).logits(tokens)
    return tokens, int8, int4


def test_int4_logits_stay_near_int8(int4_logits):
    """A second rounding moves the logits, but boundedly: measured max 0.2 on this random
    model against logits of spread ~4; allowed 1.0, and the argmax mostly agrees."""
    _, int8, int4 = int4_logits
    assert not np.array_equal(int8, int4)  # the experts really are 4-bit
    assert np.abs(int8 - int4).max() < 1.0
    assert (int8.argmax(-1) == int4.argmax(-1)).mean() >= 0.75


@pytest.mark.parametrize("mesh_shape, layers, weights", [
    ((2, 4), "scan", "int4"),
    *(pytest.param(*m, marks=pytest.mark.slow)
      for m in [((1, 8), "unrolled", "int4"), ((4, 2), "unrolled", "int4")])])
def test_every_mesh_gives_the_same_int4_logits(int4_ckpt, int4_logits, mesh_shape, layers,
                                               weights):
    """Same numbers on any mesh, up to the dots' blocking. Rounding differences in the bf16
    residual stream are absolute errors at the scale of its largest values: here logits
    reach ~70, where a bf16 step is 0.5, and int8 weights differ across these meshes by one
    such step, by 1/37 of one on average (measured). Allowed: two steps at the largest
    logit anywhere, a twentieth of one on average, and the same argmax wherever the best
    two are further apart."""
    root, _ = int4_ckpt
    tokens, _, want = int4_logits
    grok = Grok.load(root, CONFIG, mesh_shape=mesh_shape, weights=weights, layers=layers,
                     int4_group=GROUP)
    got = grok.logits(tokens)
    step = 2.0 ** (np.floor(np.log2(np.abs(want).max())) - 7)
    diff = np.abs(got - want)
    assert diff.max() <= 2 * step and diff.mean() <= step / 20
    top2 = np.sort(want, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 2 * step
    assert clear.sum() >= 8
    np.testing.assert_array_equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_a_group_the_mesh_cannot_split_is_an_error_before_reading(int4_ckpt):
    """F = 256 split 8 ways leaves 32 rows a device: groups of 64 cannot tile them."""
    root, _ = int4_ckpt
    assert CONFIG.ffn_size == 256
    with pytest.raises(GrokError, match=r"int4_group=64 does not divide the 32 rows .*"
                                        r"moe/linear_1/w \(a device's share on this mesh\)"):
        Grok.load(root, CONFIG, mesh_shape=(1, 8), weights="int4", int4_group=64)


def test_int4_is_made_while_loading():
    """`store_params` does not requantise on its own: an 8-bit expert weight where the
    table wants int4 is a clear error, not a silent int8."""
    from grok.quant import store_params
    w8 = quantize(np.ones((8, 32, 16), np.float32))
    params = {"transformer/decoder_layer_0/moe/linear": {"w": jax.tree.map(jnp.asarray, w8)}}
    with pytest.raises(GrokError, match=r"int4 weights are made while loading"):
        store_params(params, "int4", jnp.bfloat16)

