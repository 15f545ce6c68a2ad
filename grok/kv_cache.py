"""Key/value cache: every layer's keys and values in two stacked arrays, plus per-sequence
lengths.

Each sequence of a batch has its own length, so prompts of different lengths decode
together: a sequence's new tokens go to positions `lengths[b]...`, RoPE uses those
positions, and it attends only to its own filled, non-pad slots. The layers share one
array ([L, B, K, S, C]) so that a scan over layers carries the cache and updates it in
place: each layer writes its new rows into its own slice, and no layer's cache is copied.
Heads come before positions ([L, B, K, S, C]) so that a layer's slice is already laid out
as attention's batched products want it (batch axes B and K outermost): with positions
before heads, XLA:GPU transposed the whole cache in and out of the layer loop at every
decode step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from grok.config import GrokConfig
from grok.quant import storage_dtype


class KVCache(NamedTuple):
    """A forward pass over tokens [B, T] uses the first B rows; the cache may hold more
    (the engine's decode state runs only the slots in use)."""

    k: jax.Array  # [L, B, K, S, C]
    v: jax.Array  # [L, B, K, S, C]
    lengths: jax.Array  # [B] int32: slots filled so far (the next token's position)
    key_valid: jax.Array  # [B, S] bool: slot holds a non-pad token (the release masks pads)

    @property
    def max_len(self) -> int:
        return self.key_valid.shape[1]


def init_cache(config: GrokConfig, batch_size: int, max_len: int | None = None,
               dtype=None) -> KVCache:
    """An empty cache of `max_len` slots (default: the model's context length). Keys and
    values are bf16 numbers, held as `quant.storage_dtype` says by default: float32 on CPU,
    where XLA converts bf16 operands at every use (and cannot run some bf16 batched
    products at all), bf16 elsewhere."""
    max_len = config.sequence_len if max_len is None else max_len
    dtype = storage_dtype(jax.default_backend()) if dtype is None else dtype
    shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.key_size)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch_size,), jnp.int32), jnp.zeros((batch_size, max_len), bool))


def write_rows(buffer: jax.Array,  # [B0, S, ...]
               new: jax.Array,  # [B, T, ...], B <= B0
               starts: jax.Array,  # [B] int32
               ) -> jax.Array:
    """Writes `new[b]` into `buffer[b]` at slots `starts[b]...`, for the first B rows.

    A scatter, so a donated buffer is updated in place and rows past B (free slots of a
    decode state) are neither read nor copied; writes past the last slot are dropped.
    """
    b, t = new.shape[:2]
    rows = jnp.arange(b)[:, None]  # [B, 1]
    slots = starts[:, None] + jnp.arange(t)[None, :]  # [B, T]
    return buffer.at[rows, slots].set(new.astype(buffer.dtype), mode="drop")


def write_layer(buffer: jax.Array,  # [L, B0, K, S, C]
                layer: int | jax.Array,  # static, or the scan's traced index
                new: jax.Array,  # [B, T, K, C]
                starts: jax.Array,  # [B] int32
                rows: jax.Array | None = None,  # [B] int32: the rows written (default 0..B-1)
                ) -> jax.Array:
    """Writes `new[b]` into layer `layer`, row `rows[b]`, at slots `starts[b]...`, in place
    (see `write_rows`); rows out of range (padding) are dropped."""
    b, t = new.shape[:2]
    rows = jnp.arange(b) if rows is None else rows
    slots = starts[:, None] + jnp.arange(t)[None, :]  # [B, T]
    # The indexed region is [B, T, K, C]: the index arrays' shape first, then the slice.
    return buffer.at[layer, rows[:, None], :, slots].set(new.astype(buffer.dtype),
                                                         mode="drop")


def read_layer(buffer: jax.Array,  # [L, B0, K, S0, C]
               layer: int | jax.Array,
               rows: int | jax.Array,  # the first `rows` rows, or i32[B]: these rows
               slots: int) -> jax.Array:  # -> [B, K, slots, C]
    """The first `slots` positions of some rows of layer `layer`: what attention reads.
    A row index out of range (padding) reads zeros. Rows are gathered, the first `rows`
    too: sliced instead, inside a step's choice of attention length (`model.Reach`), they
    made XLA:GPU relay out every layer's cache at each step (with one query head per key
    head)."""
    rows = jnp.arange(rows) if isinstance(rows, int) else rows
    return buffer.at[layer, rows, :, :slots].get(mode="fill", fill_value=0)
