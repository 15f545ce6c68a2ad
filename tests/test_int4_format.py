"""The 4-bit checkpoint format: packing, the converter, the loader, and damaged or hostile
files, which fail with one bounded line naming the file like any other checkpoint file."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from test_int4 import CONFIG, GROUP

from grok import Grok, checkpoint, model, sharding
from grok.checkpoint import int4_format
from grok.checkpoint.files import MAX_MESSAGE
from grok.errors import CheckpointError, GrokError
from grok.quant import QuantizedWeight4bit, quantize4, quantize_params

REPO = Path(__file__).resolve().parents[1]
EXPERT_INDEX = 2  # tensor00002_000: transformer/decoder_layer_0/moe/linear/w


def test_pack_round_trips_every_value():
    values = np.array([[-8, -7, -1, 0, 1, 6, 7, 3]] * 3, np.int8).astype(ml_dtypes.int4)
    packed = int4_format.pack(values)
    assert packed.dtype == np.uint8 and packed.shape == (3, 4)
    assert packed[0, 0] == (0x8 | (0x9 << 4))  # -8 low nibble, -7 high nibble
    np.testing.assert_array_equal(int4_format.unpack(packed), values)


def test_a_tensor_file_round_trips(tmp_path):
    """Written whole or requantised from int8 block by block, the file reads back as the
    whole tensor's conversion, bit for bit; the layout is the one README documents."""
    rng = np.random.default_rng(0)
    w8 = quantize_params({"transformer/decoder_layer_0/moe/linear": {
        "w": rng.standard_normal((2, 2048, 6)).astype(np.float32)}})
    w8 = w8["transformer/decoder_layer_0/moe/linear"]["w"]
    want = quantize4(w8, 32)
    for value, group in ((want, None), (w8, 32)):  # 2048 rows: two blocks of rows
        path = tmp_path / f"t{group}"
        int4_format.write_tensor(path, value, group)
        header = int4_format.read_header(path)
        assert header.shape == (2, 2048, 6) and header.group == 32
        assert header.weight_offset % 64 == 0 and header.scales_offset % 64 == 0
        got = int4_format.open_tensor(path, header).unpacked()
        np.testing.assert_array_equal(got.weight, want.weight)
        np.testing.assert_array_equal(got.scales, want.scales)
        raw = path.read_bytes()
        assert raw[:8] == b"\x93GROK-Q4"
        length = struct.unpack("<I", raw[8:12])[0]
        assert json.loads(raw[12:12 + length])["group"] == 32
        assert len(raw) == header.scales_offset + 2 * 2 * 64 * 6


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """An 8-bit checkpoint of CONFIG and its 4-bit conversion by the converter tool."""
    root = tmp_path_factory.mktemp("src")
    params = quantize_params(jax.tree.map(np.asarray,
                                          model.init_params(CONFIG, jax.random.key(3))))
    checkpoint.write_checkpoint(root, params)
    CONFIG.to_json(root / "config.json")
    out = tmp_path_factory.mktemp("dst") / "q4"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"),
                           str(root), str(out), "--config", str(root / "config.json"),
                           "--weights", "int4", "--int4-group", str(GROUP)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return root, out, params


def test_the_converter_writes_4bit_experts_and_keeps_the_rest(converted):
    root, out, params = converted
    names = [name for name, _ in checkpoint.flatten(params)[0]]
    for index, name in enumerate(names):
        file = out / "ckpt-0" / checkpoint.tensor_name(index)
        is_expert = "/moe/" in name
        assert int4_format.is_int4_file(file) == is_expert
        if not is_expert:  # byte for byte the release-format file
            assert file.read_bytes() == (root / "ckpt-0" / file.name).read_bytes()
    size = sum(p.stat().st_size for p in (out / "ckpt-0").iterdir())
    source = sum(p.stat().st_size for p in (root / "ckpt-0").iterdir())
    assert size < 0.7 * source


@pytest.mark.parametrize("mesh_shape, layers", [((1, 1), "unrolled"), ((2, 4), "scan")])
def test_a_4bit_checkpoint_loads_as_the_conversion_while_loading(converted, mesh_shape,
                                                                 layers):
    """Read directly, a 4-bit checkpoint gives the very arrays that converting the 8-bit one
    while loading gives, on any mesh, stacked or not."""
    root, out, _ = converted
    mesh = sharding.make_mesh(mesh_shape)

    def load(folder, group):
        return checkpoint.load_checkpoint(
            folder, model.abstract_params(CONFIG),
            lambda path, kind, shape: sharding.param_sharding(mesh, path, kind, shape),
            progress=False, stacked=layers == "scan", int4_group=group)
    direct, converted_here = load(out, None), load(root, GROUP)
    for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(converted_here), strict=True):
        assert a.dtype == b.dtype and a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(isinstance(v, QuantizedWeight4bit)
               for bundle in direct.values() for v in bundle.values())


def test_a_4bit_checkpoint_runs_int4_or_dequantized_but_not_int8(converted):
    _, out, _ = converted
    tokens = np.random.default_rng(4).integers(3, CONFIG.vocab_size, (1, 8))
    int4 = Grok.load(out, CONFIG, mesh_shape=(1, 1), weights="int4").logits(tokens)
    assert np.isfinite(int4).all()
    with pytest.raises(CheckpointError, match=r"tensor00002_000 \(parameter transformer/"
                                              r"decoder_layer_0/moe/linear/w, index 2\): the "
                                              r"checkpoint holds 4-bit expert weights: load it "
                                              r"with weights int4 \(or dequantized\)"):
        Grok.load(out, CONFIG, mesh_shape=(1, 1), weights="int8")


def test_the_converter_checks_the_group_before_writing(converted, tmp_path):
    root, _, _ = converted
    done = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"),
                           str(root), str(tmp_path / "out"), "--config",
                           str(root / "config.json"), "--weights", "int4",
                           "--int4-group", "96"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "int4_group=96 does not divide the 128 rows" in done.stderr
    assert not any((tmp_path / "out" / "ckpt-0").glob("tensor*"))


def _damaged(raw: bytes, change: str) -> bytes:
    length = struct.unpack("<I", raw[8:12])[0]
    fields = json.loads(raw[12:12 + length])

    def with_header(new: dict) -> bytes:
        text = json.dumps(new).encode().ljust(length, b" ")
        assert len(text) == length
        return raw[:12] + text + raw[12 + length:]
    if change == "truncated":
        return raw[:-1]
    if change == "trailing":
        return raw + b"\0"
    if change == "huge header":
        return raw[:8] + struct.pack("<I", 1 << 31) + raw[12:]
    if change == "not json":
        return raw[:12] + b"\x1b[2J" + b"{" * (length - 4) + raw[12 + length:]
    if change == "extra key":
        return with_header({**fields, "x": 1})
    if change == "odd columns":
        return with_header({**fields, "shape": [*fields["shape"][:-1], 255]})
    if change == "bad group":
        return with_header({**fields, "group": 3})
    if change == "overlap":
        return with_header({**fields, "scales": {**fields["scales"],
                                                 "offset": fields["weight"]["offset"]}})
    if change == "huge shape":
        return with_header({**fields, "shape": [10 ** 30, 128, 256]})
    if change == "wrong nbytes":
        return with_header({**fields, "shape": [8, 64, 256]})
    raise AssertionError(change)


@pytest.mark.parametrize("change, message", [
    ("truncated", r"the data ends at byte \d+, but the file has \d+ bytes \(truncated\)"),
    ("trailing", r"\(trailing bytes\)"),
    ("huge header", r"4-bit header of 2147483648 bytes: at most 4096"),
    ("not json", r"4-bit header is not JSON"),
    ("extra key", r"expected the keys \['group', 'scales', 'shape', 'version', 'weight'\]"),
    ("odd columns", r"an even last axis, got shape \[8, 128, 255\]"),
    ("bad group", r"int4_group=3 does not divide the 128 rows"),
    ("overlap", r"offsets \d+ and \d+ must follow the header"),
    ("huge shape", r"each size must be an integer in"),
    ("wrong nbytes", r"weight nbytes '131072' does not match the shape, which needs 65536"),
    ("other shape", r"expected shape \[8, 128, 256\], found \[8, 64, 256\]"),
])
def test_damaged_4bit_files_fail_cleanly(converted, tmp_path, change, message):
    """Each damage is found from the header and the file's size, before any data is
    mapped, and reported in one bounded, printable line naming the file and parameter."""
    _, out, _ = converted
    copy = tmp_path / "q4"
    (copy / "ckpt-0").mkdir(parents=True)
    for file in (out / "ckpt-0").iterdir():
        (copy / "ckpt-0" / file.name).write_bytes(file.read_bytes())
    target = copy / "ckpt-0" / checkpoint.tensor_name(EXPERT_INDEX)
    if change == "other shape":  # a sound 4-bit file of another shape
        target.unlink()
        int4_format.write_tensor(target, QuantizedWeight4bit.from_values(
            np.zeros((8, 64, 256), ml_dtypes.int4), np.zeros((8, 4, 256), ml_dtypes.bfloat16)))
    else:
        target.write_bytes(_damaged(target.read_bytes(), change))
    with pytest.raises(CheckpointError, match=message) as info:
        Grok.load(copy, CONFIG, mesh_shape=(1, 1), weights="int4")
    text = str(info.value)
    assert "tensor00002_000 (parameter transformer/decoder_layer_0/moe/linear/w" in text
    assert len(text) <= MAX_MESSAGE and text.isprintable()


def test_a_4bit_file_where_no_expert_belongs_is_refused(converted, tmp_path):
    """Only expert weights may be 4-bit: a 4-bit file in an attention weight's place is
    named as such."""
    _, out, _ = converted
    copy = tmp_path / "q4"
    (copy / "ckpt-0").mkdir(parents=True)
    for file in (out / "ckpt-0").iterdir():
        (copy / "ckpt-0" / file.name).write_bytes(file.read_bytes())
    names = [name for name, _ in checkpoint.flatten(model.abstract_params(CONFIG))[0]]
    attention = names.index("transformer/decoder_layer_0/multi_head_attention/query/w")
    (copy / "ckpt-0" / checkpoint.tensor_name(attention)).write_bytes(
        (copy / "ckpt-0" / checkpoint.tensor_name(EXPERT_INDEX)).read_bytes())
    with pytest.raises(CheckpointError, match=r"found a 4-bit tensor where the model has an "
                                              r"8-bit weight \[128, 128\]; only expert "
                                              r"weights may be 4-bit"):
        Grok.load(copy, CONFIG, mesh_shape=(1, 1), weights="int4")


def test_writing_a_bad_value_is_a_clear_error(tmp_path):
    with pytest.raises((ValueError, GrokError), match=r"even last axis"):
        int4_format.write_tensor(tmp_path / "t", QuantizedWeight4bit.from_values(
            np.zeros((4, 3), ml_dtypes.int4), np.zeros((1, 3), ml_dtypes.bfloat16)))
    assert not list(tmp_path.iterdir())
