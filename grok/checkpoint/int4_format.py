"""The project's 4-bit tensor file: a fixed magic, a bounded JSON header, then raw bytes.

The release's format has no 4-bit type, and a pickle stream is the wrong thing to invent a
new one in, so a 4-bit expert weight gets a file of its own kind (same name, same place in
`ckpt-0/`); every other tensor of a 4-bit checkpoint stays in the release's format.

    bytes 0..7     magic b"\\x93GROK-Q4" (never the start of a pickle, 0x80, or of text)
    bytes 8..11    n, the header's length: uint32, little-endian, at most 4096
    bytes 12..     the header, n bytes of UTF-8 JSON, padded with spaces so that the data
                   starts at a multiple of 64:
                   {"version": 1, "shape": [..., K, N], "group": G,
                    "weight": {"offset": o, "nbytes": prod(shape) / 2},
                    "scales": {"offset": p, "nbytes": 2 * prod(shape) / K * K/G}}
    o ..           the values, signed 4-bit two's complement, C order, two to a byte along
                   the last axis: value 2j in the low nibble of byte j, 2j+1 in the high one
    p ..           the scales, bfloat16 little-endian [..., K/G, N], p a multiple of 64;
                   the file ends there.

A value is round_bf16(q * scale), q in -7..7 (`grok.quant.requantize4`). Every field is
checked against the file's size before anything is mapped; nothing in the file is run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from grok.checkpoint.files import NamedFile, error, excerpt, open_regular
from grok.errors import CheckpointError
from grok.quant import (
    INT4,
    QuantizedWeight4bit,
    QuantizedWeight8bit,
    check_int4_group,
    int8_values,
    requantize4,
)

MAGIC = b"\x93GROK-Q4"
VERSION = 1
MAX_HEADER = 4096
_ALIGN = 64
_BF16 = np.dtype(jnp.bfloat16)
# Rows of one expert converted at a time while writing: bounds the float copy in memory.
_ROWS_PER_BLOCK = 1024


@dataclasses.dataclass(frozen=True)
class Int4Header:
    shape: tuple[int, ...]  # logical [..., K, N]
    group: int  # rows per scale
    weight_offset: int
    scales_offset: int

    @property
    def packed_shape(self) -> tuple[int, ...]:
        return (*self.shape[:-1], self.shape[-1] // 2)

    @property
    def scales_shape(self) -> tuple[int, ...]:
        return (*self.shape[:-2], self.shape[-2] // self.group, self.shape[-1])

    @property
    def weight_nbytes(self) -> int:
        return math.prod(self.packed_shape)

    @property
    def scales_nbytes(self) -> int:
        return math.prod(self.scales_shape) * _BF16.itemsize


class Int4Tensor:
    """A 4-bit file's packed values (uint8 [..., K, N/2]) and scales, as read-only memory
    maps; `shape` is the logical one."""

    def __init__(self, packed: np.ndarray, scales: np.ndarray, group: int):
        self.packed, self.scales, self.group = packed, scales, group

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.packed.shape[:-1], 2 * self.packed.shape[-1])

    def unpacked(self) -> QuantizedWeight4bit:
        """The whole tensor as host arrays (small tensors and tests)."""
        return QuantizedWeight4bit.from_values(unpack(np.asarray(self.packed)),
                                               np.array(self.scales))


def pack(q: np.ndarray) -> np.ndarray:
    """int4 [..., N] (N even) as bytes [..., N/2], two values to a byte, low nibble first."""
    nibbles = q.astype(np.int8).view(np.uint8) & 0x0F
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack(packed: np.ndarray) -> np.ndarray:
    """`pack`'s inverse: bytes [..., M] as int4 [..., 2M]."""
    packed = packed.astype(np.uint8)
    out = np.empty((*packed.shape[:-1], 2 * packed.shape[-1]), np.int8)
    # Shifting the nibble to the top and back (arithmetically) extends its sign.
    out[..., 0::2] = (packed << 4).view(np.int8) >> 4
    out[..., 1::2] = packed.view(np.int8) >> 4
    return out.astype(INT4)


def is_int4_file(path: str | os.PathLike, where: str | None = None) -> bool:
    fd = open_regular(path, where)
    with open(fd, "rb", closefd=True) as f:
        return f.read(len(MAGIC)) == MAGIC


def _layout(shape: tuple[int, ...], group: int, header_bytes: int) -> Int4Header:
    start = len(MAGIC) + 4 + header_bytes
    weight_offset = start + (-start) % _ALIGN
    probe = Int4Header(shape, group, weight_offset, 0)
    end = weight_offset + probe.weight_nbytes
    return Int4Header(shape, group, weight_offset, end + (-end) % _ALIGN)


def _header_json(header: Int4Header) -> dict:
    return {"version": VERSION, "shape": list(header.shape), "group": header.group,
            "weight": {"offset": header.weight_offset, "nbytes": header.weight_nbytes},
            "scales": {"offset": header.scales_offset, "nbytes": header.scales_nbytes}}


def _encode_header(shape: tuple[int, ...], group: int) -> tuple[Int4Header, bytes]:
    # The offsets depend on the header's length and it on theirs: settle on a fixed point.
    length = 0
    while True:
        header = _layout(shape, group, length)
        text = json.dumps(_header_json(header), separators=(",", ":")).encode()
        if len(text) <= length:
            return header, text.ljust(header.weight_offset - len(MAGIC) - 4, b" ")
        length = len(text)


def _check_shape(shape, group) -> None:
    if len(shape) < 2 or shape[-1] % 2:
        raise ValueError(f"a 4-bit weight needs rank >= 2 and an even last axis, got shape "
                         f"{list(shape)}")
    check_int4_group(group, shape[-2], f"a weight of shape {list(shape)}")


def write_tensor(path: str | os.PathLike,
                 value: QuantizedWeight4bit | QuantizedWeight8bit | Int4Tensor,
                 group: int | None = None) -> None:
    """Writes a 4-bit weight (host arrays, or another 4-bit file's maps), or requantises an
    8-bit one (host arrays or memory maps) in groups of `group` rows, one block of an
    expert's rows at a time, so that no float copy of the whole tensor is made. Atomic, as
    the release-format writer."""
    path = Path(path)
    if isinstance(value, Int4Tensor):
        shape, group = value.shape, value.group
    elif isinstance(value, QuantizedWeight8bit):
        if group is None:
            raise ValueError(f"{path}: requantising an 8-bit weight needs a group size")
        shape = tuple(value.weight.shape)
    elif isinstance(value, QuantizedWeight4bit):
        shape = tuple(value.shape)
        group = shape[-2] // value.groups
        if value.scales.shape != (*shape[:-2], shape[-1], shape[-2] // group) \
                or np.dtype(value.weight.dtype) != np.dtype(INT4):
            raise ValueError(f"{path}: expected int4 values [..., N, K] and scales "
                             f"[..., N, K/G], got {value!r:.200}")
    else:
        raise ValueError(f"{path}: expected a QuantizedWeight4bit or QuantizedWeight8bit, "
                         f"got {type(value).__name__}")
    _check_shape(shape, group)
    header, text = _encode_header(shape, group)
    if not path.parent.is_dir():
        raise ValueError(f"{path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(text)) + text)
            scales = np.empty(header.scales_shape, _BF16)
            rows = shape[-2]
            block = max(group, _ROWS_PER_BLOCK // group * group)
            for lead in np.ndindex(*shape[:-2]):
                for first in range(0, rows, block):
                    last = min(first + block, rows)
                    if isinstance(value, QuantizedWeight8bit):
                        q, s = requantize4(int8_values(
                            np.asarray(value.weight[lead][first:last]),
                            np.asarray(value.scales[lead]), first, rows), group)
                    elif isinstance(value, Int4Tensor):
                        q = unpack(np.asarray(value.packed[lead][first:last]))
                        s = np.asarray(value.scales[lead][first // group:last // group])
                    else:  # held [..., N, K] and [..., N, K/G]
                        q = np.swapaxes(np.asarray(value.weight[lead])[:, first:last], 0, 1)
                        s = np.swapaxes(np.asarray(
                            value.scales[lead])[:, first // group:last // group], 0, 1)
                    f.write(pack(q).tobytes())
                    scales[lead][first // group:last // group] = s
            f.write(b"\0" * (header.scales_offset - header.weight_offset
                             - header.weight_nbytes))
            f.write(scales.tobytes())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_header(path: str | os.PathLike, where: str | None = None) -> Int4Header:
    """Parses and checks a 4-bit file's header against the file's size; reads no data.
    Every failure is a one-line `CheckpointError`."""
    path = os.fspath(path)
    fd = open_regular(path, where)
    try:
        with open(fd, "rb", closefd=True) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(len(MAGIC) + 4)
            if len(head) < len(MAGIC) + 4 or head[:len(MAGIC)] != MAGIC:
                raise error(path, f"not a 4-bit tensor file (starts {excerpt(head)})", where)
            (length,) = struct.unpack("<I", head[len(MAGIC):])
            if length > MAX_HEADER or len(MAGIC) + 4 + length > size:
                raise error(path, f"4-bit header of {length} bytes: at most {MAX_HEADER} and "
                                  f"within the file's {size} bytes", where)
            text = f.read(length)
    except OSError as e:
        raise error(path, f"cannot read tensor file: {e.strerror or e}", where) from None
    try:
        fields = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(path, f"4-bit header is not JSON ({excerpt(str(e), 80)})", where) from None
    return _parse(path, fields, size, length, where)


def _parse(path: str, fields, size: int, length: int, where: str | None) -> Int4Header:
    def fail(message: str) -> CheckpointError:
        return error(path, f"4-bit header: {message}", where)

    def integer(value, what: str, low: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= size * 2:
            raise fail(f"{what} must be an integer in [{low}, {size * 2}], got "
                       f"{excerpt(repr(value))}")
        return value

    expected_keys = {"version", "shape", "group", "weight", "scales"}
    if not isinstance(fields, dict) or set(fields) != expected_keys:
        keys = sorted(fields) if isinstance(fields, dict) else type(fields).__name__
        raise fail(f"expected the keys {sorted(expected_keys)}, found {excerpt(repr(keys), 120)}")
    if fields["version"] != VERSION:
        raise fail(f"version {excerpt(repr(fields['version']))}; this reader knows {VERSION}")
    shape = fields["shape"]
    if not isinstance(shape, list) or not 2 <= len(shape) <= 8:
        raise fail(f"shape must be a list of 2 to 8 sizes, got {excerpt(repr(shape))}")
    shape = tuple(integer(n, "each size", 1) for n in shape)
    group = integer(fields["group"], "group", 1)
    try:
        _check_shape(shape, group)
    except ValueError as e:
        raise fail(str(e)) from None
    for part in ("weight", "scales"):
        if not isinstance(fields[part], dict) or set(fields[part]) != {"offset", "nbytes"}:
            raise fail(f"{part} must be {{offset, nbytes}}, got "
                       f"{excerpt(repr(fields[part]), 80)}")
    header = Int4Header(shape, group, integer(fields["weight"]["offset"], "weight offset"),
                        integer(fields["scales"]["offset"], "scales offset"))
    for part, want in (("weight", header.weight_nbytes), ("scales", header.scales_nbytes)):
        if fields[part]["nbytes"] != want:
            raise fail(f"{part} nbytes {excerpt(repr(fields[part]['nbytes']))} does not "
                       f"match the shape, which needs {want}")
    start = len(MAGIC) + 4 + length
    if header.weight_offset < start or header.weight_offset % _ALIGN \
            or header.scales_offset < header.weight_offset + header.weight_nbytes \
            or header.scales_offset % _ALIGN:
        raise fail(f"offsets {header.weight_offset} and {header.scales_offset} must follow "
                   f"the header (byte {start}) and the values, in order, at multiples of "
                   f"{_ALIGN}")
    end = header.scales_offset + header.scales_nbytes
    if end != size:
        raise fail(f"the data ends at byte {end}, but the file has {size} bytes "
                   f"({'truncated' if size < end else 'trailing bytes'})")
    return header


def open_tensor(path: str | os.PathLike, header: Int4Header,
                where: str | None = None) -> Int4Tensor:
    """Read-only memory maps of a checked file's values and scales (see
    `pickle_format.open_tensor` on why the loader never reads through them)."""
    path = os.fspath(path)
    fd = open_regular(path, where)
    try:
        with open(fd, "rb", closefd=True) as raw:
            size = os.fstat(fd).st_size
            if size < header.scales_offset + header.scales_nbytes:
                raise error(path, f"the file is now {size} bytes, shorter than its header "
                                  "says (changed since it was read?)", where)
            named = NamedFile(raw, path)
            packed = np.memmap(named, np.uint8, mode="r", offset=header.weight_offset,
                               shape=header.packed_shape)
            scales = np.memmap(named, _BF16, mode="r", offset=header.scales_offset,
                               shape=header.scales_shape)
    except CheckpointError:
        raise
    except (OSError, ValueError) as e:
        raise error(path, f"cannot map the tensor's data ({type(e).__name__}: "
                          f"{excerpt(str(e), 120)})", where) from e
    return Int4Tensor(packed, scales, header.group)

