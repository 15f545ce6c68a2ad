"""Checkpoint files: the release's format read without unpickling, validated, and written back
so that the release's own loader (stdlib pickle) reads what we write."""

import dataclasses
import io
import json
import os
import pickle
import pickletools
import re
import shutil
import struct
import sys
import threading
import time
import types
from typing import ClassVar

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from grok.checkpoint import loader, pickle_format
from grok.config import NANO, TINY
from grok.params import release_groups
from grok.quant import QuantizedWeight8bit, quantize, quantize_params

BF16 = np.dtype(ml_dtypes.bfloat16)
# numpy's array unpickling function, whatever module this numpy version keeps it in.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]


# --- helpers --------------------------------------------------------------------------


def spec_shapes(config) -> dict:
    """Parameter shapes as SPEC.md section 3 lists them (independent of grok.model)."""
    d, f, e = config.emb_size, config.ffn_size, config.num_experts
    q, kv = config.num_q_heads * config.key_size, config.num_kv_heads * config.key_size
    tree = {"language_model/in_out_embed": {"embeddings": (config.vocab_size, d)},
            "language_model/rms_norm": {"scale": (d,)}}
    for i in range(config.num_layers):
        layer = f"transformer/decoder_layer_{i}"
        tree.update({
            f"{layer}/multi_head_attention/query": {"w": (d, q)},
            f"{layer}/multi_head_attention/key": {"w": (d, kv)},
            f"{layer}/multi_head_attention/value": {"w": (d, kv)},
            f"{layer}/multi_head_attention/linear": {"w": (q, d)},
            f"{layer}/router": {"w": (d, e)},
            f"{layer}/moe/linear": {"w": (e, d, f)},
            f"{layer}/moe/linear_v": {"w": (e, d, f)},
            f"{layer}/moe/linear_1": {"w": (e, f, d)},
        })
        for norm in ("rms_norm", "rms_norm_1", "rms_norm_2", "rms_norm_3"):
            tree[f"{layer}/{norm}"] = {"scale": (d,)}
    return tree


def spec_tree(config) -> dict:
    """The abstract tree a release checkpoint of `config` holds (8-bit where it is)."""
    def leaf(path, shape):
        groups = release_groups(path, shape)
        if groups is None:
            return jax.ShapeDtypeStruct(shape, np.float32)
        return QuantizedWeight8bit(jax.ShapeDtypeStruct(shape, np.int8),
                                   jax.ShapeDtypeStruct((*shape[:-2], groups, shape[-1]), BF16))
    return {module: {name: leaf(f"{module}/{name}", shape) for name, shape in bundle.items()}
            for module, bundle in spec_shapes(config).items()}


def random_params(config, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {module: {name: (0.02 * rng.standard_normal(shape)).astype(np.float32)
                     for name, shape in bundle.items()}
            for module, bundle in spec_shapes(config).items()}


def leaves(tree):
    return jax.tree_util.tree_leaves(tree)


def assert_same(a, b):
    """Bit-exact equality of two trees of arrays (bf16 included)."""
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


class ReleaseQuantizedWeight8bit:
    """Stands in for the release's `__main__.QuantizedWeight8bit` in stdlib pickling."""

    def __init__(self, weight, scales):
        self.weight, self.scales = weight, scales


class RestrictedUnpickler(pickle.Unpickler):
    """What a careful user of the release's loader would run: stdlib pickle, known names."""

    ALLOWED: ClassVar[dict] = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("ml_dtypes", "bfloat16"): ml_dtypes.bfloat16,
        ("__main__", "QuantizedWeight8bit"): ReleaseQuantizedWeight8bit,
    }

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} refused") from None


def stdlib_load(path):
    with open(path, "rb") as f:
        value = RestrictedUnpickler(f).load()
    if isinstance(value, ReleaseQuantizedWeight8bit):
        return QuantizedWeight8bit(value.weight, value.scales)
    return value


@pytest.fixture
def release_class(monkeypatch):
    """Lets stdlib pickle write objects as the release did, as `__main__.QuantizedWeight8bit`."""
    cls = type("QuantizedWeight8bit", (ReleaseQuantizedWeight8bit,), {"__module__": "__main__"})
    monkeypatch.setattr(sys.modules["__main__"], "QuantizedWeight8bit", cls, raising=False)
    return cls


@pytest.fixture
def nano_ckpt(tmp_path):
    """A freshly written NANO checkpoint (26 files, like the fixture) and its float params."""
    params = random_params(NANO)
    loader.write_checkpoint(tmp_path, params)
    return tmp_path, params


def tensor(root, index):
    return root / "ckpt-0" / loader.tensor_name(index)


# --- the fixture in the release's exact format ---------------------------------------


def test_fixture_reads_as_the_manifest_says(fixture_dir):
    manifest = json.loads((fixture_dir / "manifest.json").read_text())
    params = loader.read_checkpoint(fixture_dir, spec_tree(TINY))
    named, _ = loader.flatten(params)
    assert len(named) == len(manifest) == 26
    for index, ((name, value), entry) in enumerate(zip(named, manifest, strict=True)):
        assert entry["index"] == index and entry["name"] == f"params/{name}"
        if entry["kind"] == "f32":
            assert isinstance(value, np.memmap) and value.dtype == np.float32
            assert list(value.shape) == entry["shape"]
        else:
            groups = re.fullmatch(r"int8 x bf16 scales\(([\d, ]+)\)", entry["kind"]).group(1)
            assert isinstance(value, QuantizedWeight8bit)
            assert value.weight.dtype == np.int8 and list(value.weight.shape) == entry["shape"]
            assert value.scales.dtype == BF16
            assert value.scales.shape == tuple(int(g) for g in groups.split(","))
        # Values: the same as the stdlib unpickler (restricted to known names) makes of it.
        assert_same(value, stdlib_load(tensor(fixture_dir, index)))


def test_fixture_reads_from_ckpt_dir_and_with_a_config(fixture_dir):
    by_tree = loader.read_checkpoint(fixture_dir / "ckpt-0", spec_tree(TINY))
    by_config = loader.read_checkpoint(fixture_dir, TINY)  # via grok.model.abstract_params
    assert jax.tree_util.tree_structure(by_tree) == jax.tree_util.tree_structure(by_config)
    assert_same(by_tree, by_config)


def test_writer_reproduces_the_release_files_byte_for_byte(fixture_dir, tmp_path):
    for index in range(26):
        original = tensor(fixture_dir, index)
        copy = tmp_path / original.name
        pickle_format.write_tensor(copy, pickle_format.read_tensor(original))
        assert copy.read_bytes() == original.read_bytes(), original.name


# --- the writer ------------------------------------------------------------------------


WRITER_CASES = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array(1.5, np.float32),
    np.ones((2, 3, 4, 5), np.float32),
    np.zeros((0, 3), np.float32),
    np.ones((16383,), np.float32),  # frame reaches CPython's 64 KiB target after the data
    np.ones((70000,), np.float32),  # data too large for a frame
    np.ones((300,), BF16),
    QuantizedWeight8bit(np.ones((8, 40000), np.int8), np.ones((1, 40000), BF16)),
    QuantizedWeight8bit(np.ones((2, 60000), np.int8), np.ones((2, 60000), BF16)),
    QuantizedWeight8bit(np.ones((2, 3, 4), np.int8), np.ones((2, 1, 4), BF16)),
]


@pytest.mark.parametrize("value", WRITER_CASES, ids=repr)
def test_writer_matches_cpython_pickler(value, tmp_path, monkeypatch, release_class):
    # CPython names numpy 1's module for _reconstruct only if it finds the function there.
    def _reconstruct(*args):
        raise AssertionError("never called")
    _reconstruct.__module__, _reconstruct.__qualname__ = "numpy.core.multiarray", "_reconstruct"
    fake = types.ModuleType("numpy.core.multiarray")
    fake._reconstruct = _reconstruct
    monkeypatch.setitem(sys.modules, "numpy.core.multiarray", fake)

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if type(obj) is np.ndarray:
                return (_reconstruct, *obj.__reduce_ex__(4)[1:])
            return NotImplemented

    obj = (release_class(value.weight, value.scales) if isinstance(value, QuantizedWeight8bit)
           else value)
    expected = io.BytesIO()
    Pickler(expected, protocol=4).dump(obj)
    pickle_format.write_tensor(tmp_path / "t", value)
    assert (tmp_path / "t").read_bytes() == expected.getvalue()


@pytest.mark.parametrize("value", WRITER_CASES, ids=repr)
def test_stdlib_pickle_reads_what_we_write(value, tmp_path):
    pickle_format.write_tensor(tmp_path / "t", value)
    assert_same(stdlib_load(tmp_path / "t"), value)
    assert_same(pickle_format.read_tensor(tmp_path / "t"), value)


def test_writer_refuses_what_the_format_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match=r"cannot store dtype object"):
        pickle_format.write_tensor(tmp_path / "t", np.array([None]))
    with pytest.raises(ValueError, match=r"needs int8 weight and bfloat16 scales, got int8 and "
                                         r"float32"):
        pickle_format.write_tensor(tmp_path / "t", QuantizedWeight8bit(
            np.ones((4, 2), np.int8), np.ones((1, 2), np.float32)))
    with pytest.raises(ValueError, match=r"scales of shape \[3, 2\] do not group weight"):
        pickle_format.write_tensor(tmp_path / "t", QuantizedWeight8bit(
            np.ones((4, 2), np.int8), np.ones((3, 2), BF16)))
    with pytest.raises(ValueError, match=r"folder .*missing does not exist"):
        pickle_format.write_tensor(tmp_path / "missing" / "t", np.ones(3, np.float32))
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


# --- the reader's stack machine ------------------------------------------------------------


def write_bytes(tmp_path, data: bytes):
    path = tmp_path / "tensor00000_000"
    path.write_bytes(data)
    return path


def reencode(data: bytes, mapping) -> bytes:
    """Rewrites a stream opcode by opcode; `mapping(op, arg)` returns new bytes or None."""
    out, ops = bytearray(), list(pickletools.genops(data))
    for (op, arg, pos), (_, _, end) in zip(ops, [*ops[1:], (None, None, len(data))],
                                           strict=True):
        new = mapping(op.name, arg)
        out += data[pos:end] if new is None else new
    return bytes(out)


def memo_as(put, get):
    """A `reencode` mapping that swaps the BINPUT/BINGET opcodes for other encodings."""
    def mapping(op, arg):
        return put(arg) if op == "BINPUT" else get(arg) if op == "BINGET" else None
    return mapping


def as_binbytes8(op, arg):
    if op in ("SHORT_BINBYTES", "BINBYTES") and len(arg) > 1:
        return b"\x8e" + struct.pack("<Q", len(arg)) + arg
    return None


def test_reads_other_pickle_encodings(tmp_path, release_class):
    """numpy 2 names, protocol 3, text and long memo opcodes, BINBYTES8: still the same
    objects, so all are accepted (Fortran order is not: see test_checkpoint_attacks.py)."""
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    q = QuantizedWeight8bit(np.arange(-6, 6, dtype=np.int8).reshape(4, 3),
                            np.array([[0.5, 1, 2]], BF16))
    q_release = release_class(q.weight, q.scales)
    q3 = pickle.dumps(q_release, protocol=3)  # GLOBAL, BINPUT and BINGET opcodes
    streams = {
        "numpy2-proto4": (pickle.dumps(a, protocol=4), a),
        "numpy2-proto4-8bit": (pickle.dumps(q_release, protocol=4), q),
        "proto3": (q3, q),
        "text-memo": (reencode(q3, memo_as(lambda i: b"p%d\n" % i, lambda i: b"g%d\n" % i)), q),
        "long-memo": (reencode(q3, memo_as(lambda i: b"r" + struct.pack("<I", i),
                                           lambda i: b"j" + struct.pack("<I", i))), q),
        "binbytes8": (reencode(q3, as_binbytes8), q),
    }
    for name, (data, want) in streams.items():
        got = pickle_format.read_tensor(write_bytes(tmp_path, data))
        assert_same(got, want)
        assert not any(x.flags.writeable for x in leaves(got)), name


HOSTILE = {
    "posix.system": lambda marker: (os.system, (f"touch {marker}",)),
    "builtins.exec": lambda marker: (exec, (f"open({str(marker)!r}, 'w')",)),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_pickle_is_refused_without_running_it(name, nano_ckpt):
    root, _ = nano_ckpt
    marker = root / "pwned"

    class Evil:
        def __reduce__(self):
            return HOSTILE[name](marker)

    for index, payload in ((3, Evil()), (9, {"weight": Evil()})):
        tensor(root, index).write_bytes(pickle.dumps(payload, protocol=4))
        pattern = (rf"tensor{index:05d}_000( \(parameter [^)]*\))?: refusing pickle global "
                   rf"'{re.escape(name)}'")
        with pytest.raises(ValueError, match=pattern):
            loader.read_checkpoint(root, spec_tree(NANO))
        with pytest.raises(ValueError, match=pattern):
            pickle_format.read_header(tensor(root, index))
        assert not marker.exists()
        loader.write_checkpoint(root, random_params(NANO))


@pytest.mark.parametrize(("data", "message"), [
    (pickle.dumps([1.0], protocol=4), r"unsupported pickle opcode EMPTY_LIST \(0x5d\)"),
    (b"\x80\x04K\x01", r"pickle stream ends at byte 4 without STOP"),
    (b"\x80\x04N.junk", r"4 unexpected trailing bytes after the pickle's STOP"),
    (b"\x80\x04N.", r"holds a NoneType, not an array or a QuantizedWeight8bit"),
    (b"\x80\x04h\x05.", r"memo entry 5 read before it is written"),
    (b"\x80\x04t.", r"no MARK before byte"),
    (b"\x80\x04\x94.", r"stack underflow at byte 2"),
    (b"\x80\x04\x95\xff\x00\x00\x00\x00\x00\x00\x00N.", r"truncated: a 255-byte frame"),
    (b"\x80\x04B\x00\x00\x01\x00.", r"truncated: 65536 bytes of data declared at byte 7"),
    (pickle.dumps(np.array([1, "a"], dtype=object), protocol=4), r"unsupported dtype 'O8'"),
    (pickle.dumps(np.ones(2, ">f4"), protocol=4), r"unsupported byte order '>' for float32"),
    (pickle.dumps(np.ones(2, "<c8"), protocol=4), r"unsupported dtype 'c8'"),
])
def test_malformed_or_unsupported_streams(data, message, tmp_path):
    path = write_bytes(tmp_path, data)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": .*" + message):
        pickle_format.read_header(path)


def test_array_bytes_must_match_the_shape(tmp_path):
    data = pickle.dumps(np.zeros(300, np.float32), protocol=4)
    assert data.count(b"M\x2c\x01") == 1  # BININT2 300, the shape
    path = write_bytes(tmp_path, data.replace(b"M\x2c\x01", b"M\x2d\x01"))
    with pytest.raises(ValueError, match=r"tensor00000_000: array float32\[301\] needs 1204 "
                                         r"bytes but the file holds 1200"):
        pickle_format.read_header(path)


# --- checkpoints -----------------------------------------------------------------------


def test_flatten_order_is_the_releases():
    config = dataclasses.replace(NANO, num_layers=11)
    names = [name for name, _ in loader.flatten(spec_tree(config))[0]]
    assert len(names) == 2 + 12 * 11
    assert names[:2] == ["language_model/in_out_embed/embeddings", "language_model/rms_norm/scale"]
    per_layer = ["moe/linear", "moe/linear_1", "moe/linear_v", "multi_head_attention/key",
                 "multi_head_attention/linear", "multi_head_attention/query",
                 "multi_head_attention/value", "rms_norm", "rms_norm_1", "rms_norm_2",
                 "rms_norm_3", "router"]
    layers = [0, 1, 10, 2, 3, 4, 5, 6, 7, 8, 9]  # keys sort as strings
    assert names[2:] == [f"transformer/decoder_layer_{i}/{m}/{'scale' if 'norm' in m else 'w'}"
                         for i in layers for m in per_layer]


def test_round_trip_quantises_floats_as_the_release(nano_ckpt):
    root, params = nano_ckpt
    files = sorted(p.name for p in (root / "ckpt-0").iterdir())
    assert files == [loader.tensor_name(i) for i in range(26)]
    got = loader.read_checkpoint(root, spec_tree(NANO))
    want = quantize_params(params)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    assert_same(got, want)
    # Already-quantised and jax-array parameters are stored as they are.
    again = root / "again"
    loader.write_checkpoint(again, jax.tree_util.tree_map(jax.numpy.asarray, want))
    assert_same(loader.read_checkpoint(again, spec_tree(NANO)), want)


def test_any_scale_grouping_that_divides_k_is_accepted(nano_ckpt, release_class):
    root, params = nano_ckpt
    w = params["transformer/decoder_layer_0/moe/linear_1"]["w"]  # K = ffn_size = 48
    pickle_format.write_tensor(tensor(root, 3), quantize(w, 4))
    got = loader.read_checkpoint(root, spec_tree(NANO))
    assert got["transformer/decoder_layer_0/moe/linear_1"]["w"].scales.shape == (4, 4, 32)
    tensor(root, 3).write_bytes(pickle.dumps(  # our writer would refuse to write this
        release_class(np.zeros(w.shape, np.int8), np.zeros((4, 5, 32), BF16)), protocol=4))
    with pytest.raises(ValueError, match=r"tensor00003_000 \(parameter transformer/"
                                         r"decoder_layer_0/moe/linear_1/w, index 3\): scales of "
                                         r"shape \[4, 5, 32\] do not group weight of shape "
                                         r"\[4, 48, 32\]"):
        loader.read_checkpoint(root, spec_tree(NANO))


def test_truncated_file(nano_ckpt):
    root, _ = nano_ckpt
    for index, keep in ((0, 1000), (0, -1), (1, -1), (5, 30)):
        path = tensor(root, index)
        data = path.read_bytes()
        path.write_bytes(data[:keep])
        with pytest.raises(ValueError, match=rf"tensor{index:05d}_000 \(parameter [^)]*, "
                                             rf"index {index}\): .*truncated"):
            loader.read_checkpoint(root, spec_tree(NANO))
        path.write_bytes(data)


def test_missing_and_extra_files(nano_ckpt):
    root, _ = nano_ckpt
    tensor(root, 5).rename(root / "elsewhere")
    with pytest.raises(ValueError, match=r"tensor00005_000 \(parameter transformer/"
                                         r"decoder_layer_0/multi_head_attention/key/w, index "
                                         r"5\): missing tensor file"):
        loader.read_checkpoint(root, spec_tree(NANO))
    (root / "elsewhere").rename(tensor(root, 5))
    shutil.copy(tensor(root, 1), tensor(root, 26))
    with pytest.raises(ValueError, match=r"tensor00026_000: unexpected tensor file; the expected "
                                         r"tree has 26 parameters"):
        loader.read_checkpoint(root, spec_tree(NANO))
    with pytest.raises(ValueError, match=r"already holds tensor00026_000, beyond the 26"):
        loader.write_checkpoint(root, random_params(NANO))


def test_missing_folders(tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint folder .*nowhere does not exist"):
        loader.read_checkpoint(tmp_path / "nowhere", spec_tree(NANO))
    with pytest.raises(ValueError, match=r"holds neither a ckpt-0 folder nor tensor files"):
        loader.read_checkpoint(tmp_path, spec_tree(NANO))


@pytest.mark.parametrize(("index", "value", "message"), [
    (1, np.ones(33, np.float32),
     r"tensor00001_000 \(parameter language_model/rms_norm/scale, index 1\): expected shape "
     r"\[32\], found \[33\]"),
    (1, np.ones(32, np.float16),
     r"tensor00001_000 \(parameter language_model/rms_norm/scale, index 1\): expected dtype "
     r"float32, found float16"),
    (5, np.ones((32, 16), np.float32),
     r"tensor00005_000 \(parameter transformer/decoder_layer_0/multi_head_attention/key/w, "
     r"index 5\): expected an 8-bit QuantizedWeight8bit, found a float32\[32, 16\] array"),
    (13, QuantizedWeight8bit(np.ones((32, 4), np.int8), np.ones((1, 4), BF16)),
     r"tensor00013_000 \(parameter transformer/decoder_layer_0/router/w, index 13\): expected "
     r"a float array \[32, 4\], found an 8-bit weight \(int8\[32, 4\] weight, "
     r"bfloat16\[1, 4\] scales\)"),
    (7, QuantizedWeight8bit(np.ones((32, 16), np.int8), np.ones((1, 16), BF16)),
     r"tensor00007_000 \(parameter transformer/decoder_layer_0/multi_head_attention/query/w, "
     r"index 7, weight\): expected shape \[32, 32\], found \[32, 16\]"),
], ids=["shape", "dtype", "float-for-8bit", "8bit-for-float", "8bit-shape"])
def test_wrong_tensor_in_place(index, value, message, nano_ckpt):
    root, _ = nano_ckpt
    pickle_format.write_tensor(tensor(root, index), value)
    with pytest.raises(ValueError, match=message):
        loader.read_checkpoint(root, spec_tree(NANO))


def test_wrong_dtype_inside_an_8bit_weight(nano_ckpt, release_class):
    root, _ = nano_ckpt
    tensor(root, 5).write_bytes(pickle.dumps(  # as the release would pickle it, via numpy 2
        release_class(np.ones((32, 16), np.int8), np.ones((1, 16), np.float32)), protocol=4))
    with pytest.raises(ValueError, match=r"tensor00005_000 \(parameter transformer/decoder_layer_0"
                                         r"/multi_head_attention/key/w, index 5, scales\): "
                                         r"expected dtype bfloat16, found float32"):
        loader.read_checkpoint(root, spec_tree(NANO))


@pytest.mark.parametrize(("change", "message"), [
    ({"emb_size": 128, "key_size": 8},
     r"tensor00000_000 \(parameter language_model/in_out_embed/embeddings, index 0\): expected "
     r"shape \[4096, 128\], found \[4096, 256\]"),
    ({"num_layers": 1}, r"tensor00014_000: unexpected tensor file; the expected tree has 14 "
                        r"parameters"),
    ({"num_layers": 3}, r"tensor00026_000 \(parameter transformer/decoder_layer_2/moe/linear/"
                        r"w, index 26\): missing tensor file"),
    ({"num_experts": 4},
     r"tensor00002_000 \(parameter transformer/decoder_layer_0/moe/linear/w, index 2, weight\): "
     r"expected shape \[4, 256, 1368\], found \[8, 256, 1368\]"),
])
def test_fixture_with_the_wrong_config(change, message, fixture_dir):
    with pytest.raises(ValueError, match=message):
        loader.read_checkpoint(fixture_dir, spec_tree(dataclasses.replace(TINY, **change)))


# --- placing on devices ------------------------------------------------------------------


def test_load_on_one_device(nano_ckpt, capsys, monkeypatch):
    root, _ = nano_ckpt
    device = jax.devices()[0]
    calls = []

    def sharding_for(path, kind, shape):
        calls.append((path, kind, shape))
        return SingleDeviceSharding(device)

    params = loader.load_checkpoint(root, spec_tree(NANO), sharding_for, progress=False)
    assert capsys.readouterr().err == ""
    host = loader.read_checkpoint(root, spec_tree(NANO))
    assert_same(params, host)
    assert all(isinstance(x, jax.Array) and x.sharding == SingleDeviceSharding(device)
               for x in leaves(params))
    assert isinstance(params["transformer/decoder_layer_1/moe/linear"]["w"], QuantizedWeight8bit)
    assert ("language_model/rms_norm/scale", "value", (32,)) in calls
    assert ("transformer/decoder_layer_0/moe/linear_1/w", "weight", (4, 48, 32)) in calls
    assert ("transformer/decoder_layer_0/moe/linear_1/w", "scales", (4, 8, 32)) in calls
    assert len(calls) == 26 + 14  # one per file, plus one for each 8-bit weight's scales
    # By default the progress line appears only once loading turns out slow.
    loader.load_checkpoint(root, spec_tree(NANO), sharding_for)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(loader, "_PROGRESS_AFTER_S", 0.0)
    loader.load_checkpoint(root, spec_tree(NANO), sharding_for)
    assert "loading checkpoint: 26/26 tensors" in capsys.readouterr().err


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs two devices (conftest sets eight)")
def test_load_sharded_over_two_devices(nano_ckpt, capsys):
    root, _ = nano_ckpt
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))

    def sharding_for(path, kind, shape):
        # 8-bit weights split along K, floats along their last axis: shards of both kinds.
        axis = len(shape) - 2 if kind == "weight" else len(shape) - 1
        spec = [None] * len(shape)
        if shape[axis] % 2 == 0:
            spec[axis] = "x"
        return NamedSharding(mesh, PartitionSpec(*spec))

    params = loader.load_checkpoint(root, spec_tree(NANO), sharding_for, progress=True)
    assert re.search(r"loading checkpoint: 26/26 tensors, [\d.]+/[\d.]+ GB, [\d.]+ GB/s\n$",
                     capsys.readouterr().err)
    host = loader.read_checkpoint(root, spec_tree(NANO))
    split = 0
    for array, mapped in zip(leaves(params), leaves(host), strict=True):
        assert len(array.addressable_shards) == 2
        for shard in array.addressable_shards:
            assert np.asarray(shard.data).tobytes() == np.ascontiguousarray(
                mapped[shard.index]).tobytes()
            split += shard.data.shape != mapped.shape
    assert split > 0
    assert_same(params, host)


def test_sharding_for_must_return_a_sharding(nano_ckpt):
    root, _ = nano_ckpt
    with pytest.raises(ValueError, match=r"sharding_for\('language_model/in_out_embed/embeddings'"
                                         r", 'value', \[512, 32\]\) returned a str"):
        loader.load_checkpoint(root, spec_tree(NANO), lambda *_: "cpu:0", progress=False)


def test_write_checkpoint_refuses_bad_input(tmp_path):
    params = random_params(NANO)
    params["language_model/rms_norm"]["scale"] = np.arange(32)
    with pytest.raises(ValueError, match=r"parameter language_model/rms_norm/scale: expected a "
                                         r"float array or a quantised weight, got ndarray of "
                                         r"dtype int64"):
        loader.write_checkpoint(tmp_path, params)
    assert not (tmp_path / "ckpt-0").exists()  # checked before writing anything
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"file/ckpt-0: a file is in the way"):
        loader.write_checkpoint(tmp_path / "file", random_params(NANO))
    with pytest.raises(ValueError, match=r"parameter trees must be nested dicts; found the path "
                                         r"\['a'\]\[0\]"):
        loader.write_checkpoint(tmp_path, {"a": [np.ones(2, np.float32)]})


def test_parallel_load_holds_at_most_the_largest_tensor_in_flight(nano_ckpt, monkeypatch):
    """Tensors load on a thread pool, but never more bytes at once than the largest one:
    the memory bound on transient copies."""
    root, _ = nano_ckpt
    in_flight, peak, most_at_once, lock = [0, 0], [0], [0], threading.Lock()
    read = loader._read_slices

    def tracking_read(host, slices):
        with lock:
            in_flight[0] += host.nbytes
            in_flight[1] += 1
            peak[0] = max(peak[0], in_flight[0])
            most_at_once[0] = max(most_at_once[0], in_flight[1])
        time.sleep(0.002)  # long enough for other threads to try to start
        try:
            return read(host, slices)
        finally:
            with lock:
                in_flight[0] -= host.nbytes
                in_flight[1] -= 1

    monkeypatch.setattr(loader, "_read_slices", tracking_read)
    single = SingleDeviceSharding(jax.devices()[0])
    loader.load_checkpoint(root, spec_tree(NANO), lambda *_: single, progress=False)
    sizes = [sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(value)) for _, value in
             loader.flatten(loader.read_checkpoint(root, spec_tree(NANO)))[0]]
    assert peak[0] <= max(sizes)
    assert most_at_once[0] >= 2  # the small tensors did load in parallel


# --- reading at scale ----------------------------------------------------------------------


def count_reads(monkeypatch) -> list:
    """Records (bytes, thread) for every read the loader makes from a tensor file."""
    reads, read = [], loader._read_piece

    def counting(fd, host, src, dst):
        reads.append((dst.nbytes, threading.get_ident()))
        return read(fd, host, src, dst)

    monkeypatch.setattr(loader, "_read_piece", counting)
    return reads


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_bad_last_file_fails_before_any_data_is_read(damage, nano_ckpt, monkeypatch):
    """Every header is checked before the first byte of data is read: a damaged last file
    stops the load before minutes go into the files before it."""
    root, _ = nano_ckpt
    last = tensor(root, 25)
    data = last.read_bytes()
    last.write_bytes(data[:-1] if damage == "truncated" else b"\x80\x04junk" + data[10:])
    reads, placed = count_reads(monkeypatch), []
    monkeypatch.setattr(loader, "_assemble", lambda *args: placed.append(args))
    single = SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(ValueError, match=r"tensor00025_000 \(parameter [^)]*\): "):
        loader.load_checkpoint(root, spec_tree(NANO), lambda *_: single, progress=False)
    assert reads == [] and placed == []


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs two devices (conftest sets eight)")
@pytest.mark.parametrize("split_axis", [0, -1], ids=["rows", "columns"])
def test_large_tensors_are_read_in_parallel_pieces(split_axis, nano_ckpt, monkeypatch):
    """With pieces far smaller than the tensors, each shard is read in many pieces on
    several threads, by positional reads (contiguous slices, split by rows) or through the
    map (strided ones, split by columns); the result is the same arrays."""
    root, _ = nano_ckpt
    monkeypatch.setattr(loader, "_PIECE_BYTES", 300)
    reads = count_reads(monkeypatch)
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))

    def sharding_for(path, kind, shape):
        spec = [None] * len(shape)
        axis = split_axis % len(shape)
        if shape[axis] % 2 == 0:
            spec[axis] = "x"
        return NamedSharding(mesh, PartitionSpec(*spec))

    params = loader.load_checkpoint(root, spec_tree(NANO), sharding_for, progress=False)
    host = loader.read_checkpoint(root, spec_tree(NANO))
    assert_same(params, host)
    for array, mapped in zip(leaves(params), leaves(host), strict=True):
        for shard in array.addressable_shards:
            assert np.asarray(shard.data).tobytes() == np.ascontiguousarray(
                mapped[shard.index]).tobytes()
    assert sum(n for n, _ in reads) == sum(x.nbytes for x in leaves(host))
    assert len(reads) > 200 and len({thread for _, thread in reads}) > 1


def test_pieces_cover_a_view_once_within_the_limit():
    base = np.arange(6 * 50 * 40, dtype=np.int16).reshape(6, 50, 40)
    for view in (base, base[:, 10:30], base[2:5, :, 8:16], base[1], base[0, 0]):
        for limit in (1, 64, 1000, 5000, 10**6):
            covered = np.zeros(view.shape, int)
            for piece in loader._pieces(view, limit):
                covered[piece] += 1
                block = view[piece]
                # A piece exceeds the limit only where one element of its split axis does.
                assert loader._span(block) <= max(limit, loader._span(block[0])
                                                      if block.ndim else 0)
            assert (covered == 1).all()


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs four devices (conftest sets eight)")
def test_devices_holding_the_same_slice_share_one_read(nano_ckpt, monkeypatch):
    root, _ = nano_ckpt
    reads = count_reads(monkeypatch)
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("x", "y"))

    def sharding_for(path, kind, shape):  # split in two along "x", the same on both "y"s
        return NamedSharding(mesh, PartitionSpec("x" if shape[0] % 2 == 0 else None))

    params = loader.load_checkpoint(root, spec_tree(NANO), sharding_for, progress=False)
    assert_same(params, loader.read_checkpoint(root, spec_tree(NANO)))
    assert sum(n for n, _ in reads) == sum(x.nbytes for x in leaves(params))


def test_loaded_arrays_do_not_depend_on_the_files(nano_ckpt):
    """Shards are fresh buffers, never the memory map: rewriting the files in place (same
    inodes) afterwards leaves what was loaded as it was."""
    root, _ = nano_ckpt
    single = SingleDeviceSharding(jax.devices()[0])
    params = loader.load_checkpoint(root, spec_tree(NANO), lambda *_: single,
                                        progress=False)
    want = [np.asarray(x).copy() for x in leaves(params)]
    for path in (root / "ckpt-0").iterdir():
        with open(path, "r+b") as f:
            f.write(b"\0" * path.stat().st_size)
    assert all(np.asarray(x).tobytes() == w.tobytes()
               for x, w in zip(leaves(params), want, strict=True))


# --- the converter (tools/convert_checkpoint.py) ------------------------------------------


@pytest.fixture(scope="module")
def converter():
    import importlib.util

    from conftest import REPO
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", REPO / "tools" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_converter_copies_the_release_files_exactly(converter, fixture_dir, tmp_path):
    assert converter.main([str(fixture_dir), str(tmp_path / "copy"), "--config", "tiny"]) == 0
    for index in range(26):
        assert tensor(tmp_path / "copy", index).read_bytes() == \
            tensor(fixture_dir, index).read_bytes()
    assert json.loads((tmp_path / "copy" / "config.json").read_text()) == TINY.to_dict()


def test_converter_keeps_the_first_layers(converter, fixture_dir, tmp_path):
    summary = converter.convert(fixture_dir, tmp_path / "one", "tiny", layers=1)
    assert summary["tensors"] == 2 + 12 and summary["num_layers"] == 1
    smaller = dataclasses.replace(TINY, num_layers=1)
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    assert config == smaller.to_dict()
    got = loader.read_checkpoint(tmp_path / "one", smaller)  # validates every file
    source = loader.read_checkpoint(fixture_dir, TINY)
    assert set(got) == {m for m in source if "decoder_layer_1/" not in m}
    assert_same(got, {m: source[m] for m in got})
    files = (tmp_path / "one" / "ckpt-0").iterdir()
    assert summary["bytes"] == sum(p.stat().st_size for p in files)
    assert summary["bytes"] > sum(x.nbytes for x in leaves(got))  # data and headers


def test_converter_refuses_bad_requests(converter, nano_ckpt, tmp_path, capsys):
    root, _ = nano_ckpt
    assert converter.main([str(root), str(tmp_path / "out"), "--config", "nano",
                           "--layers", "3"]) == 2
    assert "--layers must be between 1 and the source's num_layers=2, got 3" in \
        capsys.readouterr().err
    assert converter.main([str(root), str(root), "--config", "nano"]) == 2
    assert "is the source checkpoint's own folder" in capsys.readouterr().err
    assert converter.main([str(root), str(tmp_path / "out"), "--config", "tiny"]) == 2
    assert "expected shape [4096, 256], found [512, 32]" in capsys.readouterr().err
    assert not (tmp_path / "out" / "ckpt-0").exists()  # checked before writing
    assert converter.main([str(root), str(tmp_path / "out"), "--config", "nano"]) == 0
    assert converter.main([str(root), str(tmp_path / "out"), "--config", "nano"]) == 2
    assert "ckpt-0 is not empty" in capsys.readouterr().err


def test_converter_flag_mistakes_are_one_line(converter, capsys):
    assert converter.main(["--layers", "2"]) == 2
    assert capsys.readouterr().err == ("error: the following arguments are required: source, "
                                       "destination\n")
