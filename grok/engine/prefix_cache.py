"""Prefix caching: the keys and values of full blocks of earlier prompts, kept on the
devices and reused by later prompts that begin with the same tokens.

Two halves. `BlockIndex` is plain Python: which pool block holds which tokens. As in vLLM's
automatic prefix caching, a block is keyed by a hash chained over every token before it
(SHA-256 of the previous block's key and this block's token ids), so a key names a block
at one position after one exact prefix, and its keys and values (RoPE'd at those
positions) are the same whatever prompt it came from. Blocks a running request holds are
never evicted; the others are evicted least recently used, later blocks of a chain before
earlier ones (a chain is released last block first). `PrefixCache` adds the pool: device
arrays [L, N, K, block, C] (`BlockPool`) that the engine's `load_blocks` and `save_blocks`
programs copy into and out of a slot's cache row.

The index's decisions depend only on the order of its calls and the tokens, so the
processes of a multi-process run that make the same calls keep the same index.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from grok.config import GrokConfig
from grok.errors import GrokError
from grok.quant import storage_dtype
from grok.sharding import DATA, LAYERS_KV_SPEC

DEFAULT_BLOCK_SIZE = 16  # tokens per block, as vLLM's default on GPUs


@dataclasses.dataclass(frozen=True)
class PrefixCacheSettings:
    """How big the pool is: `blocks` blocks of `block_size` tokens (rounded up to a
    multiple of the mesh's data axis, over which the blocks are split)."""

    blocks: int
    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self):
        for name, low in (("blocks", 1), ("block_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                    or not low <= value <= 1 << 24:
                raise GrokError(f"prefix cache {name} must be an integer in [{low}, 2**24], "
                                f"got {value!r:.40}")


class BlockPool(NamedTuple):
    """The cached blocks' keys and values on the devices."""

    k: jax.Array  # [L, N, K, block, C]
    v: jax.Array  # [L, N, K, block, C]


# Blocks split over `data` like the decode state's rows, heads over `model`.
POOL_SPECS = BlockPool(LAYERS_KV_SPEC, LAYERS_KV_SPEC)


def block_keys(prompt_ids: Sequence[int], block_size: int) -> list[bytes]:
    """The chained key of each full block of a prompt, first block first."""
    keys, parent = [], b""
    ids = np.asarray(prompt_ids, "<i4")
    for start in range(0, len(ids) - block_size + 1, block_size):
        parent = hashlib.sha256(parent + ids[start:start + block_size].tobytes()).digest()
        keys.append(parent)
    return keys


class BlockIndex:
    """Which pool block holds which chain of tokens, who holds it, and which go first."""

    def __init__(self, blocks: int):
        self.blocks = blocks
        self._block: dict[bytes, int] = {}  # key -> block
        self._key: dict[int, bytes] = {}  # block -> key
        self._holders = collections.Counter()  # block -> running requests holding it
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU
        self._free = list(range(blocks - 1, -1, -1))  # never used; popped from the end
        self.evicted = 0  # blocks whose contents were dropped for newer ones

    @property
    def in_use(self) -> int:
        """Blocks that hold cached tokens (held or idle)."""
        return len(self._key)

    @property
    def held(self) -> int:
        """Blocks some running request holds: never evicted."""
        return len(self._holders)

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """The blocks of the longest run of `keys`, from the first, that the pool holds."""
        out = []
        for key in keys:
            block = self._block.get(key)
            if block is None:
                break
            out.append(block)
        return out

    def acquire(self, blocks: Sequence[int]) -> None:
        """A running request holds these blocks: not evictable until released."""
        for block in blocks:
            self._holders[block] += 1
            self._idle.pop(block, None)

    def release(self, blocks: Sequence[int]) -> None:
        """The request is over; a block no one holds becomes evictable, the most recently
        used. Given a chain first block first, its later blocks go before earlier ones."""
        for block in reversed(blocks):
            self._holders[block] -= 1
            if self._holders[block] == 0:
                del self._holders[block]
                self._idle[block] = None

    def claim(self, keys: Sequence[bytes]) -> list[tuple[int, int]]:
        """Blocks for the keys the pool lacks, in order, held by the caller: (position in
        `keys`, block) pairs. Takes never-used blocks first, then evicts idle ones; stops
        when every block is held."""
        out = []
        for i, key in enumerate(keys):
            if key in self._block:
                continue
            if self._free:
                block = self._free.pop()
            elif self._idle:
                block, _ = self._idle.popitem(last=False)
                del self._block[self._key.pop(block)]
                self.evicted += 1
            else:
                break
            self._block[key], self._key[block] = block, key
            self._holders[block] += 1
            out.append((i, block))
        return out


def prefix_pool_shapes(config: GrokConfig, mesh, blocks: int, block_size: int) -> BlockPool:
    """A pool of `blocks` blocks (a multiple of the data axis) as ShapeDtypeStructs placed
    as `POOL_SPECS` says: its bytes per device, known before anything is allocated."""
    dtype = storage_dtype(mesh.devices.flat[0].platform)
    shape = (config.num_layers, blocks, config.num_kv_heads, block_size, config.key_size)
    return BlockPool(*(jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
                       for spec in POOL_SPECS))


class PrefixCache:
    """The pool on a mesh and its index: kept by `Grok`, so that every engine and call of
    one loaded model shares what it has computed."""

    def __init__(self, settings: PrefixCacheSettings, config: GrokConfig, mesh):
        data = mesh.shape[DATA]
        blocks = -(-settings.blocks // data) * data
        self.settings = dataclasses.replace(settings, blocks=blocks)
        self.index = BlockIndex(blocks)
        shapes = prefix_pool_shapes(config, mesh, blocks, settings.block_size)
        self.pool: BlockPool = jax.jit(
            lambda: BlockPool(*(jnp.zeros(a.shape, a.dtype) for a in shapes)),
            out_shardings=BlockPool(*(a.sharding for a in shapes)))()
        self.nbytes = sum(a.size * a.dtype.itemsize for a in shapes)  # the whole pool

    @property
    def block_size(self) -> int:
        return self.settings.block_size

    def shapes(self) -> BlockPool:
        """The pool as ShapeDtypeStructs with their shardings (for compiling)."""
        return BlockPool(*(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)
                           for a in self.pool))
