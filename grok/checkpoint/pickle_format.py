"""The release's per-tensor checkpoint files, read and written without unpickling.

Each released file is a protocol-4 pickle of either a numpy array or a
`__main__.QuantizedWeight8bit` holding two. Unpickling a 300 GB download would let any
tampered file run code, so the reader interprets the opcode stream itself: a stack machine
that knows only the opcodes and globals such files use, never reads the array bytes (it
records where they lie and memory-maps them), and refuses anything else by name.

Files may be hostile, so everything the stream declares is bounded before it is used: the
number of opcodes, string lengths, the number and size of dimensions (against the bytes
actually present, before any multiplication), and messages quote the file only through
bounded, escaped excerpts. Header fields where one flipped bit would change the meaning of
the data without changing any size (Fortran order, byte order, a rebound memo entry, a
repeated dict key, dtype flags) are checked exactly against what numpy writes.
"""

from __future__ import annotations

import dataclasses
import os
import pickletools
import struct
import tempfile
from pathlib import Path
from typing import NoReturn

import ml_dtypes
import numpy as np

from grok.checkpoint.files import NamedFile, error, excerpt, open_regular
from grok.errors import CheckpointError
from grok.quant import QuantizedWeight8bit, check_groups

# dtypes a tensor may have; the stream names them by these numpy codes (or ml_dtypes.bfloat16).
_DTYPE_CODES = ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1")
_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

_RECONSTRUCT = "reconstruct"
_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    ("ml_dtypes", "bfloat16"): "bfloat16",
    ("__main__", "QuantizedWeight8bit"): "QuantizedWeight8bit",
}

# Strings in these files are module and key names; anything longer is corruption or an attack.
_MAX_STRING = 256
# A released header is under 100 opcodes; this bounds the parser's time and memory.
_MAX_OPS = 10_000
# numpy allows 64 dimensions; released tensors have at most 3.
_MAX_NDIM = 32
_MAX_MEMO_DIGITS = 10
# Byte strings this short (numpy's b"b" placeholder) are read, to be checked exactly.
_SMALL_BYTES = 16
# As CPython's pickler: payloads this large bypass frames, and tiny frames get no header.
_FRAME_TARGET = 64 * 1024
_FRAME_MIN = 4
_WRITE_CHUNK = 64 << 20


@dataclasses.dataclass(frozen=True)
class ArrayHeader:
    """Where one array's raw bytes lie in its file, and how to view them."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class QuantizedHeader:
    weight: ArrayHeader
    scales: ArrayHeader


@dataclasses.dataclass(frozen=True)
class _Global:
    name: str


@dataclasses.dataclass(frozen=True)
class _Bytes:
    offset: int
    length: int
    value: bytes | None = None  # the content, for short ones only


class _Mark:
    """Placeholder pushed by MARK; kept on a separate stack as pickle does."""


class _DtypeStub:
    def __init__(self, base: np.dtype):
        self.base = base
        self.dtype: np.dtype | None = None


class _ArrayStub:
    def __init__(self):
        self.header: ArrayHeader | None = None


class _QuantStub:
    def __init__(self):
        self.header: QuantizedHeader | None = None


_GLOBAL_NAMES = {"reconstruct": "numpy _reconstruct", "ndarray": "numpy.ndarray",
                 "dtype": "numpy.dtype", "bfloat16": "ml_dtypes.bfloat16",
                 "QuantizedWeight8bit": "QuantizedWeight8bit"}
_STUB_NAMES = {"_DtypeStub": "numpy dtype", "_ArrayStub": "ndarray",
               "_QuantStub": "QuantizedWeight8bit"}


def _describe(obj) -> str:
    """What kind of thing `obj` is, in the format's terms (never an internal class name)."""
    if isinstance(obj, _Global):
        return f"reference to {_GLOBAL_NAMES[obj.name]}"
    if isinstance(obj, (_DtypeStub, _ArrayStub, _QuantStub)):
        return _STUB_NAMES[type(obj).__name__]
    if isinstance(obj, _Bytes):
        return f"bytes[{obj.length}]"
    return type(obj).__name__


def _a(obj) -> str:
    """`_describe(obj)` with its article."""
    text = _describe(obj)
    return f"{'an' if text[0] in 'aeiouAEIOU' else 'a'} {text}"


def _show(obj, depth: int = 2) -> str:
    """A value built from the file, shown within a small bound whatever its shape: shared
    tuple graphs, deep nesting, long strings and huge integers all stay a few lines long."""
    if obj is None or isinstance(obj, bool):
        return repr(obj)
    if isinstance(obj, int):
        return str(obj) if obj.bit_length() <= 64 else f"<an integer of {obj.bit_length()} bits>"
    if isinstance(obj, str):
        return excerpt(obj)
    if isinstance(obj, _Bytes):
        return excerpt(obj.value) if obj.value is not None else f"<bytes[{obj.length}]>"
    if isinstance(obj, tuple):
        if depth <= 0:
            return f"<tuple of {len(obj)}>"
        items = [_show(x, depth - 1) for x in obj[:4]]
        if len(obj) > 4:
            items.append(f"... {len(obj)} in all")
        return f"({', '.join(items)}{',' if len(obj) == 1 else ''})"
    if isinstance(obj, dict):
        return f"<dict of {len(obj)}>"
    return f"<{_describe(obj)}>"


class _Parser:
    """One pass over one file's opcodes; payload bytes are skipped, never read."""

    def __init__(self, path: str, f, size: int, where: str | None = None):
        self.path = path
        self.where = where
        self.f = f
        self.size = size
        self.stack: list = []
        self.marks: list[list] = []
        self.memo: dict[int, object] = {}
        self.handlers = {
            0x80: self._proto, 0x95: self._frame,
            0x8C: lambda: self._string(1), ord("X"): lambda: self._string(4),
            0x8D: lambda: self._string(8),
            0x94: self._memoize, ord("p"): lambda: self._put(self._line_int()),
            ord("q"): lambda: self._put(self._uint(1)),
            ord("r"): lambda: self._put(self._uint(4)),
            ord("g"): lambda: self._get(self._line_int()),
            ord("h"): lambda: self._get(self._uint(1)),
            ord("j"): lambda: self._get(self._uint(4)),
            0x93: self._stack_global, ord("c"): self._text_global,
            ord("J"): lambda: self._push(self._int(4, signed=True)),
            ord("K"): lambda: self._push(self._uint(1)),
            ord("M"): lambda: self._push(self._uint(2)),
            0x8A: lambda: self._push(self._int(self._uint(1), signed=True)),
            0x88: lambda: self._push(True), 0x89: lambda: self._push(False),
            ord("N"): lambda: self._push(None),
            ord("("): self._mark, ord("t"): lambda: self._push(tuple(self._pop_mark())),
            0x85: lambda: self._tuple(1), 0x86: lambda: self._tuple(2),
            0x87: lambda: self._tuple(3), ord(")"): lambda: self._push(()),
            ord("}"): lambda: self._push({}), ord("s"): self._setitem,
            ord("u"): self._setitems,
            ord("R"): self._reduce, 0x81: self._newobj, ord("b"): self._build,
            ord("C"): lambda: self._bytes(1), ord("B"): lambda: self._bytes(4),
            0x8E: lambda: self._bytes(8),
        }

    def fail(self, message: str) -> NoReturn:
        raise error(self.path, message, self.where)

    def run(self) -> ArrayHeader | QuantizedHeader:
        for _ in range(_MAX_OPS):
            pos = self.f.tell()
            code = self.f.read(1)
            if not code:
                self.fail(f"pickle stream ends at byte {pos} without STOP (truncated file?)")
            if code == b".":
                return self._stop(pos)
            handler = self.handlers.get(code[0])
            if handler is None:
                op = pickletools.code2op.get(code.decode("latin-1"))
                name = op.name if op else "unknown"
                self.fail(f"unsupported pickle opcode {name} (0x{code[0]:02x}) at byte {pos}")
            try:
                handler()
            except IndexError:
                self.fail(f"malformed pickle stream: stack underflow at byte {pos}")
        self.fail(f"more than {_MAX_OPS} pickle opcodes; a tensor header has under 100")

    def _stop(self, pos: int):
        if self.marks or len(self.stack) != 1:
            self.fail(f"malformed pickle stream: {len(self.stack)} objects on the stack and "
                      f"{len(self.marks)} open marks at STOP (byte {pos})")
        if pos + 1 != self.size:
            self.fail(f"{self.size - pos - 1} unexpected trailing bytes after the pickle's STOP "
                      f"at byte {pos}")
        result = self.stack[0]
        if isinstance(result, (_ArrayStub, _QuantStub)) and result.header is not None:
            return result.header
        self.fail(f"holds {_a(result)}, not an array or a QuantizedWeight8bit")

    def _check_int(self, value, what: str, low: int, high: int) -> int:
        """`value` as a plain int within [low, high], compared before any arithmetic."""
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(f"{what}: expected an integer from {low} to {high}, found {_show(value)}")
        return value

    # --- reading primitives ---------------------------------------------------------

    def _read(self, n: int) -> bytes:
        pos = self.f.tell()
        if n > self.size - pos:
            self.fail(f"truncated: needs {n} bytes at byte {pos}, but the file has only "
                      f"{self.size}")
        data = self.f.read(n)
        if len(data) != n:
            self.fail(f"truncated: the file ends at byte {pos + len(data)} though it was "
                      f"{self.size} bytes long when opened (changed while reading?)")
        return data

    def _uint(self, n: int) -> int:
        return int.from_bytes(self._read(n), "little")

    def _int(self, n: int, signed: bool) -> int:
        return int.from_bytes(self._read(n), "little", signed=signed)

    def _line(self) -> bytes:
        line = self.f.readline(_MAX_STRING)
        if not line.endswith(b"\n"):
            self.fail(f"unterminated or overlong text argument at byte {self.f.tell()}")
        return line[:-1]

    def _line_int(self) -> int:
        line = self._line()
        if not line.isdigit() or len(line) > _MAX_MEMO_DIGITS:
            self.fail(f"bad memo index {excerpt(line)} before byte {self.f.tell()}")
        return int(line)

    def _push(self, value) -> None:
        self.stack.append(value)

    def _pop_mark(self) -> list:
        if not self.marks:
            self.fail(f"malformed pickle stream: no MARK before byte {self.f.tell()}")
        items, self.stack = self.stack, self.marks.pop()
        return items

    # --- opcodes --------------------------------------------------------------------

    def _proto(self) -> None:
        version = self._uint(1)
        if version > 5:
            self.fail(f"unsupported pickle protocol {version}")

    def _frame(self) -> None:
        length = self._uint(8)
        if length > self.size - self.f.tell():
            self.fail(f"truncated: a {length}-byte frame at byte {self.f.tell() - 9} runs past "
                      f"the end of the {self.size}-byte file")

    def _string(self, width: int) -> None:
        length = self._uint(width)
        if length > _MAX_STRING:
            self.fail(f"string of {length} bytes at byte {self.f.tell()} is implausibly long")
        try:
            self._push(self._read(length).decode("utf-8", "surrogatepass"))
        except UnicodeDecodeError:
            self.fail(f"invalid UTF-8 string before byte {self.f.tell()}")

    def _bytes(self, width: int) -> None:
        length = self._uint(width)
        offset = self.f.tell()
        if length > self.size - offset:
            self.fail(f"truncated: {length} bytes of data declared at byte {offset}, but only "
                      f"{self.size - offset} remain")
        if length <= _SMALL_BYTES:
            self._push(_Bytes(offset, length, self._read(length)))
        else:
            self.f.seek(length, os.SEEK_CUR)
            self._push(_Bytes(offset, length))

    def _memoize(self) -> None:
        self._put(len(self.memo))

    def _put(self, index: int) -> None:
        # A pickler writes each memo entry once; rebinding one would silently re-route a
        # later reference (to another dtype, say), so it is refused.
        if index in self.memo:
            self.fail(f"memo entry {index} written twice (byte {self.f.tell()})")
        self.memo[index] = self.stack[-1]

    def _get(self, index: int) -> None:
        if index not in self.memo:
            self.fail(f"memo entry {index} read before it is written (byte {self.f.tell()})")
        self._push(self.memo[index])

    def _resolve_global(self, module, name) -> None:
        key = (module, name)
        if key not in _GLOBALS:
            self.fail(f"refusing pickle global {excerpt(f'{module}.{name}')}: a checkpoint "
                      f"tensor may only reference "
                      f"{', '.join(sorted({'.'.join(k) for k in _GLOBALS}))}")
        self._push(_Global(_GLOBALS[key]))

    def _stack_global(self) -> None:
        name = self.stack.pop()
        module = self.stack.pop()
        if not isinstance(module, str) or not isinstance(name, str):
            self.fail(f"STACK_GLOBAL needs two strings, got {_describe(module)} and "
                      f"{_describe(name)}")
        self._resolve_global(module, name)

    def _text_global(self) -> None:
        module = self._line().decode("utf-8", "replace")
        name = self._line().decode("utf-8", "replace")
        self._resolve_global(module, name)

    def _mark(self) -> None:
        self.marks.append(self.stack)
        self.stack = []

    def _tuple(self, n: int) -> None:
        if len(self.stack) < n:
            raise IndexError
        items = tuple(self.stack[-n:])
        del self.stack[-n:]
        self._push(items)

    def _setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._store(self.stack[-1], [key, value])

    def _setitems(self) -> None:
        items = self._pop_mark()
        if len(items) % 2:
            self.fail(f"SETITEMS with an odd number of items before byte {self.f.tell()}")
        self._store(self.stack[-1], items)

    def _store(self, target, items: list) -> None:
        if not isinstance(target, dict):
            self.fail(f"SETITEM(S) on {_a(target)}, not a dict")
        for key, value in zip(items[::2], items[1::2], strict=True):
            if not isinstance(key, str):
                self.fail(f"dict key of type {_describe(key)}; only string keys are expected")
            if key in target:
                self.fail(f"dict key {excerpt(key)} given twice")
            target[key] = value

    def _reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack.pop()
        if not isinstance(args, tuple):
            self.fail(f"REDUCE arguments are {_a(args)}, not a tuple")
        if func == _Global(_RECONSTRUCT):
            ok = (len(args) == 3 and args[0] == _Global("ndarray") and args[1] == (0,)
                  and isinstance(args[2], _Bytes) and args[2].value == b"b")
            if not ok:
                self.fail(f"unexpected arguments to _reconstruct: expected (ndarray, (0,), "
                          f"b'b'), found {_show(args)}")
            self._push(_ArrayStub())
        elif func == _Global("dtype"):
            self._push(_DtypeStub(self._dtype_base(args)))
        else:
            self.fail(f"REDUCE of {_describe(func)} is not allowed")

    def _dtype_base(self, args: tuple) -> np.dtype:
        if len(args) != 3 or args[1] is not False or args[2] is not True:
            self.fail(f"unexpected numpy.dtype arguments {_show(args)}; expected (code, "
                      "False, True)")
        code = args[0]
        if code == _Global("bfloat16"):
            return np.dtype(ml_dtypes.bfloat16)
        if not isinstance(code, str) or code not in _DTYPE_CODES:
            self.fail(f"unsupported dtype {_show(code)}; expected one of "
                      f"{', '.join(_DTYPE_CODES)} or ml_dtypes.bfloat16")
        return np.dtype(code)

    def _newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if cls != _Global("QuantizedWeight8bit") or args != ():
            self.fail(f"NEWOBJ of {_describe(cls)} with {_describe(args)} arguments is not "
                      "allowed; only QuantizedWeight8bit()")
        self._push(_QuantStub())

    def _build(self) -> None:
        state = self.stack.pop()
        obj = self.stack[-1]
        if isinstance(obj, _DtypeStub) and obj.dtype is None:
            obj.dtype = self._build_dtype(obj.base, state)
        elif isinstance(obj, (_ArrayStub, _QuantStub)) and obj.header is None:
            build = self._build_array if isinstance(obj, _ArrayStub) else self._build_quantized
            obj.header = build(state)
        else:
            self.fail(f"BUILD on {_a(obj)} is not allowed (or applied twice)")

    def _build_dtype(self, base: np.dtype, state) -> np.dtype:
        # What numpy writes: (-1, -1, 0) for its own types; size, alignment and flags for
        # ml_dtypes' bfloat16. Any other value would be a different (or damaged) type.
        tail = (-1, -1, 0) if base != _BFLOAT16 else (base.itemsize, base.alignment, base.flags)
        ok = (isinstance(state, tuple) and len(state) == 8 and _is_int(state[0], 3)
              and state[2:5] == (None, None, None)
              and all(_is_int(x, y) for x, y in zip(state[5:], tail, strict=True)))
        if not ok:
            self.fail(f"unexpected numpy dtype state {_show(state)} for {base}; expected "
                      f"(3, byte order, None, None, None, {', '.join(map(str, tail))})")
        byteorder = state[1]
        if byteorder not in ("<", "|") or (byteorder == "|" and base.itemsize > 1):
            self.fail(f"unsupported byte order {_show(byteorder)} for {base}; the checkpoint "
                      "format is little-endian")
        return base

    def _build_array(self, state) -> ArrayHeader:
        ok = (isinstance(state, tuple) and len(state) == 5 and _is_int(state[0], 1)
              and isinstance(state[1], tuple) and isinstance(state[3], bool)
              and isinstance(state[4], _Bytes))
        if not ok:
            self.fail(f"unexpected ndarray state {_show(state)}; expected (1, shape, dtype, "
                      "fortran_order, bytes)")
        _, shape, dtype, fortran, data = state
        if not isinstance(dtype, _DtypeStub) or dtype.dtype is None:
            self.fail(f"array dtype is {_a(dtype)}, not a numpy dtype")
        if fortran:
            self.fail("array in Fortran order; the release writes only C-order arrays (a "
                      "flipped bit would transpose the weight)")
        # Bounds first: a shape of thousands of huge integers must not be multiplied out.
        if len(shape) > _MAX_NDIM:
            self.fail(f"array of {len(shape)} dimensions; at most {_MAX_NDIM} are supported")
        for axis, d in enumerate(shape):
            self._check_int(d, f"dimension {axis} of the array's shape", 0, self.size)
        count = 0 if 0 in shape else 1
        for d in shape:
            count *= d
            if count > data.length:  # every factor is at most the file size: no big ints
                break
        shown = f"{dtype.dtype}{list(shape)}"
        if count > data.length or count * dtype.dtype.itemsize != data.length:
            need = (f"{count * dtype.dtype.itemsize}" if count <= data.length
                    else f"more than {data.length}")
            self.fail(f"array {shown} needs {need} bytes but the file holds {data.length} "
                      "(corrupt file?)")
        return ArrayHeader(tuple(shape), dtype.dtype, False, data.offset, data.length)

    def _build_quantized(self, state) -> QuantizedHeader:
        if not isinstance(state, dict) or set(state) != {"weight", "scales"}:
            found = (_show(tuple(sorted(state))) if isinstance(state, dict)
                     else _describe(state))
            self.fail(f"QuantizedWeight8bit state must be a dict with keys 'weight' and "
                      f"'scales', found {found}")
        parts = {}
        for key, value in state.items():
            if not isinstance(value, _ArrayStub) or value.header is None:
                self.fail(f"QuantizedWeight8bit.{key} is {_a(value)}, not an array")
            parts[key] = value.header
        if parts["weight"] is parts["scales"]:
            self.fail("QuantizedWeight8bit's weight and scales are the same array")
        return QuantizedHeader(**parts)


def _is_int(value, expected: int) -> bool:
    return type(value) is int and value == expected


def read_header(path: str | os.PathLike,
                where: str | None = None) -> ArrayHeader | QuantizedHeader:
    """Parses one tensor file's pickle stream; reads no array data. `where` names the
    parameter in error messages. Every failure is a one-line `CheckpointError`."""
    path = os.fspath(path)
    fd = open_regular(path, where)
    try:
        with open(fd, "rb", closefd=True) as f:
            return _Parser(path, f, os.fstat(f.fileno()).st_size, where).run()
    except CheckpointError:
        raise
    except RecursionError as e:
        raise error(path, "pickle stream nested too deeply to parse", where) from e
    except MemoryError as e:
        raise error(path, "pickle stream needs more memory than a tensor header can", where) \
            from e
    except OSError as e:
        raise error(path, f"cannot read tensor file: {e.strerror or e}", where) from None
    except (ValueError, TypeError, OverflowError, KeyError, IndexError) as e:
        raise error(path, f"malformed pickle stream ({type(e).__name__}: "
                          f"{excerpt(str(e), 120)})", where) from e


def _open_array(path: str, f, header: ArrayHeader) -> np.ndarray:
    if header.nbytes == 0:  # mmap cannot map nothing
        empty = np.empty(header.shape, header.dtype)
        empty.flags.writeable = False
        return empty
    if header.fortran_order:
        raise error(path, "array in Fortran order; the release writes only C-order arrays")
    return np.memmap(f, header.dtype, mode="r", offset=header.offset, shape=header.shape)


def open_tensor(path: str | os.PathLike, header: ArrayHeader | QuantizedHeader,
                where: str | None = None) -> np.ndarray | QuantizedWeight8bit:
    """Read-only memory maps of a parsed file's arrays; pages are read only when touched.

    The maps see the file as it is when touched: reading one after the file has shrunk
    kills the process (SIGBUS), as for any memory map. `checkpoint.load_checkpoint` never
    reads through them, only through positional reads that fail cleanly.
    """
    path = os.fspath(path)
    parts = ([header.weight, header.scales] if isinstance(header, QuantizedHeader)
             else [header])
    fd = open_regular(path, where)
    try:
        with open(fd, "rb", closefd=True) as raw:
            f = NamedFile(raw, path)
            size = os.fstat(fd).st_size
            end = max(part.offset + part.nbytes for part in parts)
            if size < end:
                raise error(path, f"the file is now {size} bytes, but its header places data "
                                  f"up to byte {end} (changed since it was read?)", where)
            arrays = [_open_array(path, f, part) for part in parts]
    except CheckpointError:
        raise
    except (OSError, ValueError, TypeError, OverflowError, MemoryError) as e:
        raise error(path, f"cannot map the tensor's data ({type(e).__name__}: "
                          f"{excerpt(str(e), 120)})", where) from e
    return QuantizedWeight8bit(*arrays) if len(arrays) == 2 else arrays[0]


def read_tensor(path: str | os.PathLike) -> np.ndarray | QuantizedWeight8bit:
    return open_tensor(path, read_header(path))


# --- writing ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Ref:
    """A module-level name the stream refers to (a class or function of the release)."""

    module: str
    name: str


@dataclasses.dataclass(frozen=True, eq=False)
class _Payload:
    """An array's raw bytes as a flat uint8 view, written without a copy."""

    data: np.ndarray


_NDARRAY_ARGS = (_Ref("numpy", "ndarray"), (0,), b"b")


class _Writer:
    """A miniature protocol-4 pickler for just these objects, mirroring CPython's memo and
    framing decisions so that our files equal the release's byte for byte."""

    def __init__(self, f):
        self.f = f
        self.frame = bytearray()
        self.memo: dict[object, int] = {}

    def write(self, data: bytes) -> None:
        self.frame += data

    def commit_frame(self) -> None:
        if len(self.frame) >= _FRAME_MIN:
            self.f.write(b"\x95" + struct.pack("<Q", len(self.frame)))
        self.f.write(self.frame)
        self.frame = bytearray()

    def memoize(self, key) -> None:
        self.memo[key] = len(self.memo)
        self.write(b"\x94")

    def save(self, obj) -> None:
        # CPython closes a frame only between whole objects, once it has reached its target.
        if len(self.frame) >= _FRAME_TARGET:
            self.commit_frame()
        key = self._memo_key(obj)
        if key in self.memo:
            index = self.memo[key]
            self.write(b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index))
            return
        if obj is None:
            self.write(b"N")
        elif isinstance(obj, bool):
            self.write(b"\x88" if obj else b"\x89")
        elif isinstance(obj, int):
            self._int(obj)
        elif isinstance(obj, str):
            self._str(obj, key)
        elif isinstance(obj, (bytes, _Payload)):
            self._bytes(obj, key)
        elif isinstance(obj, tuple):
            self._tuple(obj, key)
        elif isinstance(obj, _Ref):
            self.save(obj.module)
            self.save(obj.name)
            self.write(b"\x93")
            self.memoize(key)
        elif isinstance(obj, dict):
            self._dict(obj, key)
        elif isinstance(obj, np.dtype):
            self._dtype(obj, key)
        elif isinstance(obj, np.ndarray):
            self.save(_Ref("numpy.core.multiarray", "_reconstruct"))
            self.save(_NDARRAY_ARGS)
            self.write(b"R")
            self.memoize(key)
            self.save((1, obj.shape, obj.dtype, False, _Payload(obj.reshape(-1).view(np.uint8))))
            self.write(b"b")
        else:
            assert isinstance(obj, QuantizedWeight8bit), type(obj)
            self.save(_Ref("__main__", "QuantizedWeight8bit"))
            self.save(())
            self.write(b"\x81")
            self.memoize(key)
            self.save({"weight": obj.weight, "scales": obj.scales})
            self.write(b"b")

    def _dict(self, obj: dict, key) -> None:
        self.write(b"}")
        self.memoize(key)
        self.write(b"(")
        for key, value in obj.items():
            self.save(key)
            self.save(value)
        self.write(b"u")

    @staticmethod
    def _memo_key(obj):
        """What CPython's memo (keyed by identity) would find again: interned strings,
        singleton dtypes and b"b", and names already referenced; never ints or tuples."""
        if isinstance(obj, (str, bytes, np.dtype, _Ref)):
            return type(obj).__name__, obj
        return object()

    def _int(self, x: int) -> None:
        if 0 <= x <= 0xFF:
            self.write(b"K" + bytes([x]))
        elif 0 <= x <= 0xFFFF:
            self.write(b"M" + struct.pack("<H", x))
        elif -(1 << 31) <= x < (1 << 31):
            self.write(b"J" + struct.pack("<i", x))
        else:
            data = x.to_bytes((x.bit_length() + 8) // 8, "little", signed=True)
            self.write(b"\x8a" + bytes([len(data)]) + data)

    def _str(self, s: str, key) -> None:
        data = s.encode("utf-8", "surrogatepass")
        if len(data) <= 0xFF:
            self.write(b"\x8c" + bytes([len(data)]) + data)
        else:
            self.write(b"X" + struct.pack("<I", len(data)) + data)
        self.memoize(key)

    def _bytes(self, obj, key) -> None:
        data = obj.data if isinstance(obj, _Payload) else np.frombuffer(obj, np.uint8)
        n = data.size
        if n <= 0xFF:
            header = b"C" + bytes([n])
        elif n <= 0xFFFFFFFF:
            header = b"B" + struct.pack("<I", n)
        else:
            header = b"\x8e" + struct.pack("<Q", n)
        if n < _FRAME_TARGET:
            self.write(header + data.tobytes())
        else:  # as CPython: large payloads go straight to the file, outside any frame
            self.commit_frame()
            self.f.write(header)
            for start in range(0, n, _WRITE_CHUNK):
                self.f.write(memoryview(data[start:start + _WRITE_CHUNK]))
        self.memoize(key)

    def _tuple(self, items: tuple, key) -> None:
        if not items:
            self.write(b")")
            return
        if len(items) > 3:
            self.write(b"(")
        for x in items:
            self.save(x)
        self.write({1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(items), b"t"))
        self.memoize(key)

    def _dtype(self, dtype: np.dtype, key) -> None:
        if dtype == _BFLOAT16:
            args, state = (_Ref("ml_dtypes", "bfloat16"), False, True), ("<", 2, 2, 64)
        else:
            args, state = (dtype.str[1:], False, True), (dtype.str[0], -1, -1, 0)
        self.save(_Ref("numpy", "dtype"))
        self.save(args)
        self.write(b"R")
        self.memoize(key)
        self.save((3, state[0], None, None, None, *state[1:]))
        self.write(b"b")


def _as_writable(value, name: str) -> np.ndarray:
    a = np.asarray(value, order="C")
    if a.dtype != _BFLOAT16 and a.dtype.str[1:] not in _DTYPE_CODES:
        raise ValueError(f"{name}: cannot store dtype {a.dtype}; expected one of "
                         f"{', '.join(_DTYPE_CODES)} or bfloat16")
    if a.dtype.byteorder == ">":
        raise ValueError(f"{name}: big-endian arrays are not supported; the format is "
                         "little-endian")
    return a


def write_tensor(path: str | os.PathLike, value) -> None:
    """Writes `value` (an array or a QuantizedWeight8bit) as the release does; atomically,
    so a crash never leaves a truncated file under the final name."""
    path = Path(path)
    if isinstance(value, QuantizedWeight8bit):
        weight = _as_writable(value.weight, f"{path} weight")
        scales = _as_writable(value.scales, f"{path} scales")
        if weight.dtype != np.int8 or scales.dtype != _BFLOAT16:
            raise ValueError(f"{path}: QuantizedWeight8bit needs int8 weight and bfloat16 "
                             f"scales, got {weight.dtype} and {scales.dtype}")
        check_groups(weight.shape, scales.shape, str(path))
        value = QuantizedWeight8bit(weight, scales)
    else:
        value = _as_writable(value, str(path))
    if not path.parent.is_dir():
        raise ValueError(f"{path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _Writer(f)
            f.write(b"\x80\x04")
            writer.save(value)
            writer.write(b".")
            writer.commit_frame()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
