"""Key/value cache: per-layer keys and values plus per-sequence lengths.

Each sequence of a batch has its own length, so prompts of different lengths decode
together: a sequence's new tokens go to positions `lengths[b]...`, RoPE uses those
positions, and it attends only to its own filled, non-pad slots.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from grok.config import GrokConfig


class LayerCache(NamedTuple):
    k: jax.Array  # [B, S, K, C] bf16
    v: jax.Array  # [B, S, K, C] bf16


class KVCache(NamedTuple):
    """A forward pass over tokens [B, T] uses the first B rows; the cache may hold more
    (the engine's decode state runs only the slots in use)."""

    layers: tuple[LayerCache, ...]
    lengths: jax.Array  # [B] int32: slots filled so far (the next token's position)
    key_valid: jax.Array  # [B, S] bool: slot holds a non-pad token (the release masks pads)

    @property
    def max_len(self) -> int:
        return self.key_valid.shape[1]


def init_cache(config: GrokConfig, batch_size: int, max_len: int | None = None,
               dtype=jnp.bfloat16) -> KVCache:
    """An empty cache of `max_len` slots (default: the model's context length)."""
    max_len = config.sequence_len if max_len is None else max_len
    shape = (batch_size, max_len, config.num_kv_heads, config.key_size)
    layers = tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                   for _ in range(config.num_layers))
    return KVCache(layers, jnp.zeros((batch_size,), jnp.int32),
                   jnp.zeros((batch_size, max_len), bool))


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
