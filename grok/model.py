"""Grok-1's forward pass as Haiku modules, with the release's parameter names and numerics.

Shape letters (used in comments and einsum specs):
  B batch            T new tokens (query time)    S cache slots (key time)
  D model width      H query heads                K key/value heads
  R query heads per key/value head (H = K * R)    C head width (key_size)
  E experts          X experts chosen per token   F expert width (ffn_size)
  V vocabulary       N tokens of a flattened batch (B * T)
  L layers

Numerics follow the release: activations in bf16; norms, RoPE phases, the router and the
attention softmax in float32. Weights are used in their own dtype: 8-bit weights are
dequantised to bf16 inside the computation that uses them, float arrays are used as given
(hold bf16-representable values in them, as `Grok.load` does, to reproduce the release).
Parameter paths (`language_model/in_out_embed`, `transformer/decoder_layer_{i}/...`) are
the release's, so its checkpoint loads into this tree unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from grok import moe
from grok.config import ATTN_SOFT_CAP, RMS_NORM_EPS, ROPE_BASE, GrokConfig
from grok.kv_cache import KVCache, read_layer, write_layer, write_rows
from grok.layers import check_layer_mode
from grok.params import release_groups
from grok.quant import QuantizedWeight8bit, map_params, qdot
from grok.sharding import REPLICATED_SPEC, RESIDUAL_SPEC, constrain

ACT_DTYPE = jnp.bfloat16  # the release's "fprop dtype"
MASK_VALUE = -1e30  # logit of a masked key, as in the release


def _fan_in_init(shape, dtype):
    """Truncated normal with std 1/sqrt(fan_in); only used to make random test models."""
    std = 1.0 / np.sqrt(shape[-2])
    return hk.initializers.TruncatedNormal(stddev=std)(shape, dtype)


class RMSNorm(hk.Module):
    def __call__(self, x):  # [..., D]
        scale = hk.get_parameter("scale", (x.shape[-1],), jnp.float32, init=jnp.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
                                     + RMS_NORM_EPS)
        return (normed * scale.astype(jnp.float32)).astype(x.dtype)


class Linear(hk.Module):
    """`x @ w` with w [in, out], 8-bit or float; no bias (the release has none)."""

    def __init__(self, output_size: int, name: str):
        super().__init__(name=name)
        self.output_size = output_size

    def __call__(self, x):  # [..., in] -> [..., out]
        w = hk.get_parameter("w", (x.shape[-1], self.output_size), jnp.float32,
                             init=_fan_in_init)
        return qdot("...i,io->...o", x, w)


class _Weight(hk.Module):
    """A bare parameter `w` under its own module name (the release's expert weight paths)."""

    def __init__(self, shape: tuple[int, ...], name: str):
        super().__init__(name=name)
        self.shape = shape

    def __call__(self):
        return hk.get_parameter("w", self.shape, jnp.float32, init=_fan_in_init)


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] over the last axis (the "rotate half" RoPE convention)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, positions):
    """RoPE over the full head width, in float32, back to x's dtype.

    x: [B, T, heads, C]; positions: [B, T] (absolute, so cached decoding continues them).
    """
    c = x.shape[-1]
    inv_freq = 1.0 / (ROPE_BASE ** (jnp.arange(0, c, 2, dtype=jnp.float32) / c))  # [C/2]
    phase = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, C/2]
    phase = jnp.concatenate([phase, phase], axis=-1)[:, :, None, :]  # [B, T, 1, C]
    out = x * jnp.cos(phase) + rotate_half(x) * jnp.sin(phase)
    return out.astype(x.dtype)


def soft_cap(logits, cap: float = ATTN_SOFT_CAP):
    return cap * jnp.tanh(logits / cap)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["index"],
                   meta_fields=["lengths"])
@dataclasses.dataclass(frozen=True)
class Reach:
    """How much of the cache a step's attention reads: the first `lengths[index]` slots,
    one of a few static lengths chosen as the step runs. One program then serves a cache
    however full (a branch per length) and still reads only the length chosen."""

    lengths: tuple[int, ...]  # ascending; the last is the key mask's S
    index: jax.Array  # i32[]


class Part(NamedTuple):
    """Where one part of a step's tokens sits, as attention needs it. A step may run
    several parts (a decode step's rows and a prompt chunk) that share every weight read
    (`joined`) but attend apart, each to its own rows of the cache."""

    positions: jax.Array  # i32[B, T]
    key_mask: jax.Array  # bool[B, T, S]: True where the query may attend the key
    starts: jax.Array | None  # i32[B]: the cache slot the first token goes to (no cache: None)
    rows: jax.Array | None  # i32[B]: the cache row continued (None: row b)
    live: jax.Array | None  # bool[B, T]: a row's first num_new tokens (None: all)
    reach: Reach | None = None  # the cache slots read (None: the key mask's S)


def joined(fn, xs: tuple[jax.Array, ...], *more: tuple[jax.Array, ...]) -> tuple:
    """`fn` applied once to the tokens of every part (xs: [B_i, T_i, ...] each; `more`:
    further per-part inputs of the same B_i, T_i), so that the parts share its weight
    reads; its outputs (a pytree of [B, T, ...] arrays) come back per part. One part is
    passed as it is."""
    if len(xs) == 1:
        return (fn(xs[0], *(m[0] for m in more)),)
    sizes = [x.shape[0] * x.shape[1] for x in xs]

    def flat(parts):  # [1, N, ...]
        return jnp.concatenate([p.reshape(1, n, *p.shape[2:])
                                for p, n in zip(parts, sizes, strict=True)], axis=1)

    out = fn(flat(xs), *map(flat, more))
    offsets = np.cumsum([0, *sizes])

    def part(i, x):
        return jax.tree.map(lambda y: jax.lax.slice_in_dim(y, offsets[i], offsets[i + 1], axis=1)
                            .reshape(x.shape[0], x.shape[1], *y.shape[2:]), out)
    return tuple(part(i, x) for i, x in enumerate(xs))


class Attention(hk.Module):
    """Grouped-query attention: query head h reads key/value head h // R."""

    def __init__(self, config: GrokConfig):
        super().__init__(name="multi_head_attention")
        self.config = config

    def __call__(self, xs: tuple[jax.Array, ...],  # each part's [B, T, D]
                 parts: tuple[Part, ...], kv: tuple[jax.Array, jax.Array] | None,
                 layer: int | jax.Array):
        """Each part's output [B, T, D], and the cache's keys and values.

        Without a cache the keys are each part's T new tokens (S = T). With one (every
        layer's keys and values, [L, B0, K, S0, C] each), a part's new keys and values are
        written at slot `starts[b]` of cache row `rows[b]` of layer `layer`, every part's
        before any is read (so a later part's writes win where two parts write one slot),
        and that row's first S slots (S from key_mask: the filled part of the cache,
        bucketed; or the part's `Reach`, chosen as the step runs) are attended.
        """
        cfg = self.config
        k_heads, r, c = cfg.num_kv_heads, cfg.q_per_kv, cfg.key_size
        qs = joined(Linear(cfg.num_q_heads * c, name="query"), xs)
        ks = joined(Linear(k_heads * c, name="key"), xs)
        vs = joined(Linear(k_heads * c, name="value"), xs)
        news = []
        for x, part, q, k, v in zip(xs, parts, qs, ks, vs, strict=True):
            b, t, _ = x.shape
            news.append((apply_rope(q.reshape(b, t, k_heads * r, c), part.positions),
                         apply_rope(k.reshape(b, t, k_heads, c), part.positions),
                         v.reshape(b, t, k_heads, c)))  # [B, T, H or K, C]
        if kv is not None:
            for part, (_, k, v) in zip(parts, news, strict=True):
                kv = (write_layer(kv[0], layer, k, part.starts, part.rows),
                      write_layer(kv[1], layer, v, part.starts, part.rows))

        outs = []
        for part, (q, k, v) in zip(parts, news, strict=True):
            b, t = q.shape[:2]
            q = q.reshape(b, t, k_heads, r, c)
            if kv is None:  # [B, K, S=T, C]
                out = self._attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                   part.key_mask)
            else:
                rows = b if part.rows is None else part.rows

                def first(s, q=q, rows=rows, part=part):  # the cache's first s slots
                    k, v = (read_layer(a, layer, rows, s) for a in kv)  # [B, K, S, C]
                    return self._attend(q, k, v, part.key_mask[..., :s])

                reach = part.reach
                if reach is None or len(reach.lengths) == 1:
                    out = first(part.key_mask.shape[-1])
                else:
                    out = jax.lax.switch(reach.index, [functools.partial(first, s)
                                                       for s in reach.lengths])
            outs.append(out.reshape(b, t, cfg.emb_size))
        return joined(Linear(cfg.emb_size, name="linear"), tuple(outs)), kv

    def _attend(self, q: jax.Array,  # [B, T, K, R, C]
                k: jax.Array,  # [B, K, S, C]
                v: jax.Array,  # [B, K, S, C]
                key_mask: jax.Array,  # bool[B, T, S]
                ) -> jax.Array:  # [B, T, K, R, C]
        logits = jnp.einsum("btkrc,bksc->bkrts", q, k, preferred_element_type=jnp.float32)
        logits = logits.astype(ACT_DTYPE).astype(jnp.float32)  # the release's bf16 einsum
        logits = soft_cap(logits * self.config.attn_output_multiplier)
        logits = jnp.where(key_mask[:, None, None, :, :], logits, MASK_VALUE)
        weights = jax.nn.softmax(logits, axis=-1).astype(ACT_DTYPE)  # [B, K, R, T, S]
        out = jnp.einsum("bkrts,bksc->btkrc", weights, v, preferred_element_type=jnp.float32)
        return out.astype(ACT_DTYPE)


class LayerRouting(NamedTuple):
    """What one layer's router chose for each token."""

    experts: jax.Array  # i32[B, T, X]: most probable first
    gates: jax.Array  # f32[B, T, X]: their raw softmax probabilities, as the layer used them
    entropy: jax.Array  # f32[B, T]: entropy of the router's distribution over the E experts


class MoE(hk.Module):
    """Softmax router over E experts, top-X by probability, GELU-gated expert FFNs.

    The gates are the raw softmax probabilities of the chosen experts (not renormalised).
    Returns the output and the layer's `LayerRouting` (free when unused: XLA drops it).
    """

    def __init__(self, config: GrokConfig, strategy: str):
        super().__init__(name="moe")
        self.config = config
        self.strategy = strategy

    def __call__(self, x, router_w, experts: tuple | None = None,
                 live: jax.Array | None = None):  # x [B, T, D]
        """`experts`: (w_gelu, w_up, w_down) of this layer, where a scan over layers
        passes them in (`moe.LayerExperts`); by default the module's own parameters.
        `live` (bool[B, T]; None: all): the tokens whose output is used; the others (a
        step's padding) run through no expert with the sparse strategy."""
        cfg = self.config
        e, d, f = cfg.num_experts, cfg.emb_size, cfg.ffn_size
        if experts is None:
            experts = (_Weight((e, d, f), name="linear")(), _Weight((e, d, f), name="linear_v")(),
                       _Weight((e, f, d), name="linear_1")())
        w_gelu, w_up, w_down = experts
        b, t, _ = x.shape
        tokens = x.reshape(b * t, d)  # [N, D]
        router_logits = jnp.dot(tokens.astype(jnp.float32), router_w.astype(jnp.float32),
                                precision=jax.lax.Precision.HIGHEST)  # [N, E]
        probs = jax.nn.softmax(router_logits, axis=-1)
        gates, chosen = jax.lax.top_k(probs, cfg.num_selected_experts)  # [N, X]
        out = moe.dispatch(self.strategy, tokens, gates, chosen, w_gelu, w_up, w_down,
                           None if live is None else live.reshape(b * t))
        entropy = -jnp.sum(probs * jax.nn.log_softmax(router_logits, axis=-1), axis=-1)
        routing = LayerRouting(chosen.reshape(b, t, -1).astype(jnp.int32),
                               gates.reshape(b, t, -1), entropy.reshape(b, t))
        return out.reshape(b, t, d), routing


def decoder_layer(config: GrokConfig, moe_strategy: str, hs: tuple[jax.Array, ...],
                  parts: tuple[Part, ...], kv, layer: int | jax.Array,
                  experts: tuple | None = None):
    """One decoder layer on each part's residual stream [B, T, D]; its modules are named
    relative to the caller's scope (`decoder_layer_{i}` unrolled, the stack's
    `decoder_layer`). Returns the new streams, the cache's keys and values, and each
    part's `LayerRouting`."""
    norm = RMSNorm(name="rms_norm")
    a, kv = Attention(config)(tuple(norm(h) for h in hs), parts, kv, layer)
    norm = RMSNorm(name="rms_norm_1")
    hs = tuple(h + norm(x) for h, x in zip(hs, a, strict=True))
    router_w = _Weight((config.emb_size, config.num_experts), name="router")()
    norm = RMSNorm(name="rms_norm_2")
    lives = () if parts[0].live is None else (tuple(part.live for part in parts),)
    moe_out = joined(lambda x, *live: MoE(config, moe_strategy)(x, router_w, experts, *live),
                     tuple(norm(h) for h in hs), *lives)
    norm = RMSNorm(name="rms_norm_3")
    hs = tuple(h + norm(m) for h, (m, _) in zip(hs, moe_out, strict=True))
    return hs, kv, tuple(routing for _, routing in moe_out)


class Transformer(hk.Module):
    """The decoder stack (module path `transformer`), scanned or unrolled (`grok.layers`)."""

    def __init__(self, config: GrokConfig, moe_strategy: str, mesh: Mesh | None,
                 layers: str = "unrolled"):
        super().__init__(name="transformer")
        self.config = config
        self.moe_strategy = moe_strategy
        self.mesh = mesh
        self.layers = check_layer_mode(layers)

    def __call__(self, hs: tuple[jax.Array, ...], parts: tuple[Part, ...],
                 cache: KVCache | None):
        """Each part's residual stream after every layer, the new keys and values ([L, B,
        K, S, C] each, or None without a cache), and each part's routing of every layer
        stacked on a layer axis: LayerRouting of [B, T, L, X] / [B, T, L]."""
        cfg, mesh = self.config, self.mesh
        kv = None if cache is None else (cache.k, cache.v)
        stacked_experts = None
        if self.layers == "scan":  # [L, E, ...], outside the scanned body: see grok.layers
            shape_in = (cfg.num_layers, cfg.num_experts, cfg.emb_size, cfg.ffn_size)
            shape_out = (cfg.num_layers, cfg.num_experts, cfg.ffn_size, cfg.emb_size)
            with hk.name_scope("moe"):
                stacked_experts = (_Weight(shape_in, name="linear")(),
                                   _Weight(shape_in, name="linear_v")(),
                                   _Weight(shape_out, name="linear_1")())

        def layer(carry, index):
            hs, kv = carry
            experts = None if stacked_experts is None else tuple(
                moe.LayerExperts(w, index) for w in stacked_experts)
            hs, kv, routing = decoder_layer(cfg, self.moe_strategy, hs, parts, kv, index,
                                            experts)
            return (tuple(constrain(h, mesh, RESIDUAL_SPEC) for h in hs), kv), routing

        if self.layers == "scan":
            stack = hk.layer_stack(cfg.num_layers, with_per_layer_inputs=True,
                                   name="decoder_layer")
            (hs, kv), routing = stack(layer)((hs, kv), jnp.arange(cfg.num_layers))
            routing = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 2), routing)
            return hs, kv, routing
        routings = []
        for i in range(cfg.num_layers):
            with hk.name_scope(f"decoder_layer_{i}"):
                (hs, kv), routing = layer((hs, kv), i)
            routings.append(routing)
        return hs, kv, jax.tree.map(lambda *xs: jnp.stack(xs, axis=2), *routings)


class InOutEmbed(hk.Module):
    """The tied embedding: rows in, transpose out."""

    def __init__(self, config: GrokConfig):
        super().__init__(name="in_out_embed")
        self.config = config

    def _table(self):
        cfg = self.config
        return hk.get_parameter("embeddings", (cfg.vocab_size, cfg.emb_size), jnp.float32,
                                init=hk.initializers.TruncatedNormal(1.0))

    def embed(self, tokens):  # [B, T] -> [B, T, D]
        return jnp.take(self._table(), tokens, axis=0).astype(ACT_DTYPE)

    def decode(self, h):  # [B, T, D] -> [B, T, V]
        return qdot("btd,vd->btv", h, self._table())


class Segment(NamedTuple):
    """One part of a step that runs several (see `LanguageModel`): tokens [B, T]
    continuing cache rows, as `LanguageModel` takes them one part at a time."""

    tokens: jax.Array  # i32[B, T]
    num_new: jax.Array | None = None  # i32[B]: real tokens per row (default: all T)
    rows: jax.Array | None = None  # i32[B]: the cache row each continues (default: row b)


class LanguageModel(hk.Module):
    """Embedding in, decoder stack, final norm, tied embedding out (`language_model`)."""

    def __init__(self, config: GrokConfig, transformer: Transformer):
        super().__init__(name="language_model")
        self.config = config
        self.transformer = transformer

    def __call__(self, tokens, cache: KVCache | None = None, num_new=None,
                 attend_len: int | Reach | None = None, with_routing: bool = False,
                 rows=None):
        """Logits [B, T, V] (bf16) for tokens [B, T], and the updated cache (or None);
        with `with_routing`, also every layer's `LayerRouting` ([B, T, L, X] / [B, T, L]).

        Without a cache the T tokens are whole sequences. With one, they continue the
        cache's first B rows (it may hold more, left untouched), each at slot
        `cache.lengths[b]`; the first `num_new[b]` of them are real (the rest right
        padding, default: all T), and the row's length advances by that many. Attention
        then reads the first `attend_len` slots (static; default all), or as many as a
        `Reach` chooses: the caller keeps it above every row's new length, and the cache
        must have room for the new tokens.
        `rows` (i32[B]) makes token row b continue cache row `rows[b]` instead: a prefill
        into chosen slots of a decode state; a row out of range (padding) writes nothing.

        `tokens` may instead be a tuple of `Segment`s (with a cache, `num_new` and `rows`
        then given per segment): parts of different shapes, such as a decode step's rows
        and a prompt's chunk, that run as one step sharing every weight read. Logits and
        routing then come back per segment; where two segments write one cache slot, the
        later one's write is kept (each segment's rows must differ from the others' but
        for rows that are not in use).
        """
        cfg = self.config
        several = isinstance(tokens, tuple)
        segments = tokens if several else (Segment(tokens, num_new, rows),)
        if several and (cache is None or num_new is not None or rows is not None):
            raise ValueError("segments continue a cache and carry their own num_new and rows")
        reach = attend_len if isinstance(attend_len, Reach) else None
        span = attend_len if reach is None else reach.lengths[-1]  # None: the whole cache
        parts, valids = [], []
        for seg in segments:
            b, t = seg.tokens.shape
            valid = seg.tokens > cfg.pad_token  # [B, T]: the release masks pad keys
            if cache is None:
                starts = None
                positions = jnp.broadcast_to(jnp.arange(t), (b, t))
                key_valid = valid  # [B, S=T]
            elif seg.rows is None:  # the tokens continue the cache's first B rows
                starts = cache.lengths[:b]
                positions = starts[:, None] + jnp.arange(t)[None, :]
                key_valid = write_rows(cache.key_valid[:b], valid, starts)  # [B, S]
            else:  # they continue rows `rows`
                starts = cache.lengths.at[seg.rows].get(mode="fill", fill_value=0)
                positions = starts[:, None] + jnp.arange(t)[None, :]
                key_valid = write_rows(
                    cache.key_valid.at[seg.rows].get(mode="fill", fill_value=False),
                    valid, starts)
            slots = jnp.arange(key_valid.shape[1] if span is None else span)
            key_mask = ((slots[None, None, :] <= positions[:, :, None])
                        & key_valid[:, None, :slots.shape[0]])  # [B, T, S]
            live = None  # every token real (one segment without num_new)
            if seg.num_new is not None or several:  # segments all say, to be joined
                real = jnp.full((b,), t) if seg.num_new is None else seg.num_new
                live = jnp.arange(t)[None, :] < real[:, None]
            parts.append(Part(positions, key_mask, starts, seg.rows, live, reach))
            valids.append(key_valid)

        embed = InOutEmbed(cfg)
        mesh = self.transformer.mesh
        # Rows come out of the table split along D like it; gather them whole, then split
        # by batch (a direct reshuffle is one XLA can only do by replicating anyway).
        hs = tuple(constrain(constrain(embed.embed(seg.tokens), mesh, REPLICATED_SPEC)
                             * cfg.embedding_multiplier_scale, mesh, RESIDUAL_SPEC)
                   for seg in segments)  # [B, T, D] each
        hs, kv, routing = self.transformer(hs, tuple(parts), cache)
        norm = RMSNorm(name="rms_norm")
        logits = tuple(out * cfg.output_multiplier_scale  # [B, T, V]
                       for out in joined(embed.decode, tuple(norm(h) for h in hs)))

        new_cache = None
        if cache is not None:
            lengths, key_valid = cache.lengths, cache.key_valid
            for seg, valid in zip(segments, valids, strict=True):
                b, t = seg.tokens.shape
                added = jnp.full((b,), t, jnp.int32) if seg.num_new is None else seg.num_new
                index = slice(None, b) if seg.rows is None else seg.rows
                lengths = lengths.at[index].add(added, mode="drop")
                key_valid = key_valid.at[index].set(valid, mode="drop")
            new_cache = KVCache(*kv, lengths, key_valid)
        if not several:
            logits, routing = logits[0], routing[0]
        return (logits, new_cache, routing) if with_routing else (logits, new_cache)


def build(config: GrokConfig, moe_strategy: str = "sparse", mesh: Mesh | None = None,
          layers: str = "unrolled") -> hk.Transformed:
    """The transformed model: `apply(params, tokens, cache=None, num_new=None,
    attend_len=None, with_routing=False, rows=None)` (see `LanguageModel`; `tokens` may be
    a tuple of `Segment`s), for parameters of the `layers` tree (`grok.layers`).

    With a mesh, activations are pinned to batch-over-`data` placements.
    """
    def forward(tokens, cache=None, num_new=None, attend_len=None, with_routing=False,
                rows=None):
        transformer = Transformer(config, moe_strategy, mesh, layers)
        return LanguageModel(config, transformer)(tokens, cache, num_new, attend_len,
                                                  with_routing, rows)
    return hk.without_apply_rng(hk.transform(forward))


def init_params(config: GrokConfig, rng, layers: str = "unrolled") -> dict:
    """Random float32 parameters (for tests and new checkpoints); `unrolled` is the
    release's tree."""
    return build(config, layers=layers).init(rng, jnp.zeros((1, 1), jnp.int32))


def abstract_params(config: GrokConfig, quantized: bool = True,
                    layers: str = "unrolled") -> dict:
    """The parameter tree as `jax.ShapeDtypeStruct`s, never allocated.

    With `quantized`, the tensors the release stores in 8 bits are `QuantizedWeight8bit`s
    of int8 weights and bf16 scales with the release's grouping.
    """
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0), layers))
    if not quantized:
        return shapes

    def store(path, sds):
        groups = release_groups(path, sds.shape)
        if groups is None:
            return sds
        *lead, _, n = sds.shape
        return QuantizedWeight8bit(jax.ShapeDtypeStruct(sds.shape, jnp.int8),
                                   jax.ShapeDtypeStruct((*lead, groups, n), jnp.bfloat16))
    return map_params(store, shapes)
