"""One regression test per finding of the attack on the checkpoint reader, each
on hostile files generated here. Inputs that once hung or blew up are parsed in a worker
process with a time limit and an address-space cap, so that they fail, not hang."""

import json
import os
import pickle
import re
import socket
import struct
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from checkpoint_worker import message_problems, run_files
from conftest import REPO
from test_checkpoint import assert_same, stdlib_load

from grok.checkpoint import loader, manifest, pickle_format
from grok.checkpoint.files import MAX_MESSAGE
from grok.errors import CheckpointError
from grok.quant import quantize

BF16 = np.dtype(ml_dtypes.bfloat16)


# --- a small assembler of pickle opcodes ---------------------------------------------


def text(s: str) -> bytes:
    data = s.encode("utf-8", "surrogatepass")
    if len(data) < 256:
        return b"\x8c" + bytes([len(data)]) + data
    return b"X" + struct.pack("<I", len(data)) + data


def integer(x: int) -> bytes:
    if 0 <= x < 256:
        return b"K" + bytes([x])
    data = x.to_bytes((x.bit_length() + 8) // 8, "little", signed=True)
    assert len(data) < 256
    return b"\x8a" + bytes([len(data)]) + data


def raw(data: bytes) -> bytes:
    return (b"C" + bytes([len(data)]) if len(data) < 256
            else b"B" + struct.pack("<I", len(data))) + data


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def glob(module: str, name: str) -> bytes:
    return text(module) + text(name) + b"\x93"


def dtype(code: str = "f4", args: bytes | None = None, state: bytes | None = None) -> bytes:
    args = tup(text(code), b"\x89", b"\x88") if args is None else args
    order = "|" if code in ("i1", "u1", "b1") else "<"
    if state is None:
        state = b"(K\x03" + text(order) + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"
    return glob("numpy", "dtype") + args + b"R" + state + b"b"


def array(shape: bytes, dtype_ops: bytes, data: bytes, fortran: bool = False) -> bytes:
    return (glob("numpy._core.multiarray", "_reconstruct")
            + tup(glob("numpy", "ndarray"), tup(integer(0)), raw(b"b")) + b"R"
            + tup(integer(1), shape, dtype_ops, b"\x88" if fortran else b"\x89", raw(data))
            + b"b")


def stream(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


def write(folder, name: str, data: bytes):
    path = folder / name
    path.write_bytes(data)
    return path


def assert_well_formed(error: Exception, path) -> str:
    message = str(error)
    assert isinstance(error, CheckpointError), repr(error)
    assert not message_problems(message, str(path)), (message_problems(message, str(path)),
                                                      message)
    return message


def test_the_assembler_builds_what_numpy_reads(tmp_path):
    """The hostile files below are these valid ones with one part changed."""
    path = write(tmp_path, "t", stream(array(tup(integer(2), integer(3)), dtype("f4"),
                                             np.arange(6, dtype=np.float32).tobytes())))
    np.testing.assert_array_equal(pickle.loads(path.read_bytes()),
                                  np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(pickle_format.read_tensor(path),
                                  np.arange(6, dtype=np.float32).reshape(2, 3))


def refused(results: dict, path, pattern: str, seconds: float = 2.0) -> str:
    """The worker's verdict on `path`: refused within `seconds`, its message matching."""
    result = results[str(path)]
    assert result["outcome"] == "refused", result
    assert re.search(pattern, result["detail"]), result["detail"]
    assert result["seconds"] < seconds, result
    return result["detail"]


# --- 1. shape arithmetic ---------------------------------------------------------------


def test_1_huge_shapes_are_refused_before_any_arithmetic(tmp_path):
    big = integer((1 << 2030) + 12345)  # 255 bytes: the largest LONG1
    memo_refs = {  # many dimensions, each the same huge integer via a short memo reference
        "dims-9000": 9000, "dims-20000": 20000}
    paths = {}
    for name, count in memo_refs.items():
        shape = b"(" + big + b"q\x00" + b"h\x00" * count + b"t"
        paths[name] = write(tmp_path, name, stream(array(shape, dtype("f4"), b"\0" * 8)))
    assert paths["dims-20000"].stat().st_size < 50_000  # a few KB for a shape of minutes
    paths["huge-dims"] = write(tmp_path, "huge-dims", stream(array(
        tup(*[big] * 30), dtype("f4"), b"\0" * 8)))
    file_sized = integer(100)  # each dimension passes alone; their product cannot
    paths["big-product"] = write(tmp_path, "big-product", stream(array(
        tup(*[file_sized] * 30), dtype("f4"), b"\0" * 8)))
    paths["65-dims"] = write(tmp_path, "65-dims", stream(array(
        tup(*[integer(1)] * 65), dtype("f4"), b"\0" * 4)))
    paths["negative"] = write(tmp_path, "negative", stream(array(
        tup(integer(-2), integer(-1)), dtype("f4"), b"\0" * 8)))
    results = run_files(list(paths.values()), timeout=60)
    refused(results, paths["dims-20000"], r"more than 10000 pickle opcodes")
    refused(results, paths["dims-9000"], r"array of 9001 dimensions; at most 32")
    refused(results, paths["65-dims"], r"array of 65 dimensions; at most 32")
    refused(results, paths["huge-dims"], r"dimension 0 of the array's shape: expected an "
                                         r"integer from 0 to \d+, found <an integer of 2031 bits>")
    refused(results, paths["big-product"], r"array float32\[100, 100, .*\] needs more than 8 bytes "
                                           r"but the file holds 8")
    refused(results, paths["negative"], r"dimension 0 .* found -2")


# --- 2. messages that explode -------------------------------------------------------------


def test_2_messages_stay_small_however_the_stream_is_shaped(tmp_path):
    # Each level refers twice to the level below: a repr of 2**40 leaves, from 300 bytes.
    graph = b"K\x00\x85q\x00" + b"".join(b"h%c\x86q%c" % (i, i + 1) for i in range(40))
    paths = {
        "graph-as-dtype-args": stream(glob("numpy", "dtype") + graph + b"R"),
        "graph-as-shape": stream(array(tup(graph), dtype("f4"), b"\0" * 4)),
        "graph-as-state": stream(glob("numpy._core.multiarray", "_reconstruct")
                                 + tup(glob("numpy", "ndarray"), tup(integer(0)), raw(b"b"))
                                 + b"R" + graph + b"b"),
        # 30,000 references to one 64 KiB string, and (allowed) 9,000 to a 256-byte one.
        "long-string-refs": stream(glob("numpy", "dtype") + b"(" + text("x" * 65536) + b"q\x00"
                                   + b"h\x00" * 30000 + b"tR"),
        "string-refs": stream(glob("numpy", "dtype") + b"(" + text("\x1b" * 256) + b"q\x00"
                              + b"h\x00" * 9000 + b"tR"),
        # Deep nesting: past the opcode limit, and within it.
        "deep-100000": stream(glob("numpy", "dtype") + b"K\x00" + b"\x85" * 100000 + b"R"),
        "deep-9000": stream(glob("numpy", "dtype") + b"K\x00" + b"\x85" * 9000 + b"R"),
    }
    paths = {name: write(tmp_path, name, data) for name, data in paths.items()}
    assert paths["graph-as-dtype-args"].stat().st_size < 400
    results = run_files(list(paths.values()), mem_mb=1024, timeout=60)
    shown = refused(results, paths["graph-as-dtype-args"],
                    r"unexpected numpy.dtype arguments \(\(\(0,\), \(0,\)\), \(\(0,\), \(0,\)\)\)"
                    r"\)|unexpected numpy.dtype arguments \(")
    assert len(shown) < 400
    refused(results, paths["graph-as-shape"], r"dimension 0 of the array's shape: .*found \(")
    refused(results, paths["graph-as-state"], r"unexpected ndarray state \(")
    refused(results, paths["long-string-refs"], r"string of 65536 bytes .* implausibly long")
    message = refused(results, paths["string-refs"], r"unexpected numpy.dtype arguments")
    assert r"\x1b" in message and "\x1b" not in message and "... 9001 in all" in message
    refused(results, paths["deep-100000"], r"more than 10000 pickle opcodes")
    refused(results, paths["deep-9000"], r"unexpected numpy.dtype arguments \(\(<tuple of 1>,\),\)")
    for result in results.values():
        assert len(result["detail"]) <= MAX_MESSAGE


# --- 3. every failure is a CheckpointError naming the file, in one clean line ----------


@pytest.mark.parametrize(("name", "data", "pattern"), [
    # Python's 4300-digit limit on int(): memo indices are refused long before it.
    ("digit-limit-get", stream(b"g" + b"7" * 5000 + b"\n"), r"overlong text argument"),
    ("digit-limit-put", stream(b"N" + b"p" + b"1" * 5000 + b"\n"), r"overlong text argument"),
    ("long-memo-index", stream(b"N" + b"p" + b"1" * 200 + b"\n"),
     r"bad memo index b'1111.*\.\.\. \(200 in all\)"),
    ("bytes-as-dtype", stream(dtype(args=tup(raw(b"f4"), b"\x89", b"\x88"))),
     r"unsupported dtype b'f4'"),
    ("global-as-dtype", stream(dtype(args=tup(glob("numpy", "ndarray"), b"\x89", b"\x88"))),
     r"unsupported dtype <reference to numpy.ndarray>"),
    ("array-as-dtype", stream(array(tup(integer(1)), array(tup(integer(1)), dtype(), b"1234"),
                                    b"1234")), r"array dtype is a ndarray, not a numpy dtype"),
    ("ansi-global", stream(glob("\x1b[2J\x1b[H", "checkpoint OK\n") + b"."),
     r"refusing pickle global '\\x1b\[2J\\x1b\[H\.checkpoint OK\\n'"),
    ("ansi-dtype", stream(dtype("\x1b[31mf4")), r"unsupported dtype '\\x1b\[31mf4'"),
    ("rtl-key", stream(glob("__main__", "QuantizedWeight8bit") + b")\x81}(" + text("\u202e")
                       + b"Nub"), r"found \('\\u202e',\)"),
])
def test_3_messages_name_the_file_in_one_printable_line(name, data, pattern, tmp_path):
    path = write(tmp_path, name, data)
    with pytest.raises(CheckpointError) as caught:
        pickle_format.read_header(path)
    assert re.search(pattern, assert_well_formed(caught.value, path)), str(caught.value)


@pytest.mark.parametrize("error", [RecursionError, MemoryError, OverflowError, TypeError])
def test_3_python_errors_become_checkpoint_errors(error, tmp_path, monkeypatch):
    def fail(self):
        raise error("deep inside")
    monkeypatch.setattr(pickle_format._Parser, "run", fail)
    path = write(tmp_path, "t", stream(b"N"))
    with pytest.raises(CheckpointError, match=r"/t( \(p\))?: .*(nested too deeply|more memory|"
                                              r"malformed pickle stream)") as caught:
        pickle_format.read_header(path, "p")
    assert "(p)" in str(caught.value)


def test_3_numpy_errors_become_checkpoint_errors(tmp_path):
    path = write(tmp_path, "t", stream(array(tup(integer(4)), dtype(), b"\0" * 16)))
    header = pickle_format.read_header(path)
    bad = pickle_format.ArrayHeader((4,), np.dtype("f4"), False, header.offset + 1 << 40, 16)
    with pytest.raises(CheckpointError, match=r"/t: the file is now \d+ bytes"):
        pickle_format.open_tensor(path, bad)


def special_files(folder) -> dict:
    """A directory, a character device, a dangling link and a socket, each in place of a
    tensor file; FIFOs are in the worker tests below (opening one can block)."""
    (folder / "dir").mkdir()
    os.symlink("/dev/null", folder / "device")
    os.symlink(folder / "nowhere", folder / "dangling")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "socket"))
    return {"dir": r"found a directory", "device": r"found a character device",
            "dangling": r"found a dangling symbolic link to '.*nowhere'",
            "socket": r"found a socket"}, sock


def test_3_special_files_are_named_as_what_they_are(tmp_path):
    expected, sock = special_files(tmp_path)
    try:
        for name, pattern in expected.items():
            with pytest.raises(CheckpointError, match=rf"/{name}: expected a tensor file, "
                                                      rf"{pattern}"):
                pickle_format.read_header(tmp_path / name)
    finally:
        sock.close()


def nano_like(folder) -> dict:
    """A two-parameter checkpoint, one float and one 8-bit, and its expected tree."""
    rng = np.random.default_rng(0)
    params = {"m": {"a": rng.standard_normal((16, 8)).astype(np.float32),
                    "b": quantize(rng.standard_normal((32, 8)), 4)}}
    (folder / "ckpt-0").mkdir(parents=True)
    for index, (_, value) in enumerate(loader.flatten(params)[0]):
        pickle_format.write_tensor(folder / "ckpt-0" / loader.tensor_name(index), value)
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)


def test_3_the_loader_says_what_is_in_place_of_a_tensor_file(tmp_path):
    expected = nano_like(tmp_path)
    file = tmp_path / "ckpt-0" / "tensor00001_000"
    data = file.read_bytes()
    file.unlink()
    for kind, pattern in (("dir", "found a directory"), ("dangling", "found a dangling "
                                                                     "symbolic link"),
                          ("device", "found a character device"), ("missing", "missing")):
        if kind == "dir":
            file.mkdir()
        elif kind == "dangling":
            os.symlink(tmp_path / "gone", file)
        elif kind == "device":
            os.symlink("/dev/null", file)
        with pytest.raises(CheckpointError, match=r"tensor00001_000 \(parameter m/b, index 1\)"
                                                  rf": .*{pattern}"):
            loader.read_checkpoint(tmp_path, expected)
        file.rmdir() if kind == "dir" else file.unlink(missing_ok=True)
    file.write_bytes(data)
    loader.read_checkpoint(tmp_path, expected)


# --- 4. nothing blocks on a FIFO or other special file -------------------------------------


FIFO_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
import jax, ml_dtypes, numpy as np
from grok.checkpoint import loader, manifest, pickle_format
from grok.errors import CheckpointError
from grok.quant import QuantizedWeight8bit
S = jax.ShapeDtypeStruct
tree = {{"m": {{"a": S((16, 8), np.float32),
               "b": QuantizedWeight8bit(S((32, 8), np.int8), S((4, 8), ml_dtypes.bfloat16))}}}}
folder = Path({folder!r})
header = pickle_format.read_header(folder / "ckpt-0" / "tensor00000_000")
fifo = folder / "ckpt-0" / "tensor00001_000"
results = {{}}
for name, call in [("read_header", lambda: pickle_format.read_header(fifo)),
                   ("open_tensor", lambda: pickle_format.open_tensor(fifo, header)),
                   ("read_checkpoint", lambda: loader.read_checkpoint(folder, tree)),
                   ("manifest", lambda: manifest.compute(folder / "ckpt-0"))]:
    try:
        call()
        results[name] = "accepted"
    except CheckpointError as e:
        results[name] = str(e)
print(json.dumps(results))
"""


def test_4_a_fifo_never_blocks_the_reader(tmp_path):
    nano_like(tmp_path)
    fifo = tmp_path / "ckpt-0" / "tensor00001_000"
    fifo.unlink()
    os.mkfifo(fifo)
    script = FIFO_SCRIPT.format(repo=str(REPO), folder=str(tmp_path))
    try:
        result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                                text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    except subprocess.TimeoutExpired:
        pytest.fail("the reader blocked on a FIFO")
    assert result.returncode == 0, result.stderr[-2000:]
    outcomes = json.loads(result.stdout.splitlines()[-1])
    for name in ("read_header", "open_tensor", "manifest"):
        assert re.search(r"tensor00001_000: expected a (tensor|regular) file, found a FIFO",
                         outcomes[name]), name
    assert re.search(r"tensor00001_000 \(parameter m/b, index 1\): expected a tensor file, "
                     r"found a FIFO", outcomes["read_checkpoint"])


def test_4_special_files_in_a_worker(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    expected, sock = special_files(tmp_path)
    try:
        paths = [tmp_path / "fifo", *(tmp_path / name for name in expected)]
        results = run_files(paths, timeout=60)
    finally:
        sock.close()
    refused(results, tmp_path / "fifo", r"expected a tensor file, found a FIFO")
    for name, pattern in expected.items():
        refused(results, tmp_path / name, pattern)


# --- 5. a file that shrinks during the load ------------------------------------------------


SHRINK_SCRIPT = """
import json, os, sys
sys.path.insert(0, {repo!r})
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding
from grok.checkpoint import loader, pickle_format
from grok.errors import CheckpointError
folder = {folder!r}
file = os.path.join(folder, "ckpt-0", "tensor00000_000")
value = np.arange(64 * 48, dtype=np.float32).reshape(64, 48)
tree = {{"m": {{"w": jax.ShapeDtypeStruct(value.shape, value.dtype)}}}}
mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
shardings = {{"single": SingleDeviceSharding(jax.devices()[0]),
              "rows": NamedSharding(mesh, PartitionSpec("x", None)),
              "columns": NamedSharding(mesh, PartitionSpec(None, "x"))}}
results = {{}}
for stage in ("before-reading", "while-reading"):
    for name, sharding in shardings.items():
        pickle_format.write_tensor(file, value)
        loader._PIECE_BYTES = 1024  # many pieces, so the file shrinks between them
        loader._RUNS_PER_READ = 3
        original = loader._read_slices if stage == "before-reading" else loader._read_piece
        def shrinking(*args, original=original, calls=[]):
            calls.append(1)
            if len(calls) == 2 or stage == "before-reading":
                os.truncate(file, 1000)
            return original(*args)
        setattr(loader, "_read_slices" if stage == "before-reading" else "_read_piece",
                shrinking)
        try:
            loader.load_checkpoint(folder, tree, lambda *_: sharding, progress=False)
            results[stage + "/" + name] = "loaded"
        except CheckpointError as e:
            results[stage + "/" + name] = str(e)
        finally:
            setattr(loader, "_read_slices" if stage == "before-reading" else "_read_piece",
                    original)
print(json.dumps(results))
"""


def test_5_a_file_shrinking_during_the_load_fails_cleanly(tmp_path):
    (tmp_path / "ckpt-0").mkdir()
    script = SHRINK_SCRIPT.format(repo=str(REPO), folder=str(tmp_path))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, (f"killed by signal {-result.returncode}"
                                    if result.returncode < 0 else result.stderr[-2000:])
    outcomes = json.loads(result.stdout.splitlines()[-1])
    assert len(outcomes) == 6
    for name, outcome in outcomes.items():
        assert re.search(r"tensor00000_000: the file (is now 1000 bytes|ends at byte \d+), "
                         r".*changed while loading", outcome), (name, outcome)


@pytest.mark.parametrize(("runs", "gap"), [(500, 64 << 10), (3, 64 << 10), (1, 0), (7, 10)])
def test_5_strided_blocks_read_by_runs_equal_the_map(runs, gap, tmp_path, monkeypatch):
    """Column shards and other strided blocks, read with positional reads in batches of
    runs (gaps read into scratch, or skipped), are exactly what the memory map holds."""
    monkeypatch.setattr(loader, "_RUNS_PER_READ", runs)
    monkeypatch.setattr(loader, "_GAP_BYTES", gap)
    path = tmp_path / "t"
    pickle_format.write_tensor(path, np.arange(6 * 10 * 12, dtype=np.float32).reshape(6, 10, 12))
    host = pickle_format.read_tensor(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        for index in [(slice(None), slice(None), slice(0, 6)), (slice(1, 4), slice(2, 9), 5),
                      (slice(None), slice(3, 4)), (2, slice(None), slice(6, 12)),
                      (slice(None, None, 2), slice(None), slice(1, 3)), (1, 2, 3)]:
            src = host[(*index, ...)]  # as _read_slices takes views: 0-d, not scalars
            dst = np.empty(src.shape, src.dtype)
            loader._read_piece(fd, host, src, dst)
            np.testing.assert_array_equal(dst, np.asarray(src))
    finally:
        os.close(fd)


def test_5_a_file_shrunk_after_its_header_was_read_is_not_mapped(tmp_path):
    path = tmp_path / "t"
    pickle_format.write_tensor(path, np.ones((64, 64), np.float32))
    header = pickle_format.read_header(path)
    os.truncate(path, 5000)
    with pytest.raises(CheckpointError, match=r"/t: the file is now 5000 bytes, but its header "
                                              r"places data up to byte 16\d\d\d"):
        pickle_format.open_tensor(path, header)


# --- 6. one flipped bit never changes the weights silently ---------------------------------


def test_6_fortran_order_is_refused(tmp_path):
    expected = nano_like(tmp_path)
    file = tmp_path / "ckpt-0" / "tensor00000_000"
    data = file.read_bytes()
    flag = data.index(b"\x89C") if b"\x89C" in data else data.index(b"\x89B")
    file.write_bytes(data[:flag] + b"\x88" + data[flag + 1:])  # NEWFALSE -> NEWTRUE: 1 bit
    with pytest.raises(CheckpointError, match=r"tensor00000_000 \(parameter m/a, index 0\): "
                                              r"array in Fortran order"):
        loader.read_checkpoint(tmp_path, expected)
    file.write_bytes(pickle.dumps(np.asfortranarray(np.ones((16, 8), np.float32)), protocol=4))
    with pytest.raises(CheckpointError, match=r"array in Fortran order"):
        loader.read_checkpoint(tmp_path, expected)


def payload_ranges(data: bytes) -> list[range]:
    import pickletools
    width = {"SHORT_BINBYTES": 2, "BINBYTES": 5, "BINBYTES8": 9}
    return [range(pos + width[op.name], pos + width[op.name] + len(arg))
            for op, arg, pos in pickletools.genops(data) if op.name in width and len(arg) > 1]


@pytest.mark.parametrize("value", [
    np.arange(16 * 8, dtype=np.float32).reshape(16, 8),
    quantize(np.arange(32 * 8, dtype=np.float32).reshape(32, 8), 4),
], ids=["float", "8-bit"])
def test_6_every_single_bit_flip_of_a_header_is_refused_or_harmless(value, tmp_path):
    """Flip each bit outside the array payloads, one at a time: the full load's checks
    (header, then the expected dtype and shape) refuse it, or it reads the same arrays, and
    the file still means them (as stdlib pickle, restricted to the format's names, reads
    it): no flip is read as something other than what the file says."""
    path = tmp_path / "tensor00000_000"
    pickle_format.write_tensor(path, value)
    data = path.read_bytes()
    want = pickle_format.read_header(path)
    leaf = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), value)
    payload = {i for r in payload_ranges(data) for i in r}
    header_bytes = [i for i in range(len(data)) if i not in payload]
    assert 100 < len(header_bytes) < 400
    same = 0
    for pos in header_bytes:
        for bit in range(8):
            flipped = bytearray(data)
            flipped[pos] ^= 1 << bit
            path = tmp_path / f"flip{pos}.{bit}"  # a new file: rewriting one is slow on ext4
            path.write_bytes(flipped)
            try:
                got = pickle_format.read_header(path)
                loader._check(path, "p", got, leaf)
            except CheckpointError as e:
                assert_well_formed(e, path)
                continue
            finally:
                path.unlink()
            assert got == want, f"bit {bit} of byte {pos} gave {got}"
            path.write_bytes(flipped)
            try:
                assert_same(stdlib_load(path), value)
            finally:
                path.unlink()
            same += 1
    assert same > 0  # flips that change nothing (a frame's length, say) are read


@pytest.mark.parametrize(("name", "data", "pattern"), [
    # '<' -> '=' (native order): one bit, same size
    ("byte-order", stream(array(tup(integer(2)), dtype("f4", state=b"(K\x03" + text("=")
                                + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"), b"\0" * 8)),
     r"unsupported byte order '='"),
    ("dtype-flags", stream(array(tup(integer(2)), dtype("f4", state=b"(K\x03" + text("<")
                                 + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x10t"), b"\0" * 8)),
     r"unexpected numpy dtype state .* expected \(3, byte order, None, None, None, -1, -1, 0\)"),
    ("memo-rebound", stream(text("a") + b"q\x00" + text("b") + b"q\x00"),
     r"memo entry 0 written twice"),
    ("memoize-over-put", stream(text("a") + b"q\x01" + text("b") + b"\x94" + text("c")
                                + b"\x94"), r"memo entry 1 written twice"),
    ("duplicate-key", stream(glob("__main__", "QuantizedWeight8bit") + b")\x81}("
                             + text("weight") + b"N" + text("weight") + b"Nub"),
     r"dict key 'weight' given twice"),
    ("reconstruct-placeholder", stream(glob("numpy._core.multiarray", "_reconstruct") + tup(
        glob("numpy", "ndarray"), tup(integer(0)), raw(b"c")) + b"R"),
     r"unexpected arguments to _reconstruct: expected \(ndarray, \(0,\), b'b'\), found "
     r"\(<reference to numpy.ndarray>, \(0,\), b'c'\)"),
    ("state-version", stream(glob("numpy._core.multiarray", "_reconstruct")
                             + tup(glob("numpy", "ndarray"), tup(integer(0)), raw(b"b")) + b"R"
                             + tup(b"\x88", tup(integer(2)), dtype(), b"\x89", raw(b"\0" * 8))
                             + b"b"), r"unexpected ndarray state \(True, \(2,\)"),
])
def test_6_fields_where_one_bit_changes_the_meaning_are_checked(name, data, pattern, tmp_path):
    path = write(tmp_path, name, data)
    with pytest.raises(CheckpointError) as caught:
        pickle_format.read_header(path)
    assert re.search(pattern, assert_well_formed(caught.value, path)), str(caught.value)


def test_6_quantized_parts_must_be_two_arrays(tmp_path):
    part = array(tup(integer(4), integer(2)), dtype("i1"), b"\0" * 8) + b"q\x00"
    data = stream(glob("__main__", "QuantizedWeight8bit") + b")\x81}(" + text("weight") + part
                  + text("scales") + b"h\x00ub")
    path = write(tmp_path, "t", data)
    with pytest.raises(CheckpointError, match=r"weight and scales are the same array"):
        pickle_format.read_header(path)


# --- the manifest, used by the loader -------------------------------------------------------


def test_verify_finds_a_one_byte_change_before_loading(tmp_path, capsys):
    expected = nano_like(tmp_path)
    with pytest.raises(CheckpointError, match=r"ckpt-0\.manifest\.json: no manifest here"):
        loader.read_checkpoint(tmp_path, expected, verify=True)
    manifest.write(tmp_path / "ckpt-0")
    loader.read_checkpoint(tmp_path, expected, verify=True)
    file = tmp_path / "ckpt-0" / "tensor00000_000"
    data = bytearray(file.read_bytes())
    data[-20] ^= 0x01  # a weight's bit: same size, a valid file, wrong values
    file.write_bytes(data)
    loader.read_checkpoint(tmp_path, expected)  # the format alone cannot tell
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(CheckpointError, match=r"ckpt-0: 1 file\(s\) differ from the manifest "
                                              r"ckpt-0\.manifest\.json: tensor00000_000: "
                                              r"SHA-256 differs"):
        loader.load_checkpoint(tmp_path, expected, lambda *_: single, verify=True,
                                   progress=False)
    assert capsys.readouterr().err == ""
