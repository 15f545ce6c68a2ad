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


def write_rows(buffer: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Writes `new[b]` ([T, ...]) into `buffer[b]` ([S, ...]) at slot `starts[b]`, per row."""
    return jax.vmap(
        lambda buf, x, s: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), s, 0)
    )(buffer, new, starts)
