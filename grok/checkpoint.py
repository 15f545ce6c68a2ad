"""Checkpoints in the release's layout: `ckpt-0/tensor{index:05d}_000`, one file per parameter.

A parameter's index is its position in `jax.tree_util` flatten order of the Haiku dict (keys
sorted as strings, so `decoder_layer_10` precedes `decoder_layer_2`), which is how the
release numbered its files. Reading validates every header against the expected tree before
any data is touched, so a wrong config or a damaged download fails in seconds with the file
and parameter named, not after minutes of loading or with a shape error deep inside jit.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grok import pickle_format
from grok.config import GrokConfig
from grok.quant import QuantizedWeight8bit, check_groups, is_quantized, quantize, release_groups

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
        raise ValueError(f"checkpoint folder {path} does not exist")
    if (path / CKPT_DIR).is_dir():
        return path / CKPT_DIR
    if any(_TENSOR_FILE.fullmatch(p.name) for p in path.iterdir()):
        return path
    raise ValueError(f"{path} holds neither a {CKPT_DIR} folder nor tensor files")


def _describe(header) -> str:
    if isinstance(header, pickle_format.QuantizedHeader):
        return (f"an 8-bit weight (int8{list(header.weight.shape)} weight, "
                f"{header.scales.dtype}{list(header.scales.shape)} scales)")
    return f"a {header.dtype}{list(header.shape)} array"


def _check(file: Path, where: str, header, expected) -> None:
    """Raises ValueError unless `header` is what `expected` (an abstract leaf) describes."""
    quantized = is_quantized(expected)
    if quantized != isinstance(header, pickle_format.QuantizedHeader):
        kind = ("an 8-bit QuantizedWeight8bit" if quantized
                else f"a float array {list(expected.shape)}")
        raise ValueError(f"{file} ({where}): expected {kind}, found {_describe(header)}")
    if quantized:
        parts = [(f"{where}, weight", header.weight, expected.weight),
                 (f"{where}, scales", header.scales, expected.scales)]
    else:
        parts = [(where, header, expected)]
    for label, found, want in parts:
        if found.dtype != np.dtype(want.dtype):
            raise ValueError(f"{file} ({label}): expected dtype {np.dtype(want.dtype)}, "
                             f"found {found.dtype}")
    # The scales' shape follows from the weight's and the grouping, checked next.
    label, found, _ = parts[0]
    if tuple(found.shape) != tuple(expected.shape):
        raise ValueError(f"{file} ({label}): expected shape {list(expected.shape)}, "
                         f"found {list(found.shape)}")
    if quantized:
        # Any grouping that divides K is usable, not only the one the release chose.
        check_groups(header.weight.shape, header.scales.shape, f"{file} ({where})")


def _open_all(path, expected) -> tuple[list[tuple[str, Any]], Any]:
    folder = _ckpt_dir(path)
    named, treedef = flatten(expected_tree(expected))
    names = {tensor_name(i) for i in range(len(named))}
    extra = sorted(p.name for p in folder.iterdir()
                   if _TENSOR_FILE.fullmatch(p.name) and p.name not in names)
    if extra:
        raise ValueError(f"{folder / extra[0]}: unexpected tensor file; the expected tree has "
                         f"{len(named)} parameters ({tensor_name(0)} .. "
                         f"{tensor_name(len(named) - 1)}) but the folder holds "
                         f"{len(extra)} more (a checkpoint of another config?)")

    def open_one(index: int):
        name, want = named[index]
        file = folder / tensor_name(index)
        where = f"parameter {name}, index {index}"
        if not file.is_file():
            raise ValueError(f"{file}: missing tensor file for {where}")
        header = pickle_format.read_header(file)
        _check(file, where, header, want)
        return name, pickle_format.open_tensor(file, header)

    with ThreadPoolExecutor(min(_MAX_THREADS, max(len(named), 1))) as pool:
        # map yields in index order, so the first failure reported is the lowest index.
        return list(pool.map(open_one, range(len(named)))), treedef


def read_checkpoint(path: str | os.PathLike, expected: dict | GrokConfig) -> dict:
    """The checkpoint's parameters as read-only host memory maps, checked against `expected`
    (an abstract tree, e.g. `model.abstract_params(config)`, or the config itself).

    `path` is the folder holding `ckpt-0`, or `ckpt-0` itself. Only headers are read; every
    file's kind, dtype, shape and size is validated before this returns.
    """
    opened, treedef = _open_all(path, expected)
    return jax.tree_util.tree_unflatten(treedef, [value for _, value in opened])


def write_checkpoint(path: str | os.PathLike, params: dict) -> None:
    """Writes `path/ckpt-0/tensorNNNNN_000` for every parameter, as the release stores it.

    Float weights of parameters the release keeps in 8 bits are quantised with its grouping
    on the way (one tensor at a time); other floats are stored as float32.
    """
    named, _ = flatten(params)
    for name, value in named:  # all checked before anything is written
        dtype = getattr(value, "dtype", None)
        if not is_quantized(value) and (dtype is None or not jnp.issubdtype(dtype, jnp.floating)):
            raise ValueError(f"parameter {name}: expected a float array or a "
                             f"QuantizedWeight8bit, got {type(value).__name__} of dtype {dtype}")
    folder = Path(path) / CKPT_DIR
    if Path(path).is_file() or folder.is_file():
        raise ValueError(f"cannot write a checkpoint into {folder}: a file is in the way")
    folder.mkdir(parents=True, exist_ok=True)
    names = {tensor_name(i) for i in range(len(named))}
    stale = sorted(p.name for p in folder.iterdir()
                   if _TENSOR_FILE.fullmatch(p.name) and p.name not in names)
    if stale:
        raise ValueError(f"{folder} already holds {stale[0]}, beyond the {len(named)} "
                         "parameters being written; write into an empty folder")
    for index, (name, value) in enumerate(named):
        if not is_quantized(value):
            value = np.asarray(value, dtype=np.float32)
            groups = release_groups(name, value.shape) if value.ndim >= 2 else None
            if groups is not None:
                value = quantize(value, groups)
        pickle_format.write_tensor(folder / tensor_name(index), value)


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


def _place(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    # Each device's callback reads only its own slice of the memory map.
    return jax.make_array_from_callback(
        host.shape, sharding, lambda index: np.ascontiguousarray(host[index]))


def load_checkpoint(path: str | os.PathLike, expected: dict | GrokConfig,
                    sharding_for: ShardingFor, *, progress: bool | None = None) -> dict:
    """The checkpoint's parameters as `jax.Array`s placed where `sharding_for` says.

    `sharding_for(param_path, kind, shape)` returns the sharding of each array, `kind` being
    "weight" or "scales" for the halves of an 8-bit weight and "value" otherwise. Every
    device reads just its own shard from the memory-mapped file, so no host ever holds a
    full copy of the checkpoint. `progress`: True always shows a progress line on stderr,
    False never, None once the load has taken over two seconds.
    """
    opened, treedef = _open_all(path, expected)
    sizes = [sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(value))
             for _, value in opened]
    meter = _Progress(len(opened), sum(sizes), progress)
    budget = _ByteBudget(max(sizes, default=0))

    def shard(name: str, kind: str, host: np.ndarray) -> jax.Array:
        sharding = sharding_for(name, kind, tuple(host.shape))
        if not isinstance(sharding, jax.sharding.Sharding):
            raise ValueError(f"sharding_for({name!r}, {kind!r}, {list(host.shape)}) returned "
                             f"a {type(sharding).__name__}, not a jax.sharding.Sharding")
        return _place(host, sharding)

    def load_one(item: tuple[tuple[str, Any], int]):
        (name, host), nbytes = item
        with budget.hold(nbytes):
            if isinstance(host, QuantizedWeight8bit):
                value = QuantizedWeight8bit(shard(name, "weight", host.weight),
                                            shard(name, "scales", host.scales))
            else:
                value = shard(name, "value", host)
            jax.block_until_ready(value)
        meter.add(nbytes)
        return value

    try:
        with ThreadPoolExecutor(min(_MAX_THREADS, max(len(opened), 1))) as pool:
            leaves = list(pool.map(load_one, zip(opened, sizes, strict=True)))
    finally:
        meter.close()
    return jax.tree_util.tree_unflatten(treedef, leaves)
