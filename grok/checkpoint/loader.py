"""Checkpoints in the release's layout: `ckpt-0/tensor{index:05d}_000`, one file per parameter.

A parameter's index is its position in `jax.tree_util` flatten order of the Haiku dict (keys
sorted as strings, so `decoder_layer_10` precedes `decoder_layer_2`), which is how the
release numbered its files. Reading validates every header against the expected tree before
any data is touched, so a wrong config or a damaged download fails in seconds with the file
and parameter named, not after minutes of loading or with a shape error deep inside jit.
"""

from __future__ import annotations

import contextlib
import functools
import math
import mmap
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from grok.checkpoint import int4_format, manifest, pickle_format
from grok.checkpoint.files import error, open_regular, printable
from grok.checkpoint.int4_format import Int4Tensor, unpack
from grok.config import GrokConfig
from grok.errors import CheckpointError, GrokError
from grok.layers import split_release_path
from grok.params import release_groups, storage
from grok.quant import (
    INT4,
    QuantizedWeight4bit,
    QuantizedWeight8bit,
    check_groups,
    check_int4_group,
    int4_storage,
    int8_values,
    is_quantized,
    quantize,
    requantize4,
)
from grok.sharding import k_last

CKPT_DIR = "ckpt-0"
_TENSOR_FILE = re.compile(r"tensor(\d{5,})_(\d{3})")
# Header parsing and shard reads are I/O bound; more threads than this gain nothing on disks.
_MAX_THREADS = 16
# Below this, a load is quick enough that a progress line would only flicker.
_PROGRESS_AFTER_S = 2.0

ShardingFor = Callable[[str, str, tuple[int, ...]], jax.sharding.Sharding]


def tensor_name(index: int) -> str:
    return f"tensor{index:05d}_000"


def flatten(params: dict) -> tuple[list[tuple[str, Any]], Any]:
    """The parameters as ("module/path/name", leaf) in the release's file order, and the
    treedef to rebuild the tree; 8-bit weights are single leaves (one file each)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)
    named = []
    for keys, leaf in leaves:
        if not keys or not all(isinstance(k, jax.tree_util.DictKey) for k in keys):
            raise ValueError(f"parameter trees must be nested dicts; found the path "
                             f"{jax.tree_util.keystr(keys) or '(root)'}")
        named.append(("/".join(str(k.key) for k in keys), leaf))
    return named, treedef


def expected_tree(expected: dict | GrokConfig) -> dict:
    """A config stands for its model's abstract parameters (8-bit where the release is)."""
    if isinstance(expected, GrokConfig):
        from grok.model import abstract_params  # model imports much; only load it when asked
        return abstract_params(expected)
    if not isinstance(expected, dict):
        raise ValueError(f"expected a parameter tree (dict) or a GrokConfig, "
                         f"got {type(expected).__name__}")
    return expected


def _ckpt_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(printable(f"checkpoint folder {path} does not exist"
                                        if not path.exists() else
                                        f"checkpoint folder {path} is a file, not a folder"))
    if (path / CKPT_DIR).is_dir():
        return path / CKPT_DIR
    if any(_TENSOR_FILE.fullmatch(p.name) for p in path.iterdir()):
        return path
    raise error(path, f"holds neither a {CKPT_DIR} folder nor tensor files")


def _describe(header) -> str:
    if isinstance(header, pickle_format.QuantizedHeader):
        return (f"an 8-bit weight (int8{list(header.weight.shape)} weight, "
                f"{header.scales.dtype}{list(header.scales.shape)} scales)")
    return f"a {header.dtype}{list(header.shape)} array"


def _check(file: Path, where: str, header, expected) -> None:
    """Raises CheckpointError unless `header` is what `expected` (an abstract leaf) says."""
    quantized = is_quantized(expected)
    if quantized != isinstance(header, pickle_format.QuantizedHeader):
        kind = ("an 8-bit QuantizedWeight8bit" if quantized
                else f"a float array {list(expected.shape)}")
        raise error(file, f"expected {kind}, found {_describe(header)}", where)
    if quantized:
        parts = [(f"{where}, weight", header.weight, expected.weight),
                 (f"{where}, scales", header.scales, expected.scales)]
    else:
        parts = [(where, header, expected)]
    for label, found, want in parts:
        if found.dtype != np.dtype(want.dtype):
            raise error(file, f"expected dtype {np.dtype(want.dtype)}, found {found.dtype}",
                        label)
    # The scales' shape follows from the weight's and the grouping, checked next.
    label, found, _ = parts[0]
    if tuple(found.shape) != tuple(expected.shape):
        raise error(file, f"expected shape {list(expected.shape)}, found {list(found.shape)}",
                    label)
    if quantized:
        # Any grouping that divides K is usable, not only the one the release chose.
        try:
            check_groups(header.weight.shape, header.scales.shape, "")
        except ValueError as e:
            raise error(file, str(e).removeprefix(": "), where) from None


def _check_int4(file: Path, where: str, name: str, header, expected,
                int4_files: bool) -> None:
    """Raises CheckpointError unless a 4-bit file stands where the table allows one (an
    expert weight the release holds in 8 bits), with its shape, and the caller takes it."""
    if not (is_quantized(expected) and storage(name, "int4") == "int4"):
        raise error(file, f"found a 4-bit tensor where the model has "
                    f"{_describe_expected(expected)}; only expert weights may be 4-bit", where)
    if header.shape != tuple(expected.shape):
        raise error(file, f"expected shape {list(expected.shape)}, found "
                    f"{list(header.shape)}", where)
    if not int4_files:
        raise error(file, "the checkpoint holds 4-bit expert weights: load it with weights "
                    "int4 (or dequantized), not int8", where)


def _describe_expected(expected) -> str:
    if is_quantized(expected):
        return f"an 8-bit weight {list(expected.shape)}"
    return f"a float array {list(expected.shape)}"


def _open_all(path, expected, verify: bool = False, progress: bool | None = None,
              int4_files: bool = True) -> tuple[list[tuple[str, Any]], Any]:
    folder = _ckpt_dir(path)
    named, treedef = flatten(expected_tree(expected))
    names = {tensor_name(i) for i in range(len(named))}
    extra = sorted(p.name for p in folder.iterdir()
                   if _TENSOR_FILE.fullmatch(p.name) and p.name not in names)
    if extra:
        raise error(folder / extra[0], f"unexpected tensor file; the expected tree has "
                    f"{len(named)} parameters ({tensor_name(0)} .. "
                    f"{tensor_name(len(named) - 1)}) but the folder holds {len(extra)} more "
                    "(a checkpoint of another config?)")
    if verify:  # before any header: a corrupt download is named as such, not misparsed
        manifest.verify(folder, progress=progress)

    def open_one(index: int):
        name, want = named[index]
        file = folder / tensor_name(index)
        where = f"parameter {name}, index {index}"
        if not os.path.lexists(file):
            raise error(file, "missing tensor file", where)
        if int4_format.is_int4_file(file, where):
            header = int4_format.read_header(file, where)
            _check_int4(file, where, name, header, want, int4_files)
            return name, int4_format.open_tensor(file, header, where)
        header = pickle_format.read_header(file, where)
        _check(file, where, header, want)
        return name, pickle_format.open_tensor(file, header, where)

    with ThreadPoolExecutor(min(_MAX_THREADS, max(len(named), 1))) as pool:
        # map yields in index order, so the first failure reported is the lowest index.
        return list(pool.map(open_one, range(len(named)))), treedef


def read_checkpoint(path: str | os.PathLike, expected: dict | GrokConfig, *,
                    verify: bool = False) -> dict:
    """The checkpoint's parameters as read-only host memory maps, checked against `expected`
    (an abstract tree, e.g. `model.abstract_params(config)`, or the config itself).

    `path` is the folder holding `ckpt-0`, or `ckpt-0` itself. Only headers are read; every
    file's kind, dtype, shape and size is validated before this returns. `verify`: first
    check every file against the manifest beside the folder (see `grok.checkpoint.manifest`).
    The maps see later changes to the files (touching one past a shrunken file's end is a
    SIGBUS); `load_checkpoint` copies out with positional reads that fail cleanly instead.
    """
    opened, treedef = _open_all(path, expected, verify)
    return jax.tree_util.tree_unflatten(treedef, [value for _, value in opened])


def write_checkpoint(path: str | os.PathLike, params: dict,
                     int4_group: int | None = None) -> None:
    """Writes `path/ckpt-0/tensorNNNNN_000` for every parameter, as the release stores it.

    Float weights of parameters the release keeps in 8 bits are quantised with its grouping
    on the way (one tensor at a time); other floats are stored as float32. 4-bit weights
    (`QuantizedWeight4bit`, or a 4-bit file's maps) are written in the project's 4-bit
    format; with `int4_group`, so are the expert weights of an 8-bit checkpoint,
    requantised block by block as they are written (`grok.checkpoint.int4_format`).
    """
    named, _ = flatten(params)
    for name, value in named:  # all checked before anything is written
        dtype = getattr(value, "dtype", None)
        if not is_quantized(value) and not isinstance(value, Int4Tensor) \
                and (dtype is None or not jnp.issubdtype(dtype, jnp.floating)):
            raise ValueError(f"parameter {name}: expected a float array or a quantised "
                             f"weight, got {type(value).__name__} of dtype {dtype}")
        if int4_group is not None and storage(name, "int4") == "int4":
            check_int4_group(int4_group, value.shape[-2], name)
    folder = Path(path) / CKPT_DIR
    if Path(path).is_file() or folder.is_file():
        raise GrokError(f"cannot write a checkpoint into {folder}: a file is in the way")
    folder.mkdir(parents=True, exist_ok=True)
    names = {tensor_name(i) for i in range(len(named))}
    stale = sorted(p.name for p in folder.iterdir()
                   if _TENSOR_FILE.fullmatch(p.name) and p.name not in names)
    if stale:
        raise GrokError(f"{folder} already holds {stale[0]}, beyond the {len(named)} "
                         "parameters being written; write into an empty folder")
    for index, (name, value) in enumerate(named):
        file = folder / tensor_name(index)
        if not is_quantized(value) and not isinstance(value, Int4Tensor):
            value = np.asarray(value, dtype=np.float32)
            groups = release_groups(name, value.shape) if value.ndim >= 2 else None
            if groups is not None:
                value = quantize(value, groups)
        to_int4 = int4_group is not None and isinstance(value, QuantizedWeight8bit) \
            and storage(name, "int4") == "int4"
        if to_int4 or isinstance(value, (QuantizedWeight4bit, Int4Tensor)):
            int4_format.write_tensor(file, jax.tree.map(np.asarray, value)
                                     if isinstance(value, QuantizedWeight4bit) else value,
                                     int4_group)
        else:
            pickle_format.write_tensor(file, value)
        for _, leaf in _parts(value):  # memory maps, when copying a checkpoint
            _drop_pages(leaf)


class _Progress:
    """One updating stderr line; `enabled=None` shows it only once a load turns out slow."""

    def __init__(self, total_tensors: int, total_bytes: int, enabled: bool | None):
        self.total_tensors, self.total_bytes = total_tensors, total_bytes
        self.enabled = enabled
        self.tensors = self.bytes = 0
        self.start = self.last = time.monotonic()
        self.shown = False
        self.lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self.lock:
            self.tensors += 1
            self.bytes += nbytes
            now = time.monotonic()
            done = self.tensors == self.total_tensors
            show = self.enabled or (self.enabled is None
                                    and now - self.start > _PROGRESS_AFTER_S)
            if show and (done or now - self.last > 0.1 or not self.shown):
                self.last = now
                self.shown = True
                rate = self.bytes / 1e9 / max(now - self.start, 1e-9)
                sys.stderr.write(
                    f"\rloading checkpoint: {self.tensors}/{self.total_tensors} tensors, "
                    f"{self.bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB, {rate:.2f} GB/s")
                sys.stderr.flush()

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


class _ByteBudget:
    """Admits work while the bytes in flight stay within `limit` (one item always runs), so
    parallel loading holds at most about one largest tensor's worth of transient copies."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, nbytes: int):
        with self.cond:
            self.cond.wait_for(lambda: self.used == 0 or self.used + nbytes <= self.limit)
            self.used += nbytes
        try:
            yield
        finally:
            with self.cond:
                self.used -= nbytes
                self.cond.notify_all()


_ALIGN = 64  # XLA:CPU adopts a host buffer as device memory, without a copy, at this alignment
# A shard is read in pieces of about this many bytes of the file, in parallel: one thread
# faulting in a 1.6 GB memory map read 0.4 GB/s here, 64 MB pieces on 8 threads 2 to 3 GB/s.
_PIECE_BYTES = 64 << 20
# A strided block (a column shard) is read in batches of runs, one preadv each (at most
# 1024 buffers), reading gaps up to _GAP_BYTES into scratch rather than seeking past them.
_RUNS_PER_READ = 500
_GAP_BYTES = 64 << 10
_readers = ThreadPoolExecutor(_MAX_THREADS, thread_name_prefix="checkpoint-read")

Key = tuple[tuple[int, int], ...]


def _key(index: tuple, shape: tuple[int, ...]) -> Key:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def local_slices(shape: tuple[int, ...], sharding: jax.sharding.Sharding) -> dict[Key, tuple]:
    """The distinct slices of an array of `shape` that this process's devices hold: a
    process reads these and nothing else, once each however many devices share one."""
    slices: dict[Key, tuple] = {}
    for index in sharding.addressable_devices_indices_map(shape).values():
        slices.setdefault(_key(index, shape), index)
    return slices


def _slice_shape(key: Key) -> tuple[int, ...]:
    return tuple(stop - start for start, stop in key)


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    raw = np.empty(math.prod(shape) * dtype.itemsize + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)


def _span(view: np.ndarray) -> int:
    """Bytes from a (C-ordered) view's first element to the end of its last."""
    return sum((n - 1) * s for n, s in zip(view.shape, view.strides, strict=True)) \
        + view.itemsize


def _pieces(view: np.ndarray, limit: int, prefix: tuple = ()) -> list[tuple]:
    """Indices of blocks of `view` (ranges along its leading axis, or single elements of
    it recursed into when one alone spans more) that each span about `limit` bytes."""
    if view.ndim == 0:
        return [(...,)]
    n, stride = view.shape[0], view.strides[0]
    unit = _span(view[0])
    if unit > limit and view.ndim > 1:
        return [piece for i in range(n)
                for piece in _pieces(view[i], limit, (*prefix, slice(i, i + 1)))]
    step = max(1, (limit - unit) // stride + 1) if stride > 0 else n
    return [(*prefix, slice(i, min(i + step, n))) for i in range(0, n, step)]


def _pread_into(fd: int, host: np.ndarray, buffer: memoryview, offset: int) -> None:
    """Fills `buffer` from the file at `offset`; a file that has shrunk is an error, never
    a read through the memory map past its end (which would kill the process)."""
    while buffer:
        n = os.preadv(fd, [buffer], offset)
        if n == 0:
            raise error(host.filename, f"the file ends at byte {offset}, before the tensor's "
                        "data does (was it changed while loading?)")
        buffer, offset = buffer[n:], offset + n


def _read_piece(fd: int | None, host: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
    """Copies `src` (a block of the memory-mapped `host`) into `dst` with positional reads
    only, never through the map: a file that shrinks meanwhile is then an error, not a
    SIGBUS. One read where the block is contiguous in the file, else `_read_runs`."""
    if fd is None:  # not a file's map (an empty array): nothing can shrink under it
        np.copyto(dst, src)
        return
    offset = host.offset + (src.ctypes.data - host.ctypes.data)
    target = dst if dst.flags.c_contiguous else np.empty(dst.shape, dst.dtype)
    out = memoryview(target.reshape(-1).view(np.uint8))
    if src.flags.c_contiguous:
        _pread_into(fd, host, out, offset)
    else:
        _read_runs(fd, host, src, offset, out)
    if target is not dst:
        np.copyto(dst, target)


def _read_runs(fd: int, host: np.ndarray, src: np.ndarray, offset: int,
               out: memoryview) -> None:
    """Reads a strided block (a column shard, say) run by run: each contiguous run of the
    file lands in its place in `out`, and the short gaps between runs go to one scratch
    buffer, so that a batch of up to _RUNS_PER_READ runs costs one `preadv`."""
    axes = src.ndim  # trailing axes that are contiguous in the file form one run
    run = src.itemsize
    while axes and src.strides[axes - 1] == run:
        run *= src.shape[axes - 1]
        axes -= 1
    grid = np.indices(src.shape[:axes]).reshape(axes, -1)
    starts = offset + (grid * np.array(src.strides[:axes], np.int64)[:, None]).sum(0)
    gaps = np.diff(starts) - run
    scratch = memoryview(bytearray(int(min(gaps.max(initial=0), _GAP_BYTES))))
    first = 0
    while first < len(starts):
        last = first + 1
        while (last < len(starts) and last - first < _RUNS_PER_READ
               and gaps[last - 1] <= _GAP_BYTES):
            last += 1
        buffers = []
        for i in range(first, last):
            buffers.append(out[i * run:(i + 1) * run])
            if i + 1 < last and gaps[i]:
                buffers.append(scratch[:gaps[i]])
        size = int(starts[last - 1]) + run - int(starts[first])
        if os.preadv(fd, buffers, int(starts[first])) != size:  # short: the end, or a signal
            for i in range(first, last):
                _pread_into(fd, host, out[i * run:(i + 1) * run], int(starts[i]))
        first = last


def _read_slices(host: np.ndarray, slices: dict[Key, tuple]) -> dict[Key, np.ndarray]:
    """Fresh, aligned copies of `host`'s slices, read in parallel pieces."""
    buffers = {key: _aligned_empty(_slice_shape(key), host.dtype) for key in slices}
    mapped = isinstance(host, np.memmap) and host.flags.c_contiguous and hasattr(os, "preadv")
    jobs = []
    for key, index in slices.items():
        view = host[(*index, ...)]
        pieces = _pieces(view, _PIECE_BYTES) if mapped and view.size else [(...,)]
        jobs += [(view[piece], buffers[key][piece]) for piece in pieces]
    fd = open_regular(host.filename) if mapped else None
    try:
        if fd is not None:
            size = os.fstat(fd).st_size
            if size < host.offset + host.nbytes:
                raise error(host.filename, f"the file is now {size} bytes, but the tensor's "
                            f"data runs to byte {host.offset + host.nbytes} (was it changed "
                            "while loading?)")
        if len(jobs) == 1:  # a small slice: read here, not queued behind large tensors' pieces
            _read_piece(fd, host, *jobs[0])
        else:
            for future in [_readers.submit(_read_piece, fd, host, *job) for job in jobs]:
                future.result()
    finally:
        if fd is not None:
            os.close(fd)
    return buffers


def _drop_pages(host: np.ndarray) -> None:
    """Unmaps the file pages a read touched, so they stop counting towards this process's
    memory (the kernel keeps them cached); nothing placed refers to the map."""
    mapping = getattr(host, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def _assemble(shape: tuple[int, ...], sharding: jax.sharding.Sharding,
              buffers: dict[Key, np.ndarray], dtype) -> jax.Array:
    """The global array of `shape` placed as `sharding` says, from the slices this
    process's devices hold (fresh copies: on CPU they become the devices' memory)."""
    return jax.make_array_from_callback(shape, sharding,
                                        lambda index: buffers[_key(index, shape)], dtype=dtype)


def _swap(pair: tuple) -> tuple:
    """A shape or slice key with its last two axes swapped."""
    return (*pair[:-2], pair[-1], pair[-2])


def _unpacked_slices(packed: np.ndarray, slices: dict[Key, tuple]) -> dict[Key, np.ndarray]:
    """int4 slices (logical keys) of a 4-bit file's packed bytes [..., K, N/2]: each read
    as its bytes (half the columns) and unpacked."""
    halves = {key: (*key[:-1], (key[-1][0] // 2, key[-1][1] // 2)) for key in slices}
    raw = _read_slices(packed, {half: tuple(slice(a, b) for a, b in half)
                                for half in halves.values()})
    return {key: unpack(raw[half]) for key, half in halves.items()}


def _int4_slices(value: QuantizedWeight8bit, weight_slices: dict[Key, tuple],
                 scale_slices: dict[Key, tuple], group: int
                 ) -> tuple[dict[Key, np.ndarray], dict[Key, np.ndarray]]:
    """The 4-bit values and scales of the slices this process's devices hold of an 8-bit
    weight [..., K, N] (host memory maps), each requantised from its own int8 slice and the
    (small) scales, one leading index (an expert) at a time: no host ever holds a whole
    tensor, or more than one expert's slice, in float."""
    rows = value.weight.shape[-2]
    whole = tuple(slice(0, n) for n in value.scales.shape)
    scales8 = _read_slices(value.scales, {_key(whole, value.scales.shape): whole})
    scales8 = next(iter(scales8.values()))
    int8 = _read_slices(value.weight, weight_slices)
    weights, scales = {}, {}
    for key, index in weight_slices.items():
        first, last = key[-2]
        block = int8[key]
        q = np.empty(block.shape, INT4)
        s = np.empty((*block.shape[:-2], (last - first) // group, block.shape[-1]),
                     np.dtype(jnp.bfloat16))
        block_scales = scales8[(*index[:-2], slice(None), index[-1])]
        for lead in np.ndindex(*block.shape[:-2]):
            q[lead], s[lead] = requantize4(
                int8_values(block[lead], block_scales[lead], first, rows), group)
        weights[key] = q
        scales[(*key[:-2], (first // group, last // group), key[-1])] = s
    missing = [key for key in scale_slices if key not in scales]
    if missing:  # the scales' placement must follow the weight's (param_sharding does)
        raise ValueError(f"4-bit scales slice {missing[0]} has no matching weight slice")
    return weights, {key: scales[key] for key in scale_slices}


def _parts(value) -> list[tuple[str, np.ndarray]]:
    if isinstance(value, Int4Tensor):
        return [("weight", value.packed), ("scales", value.scales)]
    if isinstance(value, QuantizedWeight8bit):
        return [("weight", value.weight), ("scales", value.scales)]
    return [("value", value)]


class _Stack:
    """One stacked [L, ...] parameter being assembled while its layers' files load: each
    local device holds one [L, *shard] array, and each layer's slice is read from its file
    and written into its place in that array (donated, so in place). No host ever holds
    more of it than the layer slices in flight."""

    def __init__(self, layers: int, layer_shape: tuple[int, ...], dtype,
                 sharding: jax.sharding.Sharding, name: str):
        self.shape = (layers, *layer_shape)
        self.sharding = sharding
        self.indices = sharding.addressable_devices_indices_map(self.shape)
        for index in self.indices.values():
            if _key(index[:1], self.shape[:1]) != ((0, layers),):
                raise ValueError(f"{name}: a stacked parameter's layer axis must not be "
                                 f"split, got sharding {sharding}")
        self.dtype = dtype
        # The distinct slices of one layer's tensor that this process's devices hold.
        self.layer_slices: dict[Key, tuple] = {}
        for index in self.indices.values():
            self.layer_slices.setdefault(_key(index[1:], self.shape[1:]), index[1:])
        self.arrays: dict = {}
        self.lock = threading.Lock()

    def put(self, layer: int, buffers: dict[Key, np.ndarray]) -> None:
        """Writes layer `layer`'s slices (keyed as `layer_slices`) into the stacks."""
        shape = self.shape[1:]
        with self.lock:
            for device, index in self.indices.items():
                piece = jax.device_put(buffers[_key(index[1:], shape)], device)
                if device not in self.arrays:
                    local = (self.shape[0], *piece.shape)
                    self.arrays[device] = jax.device_put(np.zeros(local, self.dtype), device)
                self.arrays[device] = _set_layer(self.arrays[device], piece, np.int32(layer))

    def array(self) -> jax.Array:
        return jax.make_array_from_single_device_arrays(
            self.shape, self.sharding, [self.arrays[d] for d in self.indices])


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack, piece, layer):
    return jax.lax.dynamic_update_index_in_dim(stack, piece.astype(stack.dtype), layer, 0)


class _Placement(NamedTuple):
    """Where one file's arrays go: `form` is "as stored", "int4" (8-bit values requantised
    while loading) or "int4 file"; per array, its target (a sharding or a `_Stack`), the
    shape and dtype it is held in (4-bit ones [..., N, K], see `QuantizedWeight4bit`)."""

    name: str
    layer: int | None  # of a stacked parameter
    value: Any  # the file's host arrays (memory maps)
    form: str
    targets: tuple
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple


def load_checkpoint(path: str | os.PathLike, expected: dict | GrokConfig,
                    sharding_for: ShardingFor, *, progress: bool | None = None,
                    verify: bool = False, stacked: bool = False,
                    int4_group: int | None = None, int4_files: bool = True) -> dict:
    """The checkpoint's parameters as `jax.Array`s placed where `sharding_for` says.

    `sharding_for(param_path, kind, shape)` returns the sharding of each array, `kind` being
    "weight" or "scales" for the halves of a quantised weight and "value" otherwise. Every
    header and every sharding is checked before any data is read. Each process then reads
    only the slices its own devices hold, straight from the file into the buffers that
    become the shards, so no host ever holds a copy of more than its share; files load in
    parallel, and large tensors in parallel pieces. `progress`: True always shows a
    progress line on stderr (this process's tensors, bytes and rate), False never, None
    once the load has taken over two seconds. `verify`: first check every file's size and
    SHA-256 against the manifest beside `ckpt-0` (see `grok.checkpoint.manifest`; a missing
    manifest is an error), which the format itself cannot do: it has no checksums.

    `expected` is always the release's per-layer tree, as the files are. With `stacked`,
    the decoder layers' parameters come back as the `scan` tree of `grok.layers` (each
    layer's file read into its slice of one [L, ...] array; `sharding_for` is asked for the
    stacked path and shape). With `int4_group`, the parameters the table stores in 4 bits
    (`grok.params`) come back as `QuantizedWeight4bit`s in groups of that many rows, each
    device's slice requantised from its own int8 slice as it is read. A 4-bit checkpoint's
    files (`grok.checkpoint.int4_format`) come back as `QuantizedWeight4bit`s with their
    own groups, unless `int4_files` is False (an error: the caller wants int8).
    """
    opened, treedef = _open_all(path, expected, verify, progress, int4_files)
    num_layers = 1 + max((split[1] for name, _ in opened
                          if (split := split_release_path(name)) is not None), default=-1)
    stacks: dict[tuple[str, str], _Stack] = {}

    def target_for(name: str, split, kind: str, shape: tuple[int, ...], dtype,
                   k_last_form: bool = False):
        """The sharding, or the stack, that this file's `kind` array (of logical `shape`)
        goes to, and the dtype it is held in there; with `k_last_form`, for its form with
        the last two axes swapped (4-bit weights and scales, `QuantizedWeight4bit`)."""
        target_name, target_shape = (name, shape) if split is None \
            else (split[0], (num_layers, *shape))
        sharding = sharding_for(target_name, kind, target_shape)
        if not isinstance(sharding, jax.sharding.Sharding):
            raise ValueError(f"sharding_for({target_name!r}, {kind!r}, {list(target_shape)}) "
                             f"returned a {type(sharding).__name__}, not a "
                             "jax.sharding.Sharding")
        if dtype == INT4:
            dtype = int4_storage(next(iter(sharding.device_set)).platform)
        if k_last_form:
            sharding = k_last(sharding, len(target_shape))
            shape = _swap(shape)
        if split is None:
            return sharding, dtype
        if (split[0], kind) not in stacks:
            stacks[split[0], kind] = _Stack(num_layers, shape, dtype, sharding, split[0])
        return stacks[split[0], kind], dtype

    def slices_of(target, shape):
        return target.layer_slices if isinstance(target, _Stack) \
            else local_slices(shape, target)

    placements = []
    for name, value in opened:
        split = split_release_path(name) if stacked else None
        if isinstance(value, Int4Tensor):
            form = "int4 file"
        elif (int4_group is not None and is_quantized(value)
              and storage(name, "int4") == "int4"):
            form = "int4"
        else:
            form = "as stored"
        if form == "as stored":
            shapes = [tuple(host.shape) for _, host in _parts(value)]
            targets, dtypes = zip(*(target_for(name, split, kind, tuple(host.shape), host.dtype)
                                    for kind, host in _parts(value)), strict=True)
        else:
            *lead, rows, columns = value.shape
            group = value.group if form == "int4 file" else int4_group
            shapes = QuantizedWeight4bit.held_shapes(value.shape, group)
            weight = target_for(name, split, "weight", tuple(value.shape), INT4, True)
            for key in slices_of(weight[0], shapes[0]):  # checked before the scales' target
                check_int4_group(group, key[-1][1] - key[-1][0],
                                 f"{name} (a device's share on this mesh)")
                if form == "int4 file" and (key[-2][0] % 2 or key[-2][1] % 2):
                    raise GrokError(f"{name}: a device's share of the last axis, "
                                    f"{key[-2][0]}..{key[-2][1]}, splits the bytes that hold "
                                    "two 4-bit values; use a mesh that splits it evenly")
            targets, dtypes = zip(weight, target_for(
                name, split, "scales", (*lead, rows // group, columns), jnp.bfloat16, True),
                strict=True)
        placements.append(_Placement(name, None if split is None else split[1], value, form,
                                     tuple(targets), tuple(shapes), tuple(dtypes)))

    def bytes_read(place: _Placement) -> int:
        elements = [sum(math.prod(_slice_shape(key)) for key in slices_of(target, shape))
                    for target, shape in zip(place.targets, place.shapes, strict=True)]
        if place.form == "int4 file":  # packed values, and the scales
            return elements[0] // 2 + elements[1] * 2
        if place.form == "int4":  # this process's int8 slices, and all of the (small) scales
            return elements[0] + place.value.scales.nbytes
        return sum(count * host.dtype.itemsize
                   for count, (_, host) in zip(elements, _parts(place.value), strict=True))

    sizes = [bytes_read(place) for place in placements]
    meter = _Progress(len(opened), sum(sizes), progress)
    budget = _ByteBudget(max(sizes, default=0))

    def load_one(item: tuple[_Placement, int]):
        place, nbytes = item
        value = place.value
        hosts = [host for _, host in _parts(value)]
        slices = [slices_of(target, shape)
                  for target, shape in zip(place.targets, place.shapes, strict=True)]
        with budget.hold(nbytes):
            if place.form == "as stored":
                buffers = [_read_slices(host, part)
                           for host, part in zip(hosts, slices, strict=True)]
            else:  # 4-bit values and scales by their logical slices, then held K-last
                logical = [{_swap(key): _swap(index) for key, index in part.items()}
                           for part in slices]
                if place.form == "int4 file":
                    values = _unpacked_slices(value.packed, logical[0])
                    scales = _read_slices(value.scales, logical[1])
                else:
                    values, scales = _int4_slices(value, *logical, int4_group)
                buffers = [{_swap(key): np.ascontiguousarray(
                    np.swapaxes(part, -1, -2).astype(dtype)) for key, part in held.items()}
                    for held, dtype in zip((values, scales), place.dtypes, strict=True)]
            for host in hosts:
                _drop_pages(host)
            arrays = []
            for target, shape, parts, dtype in zip(place.targets, place.shapes, buffers,
                                                   place.dtypes, strict=True):
                if isinstance(target, _Stack):
                    target.put(place.layer, parts)
                    arrays.append(None)
                else:
                    arrays.append(_assemble(shape, target, parts, dtype))
            quantized = QuantizedWeight8bit if place.form == "as stored" else QuantizedWeight4bit
            loaded = quantized(*arrays) if len(arrays) == 2 else arrays[0]
            jax.block_until_ready([a for a in arrays if a is not None])
        meter.add(nbytes)
        return place.name, loaded

    try:
        with ThreadPoolExecutor(min(_MAX_THREADS, max(len(opened), 1))) as pool:
            loaded = list(pool.map(load_one, zip(placements, sizes, strict=True)))
    finally:
        meter.close()
    if not stacked:
        return jax.tree_util.tree_unflatten(treedef, [value for _, value in loaded])
    params: dict = {}
    for (name, value), place in zip(loaded, placements, strict=True):
        split = split_release_path(name)
        if split is not None:
            if split[1] != 0:  # the stack is the value of its layer 0
                continue
            name = split[0]
            if (name, "weight") in stacks:
                quantized = (QuantizedWeight8bit if place.form == "as stored"
                             else QuantizedWeight4bit)
                value = quantized(stacks[name, "weight"].array(),
                                  stacks[name, "scales"].array())
            else:
                value = stacks[name, "value"].array()
        module, param = name.rsplit("/", 1)
        params.setdefault(module, {})[param] = value
    return params
