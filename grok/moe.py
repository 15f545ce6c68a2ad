"""Expert computation: run each token through its chosen experts and combine by gate.

Shape letters as in `grok.model`: N tokens, D model width, F expert width, E experts,
X experts chosen per token, M rows of a tile. Expert e computes
`(gelu(x @ w_gelu[e]) * (x @ w_up[e])) @ w_down[e]` in bf16, and a token's output is the
sum over its chosen experts of `gate.astype(bf16) * expert_out`, as the release combines
them.

Three ways to get there, equal up to bf16 rounding order:
- `dense`: every expert on every token, the release's formulation (E/X times the work);
  kept as the oracle the others are tested against.
- `per_expert`: for a few tokens (decoding), each expert that some token chose runs once on
  all N rows, and the others are skipped, so only the chosen experts' weights are read. Its
  program holds E expert bodies whatever N is, so compile time does not grow with the batch.
- `grouped`: for many tokens (prefill), copies are sorted by expert into tiles of M rows
  that each belong to one expert, and each tile runs against its expert's weights alone;
  no all-experts tensor is ever formed. Tiles past the last used one are skipped.
`sparse` picks between the last two by token count (a static shape, so per compiled step).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from grok.errors import GrokError
from grok.quant import ExpertWeights, qdot


def combine(expert_out, gates):
    """expert_out [N, X, D] (bf16), gates [N, X] (f32) -> [N, D]: the gated sum, in bf16."""
    gates = gates.astype(expert_out.dtype)
    out = gates[:, 0, None] * expert_out[:, 0]
    for j in range(1, expert_out.shape[1]):
        out = out + gates[:, j, None] * expert_out[:, j]
    return out


def _ffn(x, w_gelu, w_up, w_down):
    """One expert on rows x [M, D] -> [M, D]."""
    h = jax.nn.gelu(qdot("md,df->mf", x, w_gelu)) * qdot("md,df->mf", x, w_up)
    return qdot("mf,fd->md", h, w_down)


class LayerExperts(NamedTuple):
    """One layer's experts inside a scan over layers: the weight of every layer [L, E, ...]
    (an array, 8-bit weight or `ExpertWeights` with axis 1) and the traced layer index.
    An expert is read straight from the stack at (layer, expert): the layer's other
    experts are never sliced out, let alone copied."""

    stack: Any
    layer: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.stack.shape[1:])


def num_experts(w) -> int:
    return w.shape[0]


def _layer_slice(a, layer, e):
    """a[layer, e] of a stacked [L, E, ...] array as one dynamic slice."""
    starts = (layer, e, *(0,) * (a.ndim - 2))
    return jax.lax.dynamic_slice(a, starts, (1, 1, *a.shape[2:]))[0, 0]


def _expert(w, e):
    """Expert e's weight (e static) from a stacked [E, ...] weight, `ExpertWeights`, or
    one layer of a stack (`LayerExperts`)."""
    if isinstance(w, LayerExperts):
        if isinstance(w.stack, ExpertWeights):
            return jax.tree.map(
                lambda a: jax.lax.dynamic_index_in_dim(a, w.layer, keepdims=False),
                w.stack.experts[e])
        return jax.tree.map(lambda a: _layer_slice(a, w.layer, e), w.stack)
    if isinstance(w, ExpertWeights):
        return w.experts[e]
    return jax.tree.map(lambda a: a[e], w)


def _indexed(w, e):
    """Expert e's slice of a stacked weight, e traced; reads nothing of the others."""
    if isinstance(w, LayerExperts):
        return jax.tree.map(lambda a: _layer_slice(a, w.layer, e), w.stack)
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, e, keepdims=False), w)


def _split(w) -> bool:
    """Whether experts are separate buffers (`ExpertWeights`), picked by a switch."""
    return isinstance(w.stack if isinstance(w, LayerExperts) else w, ExpertWeights)


def expert_ffn(e, x, w_gelu, w_up, w_down):
    """Expert e (a traced index) on rows x [M, D], reading only that expert's weights:
    a switch over separately stored experts, or a dynamic slice of stacked ones."""
    if _split(w_gelu):
        branches = [lambda rows, i=i: _ffn(rows, _expert(w_gelu, i), _expert(w_up, i),
                                           _expert(w_down, i))
                    for i in range(num_experts(w_gelu))]
        return jax.lax.switch(e, branches, x)
    return _ffn(x, _indexed(w_gelu, e), _indexed(w_up, e), _indexed(w_down, e))


def dense(x, gates, chosen, w_gelu, w_up, w_down, live=None):
    """x [N, D]; gates, chosen [N, X]; w_gelu, w_up [E, D, F]; w_down [E, F, D]. Every
    token through every expert, `live` or not (the release's way, kept as the oracle)."""
    out = jnp.stack([_ffn(x, _expert(w_gelu, e), _expert(w_up, e), _expert(w_down, e))
                     for e in range(num_experts(w_gelu))], axis=1)  # [N, E, D]
    picked = jnp.take_along_axis(out, chosen[:, :, None], axis=1)  # [N, X, D]
    return combine(picked, gates)


def per_expert(x, gates, chosen, w_gelu, w_up, w_down, live=None):
    """Every expert some token chose, once, on all N rows; a `cond` skips the rest.

    With few rows an expert costs the reading of its weights, whatever N, so this reads
    each chosen expert once (an earlier per-copy form read an expert once per copy that
    chose it, and unrolled copies x E switch branches, so compile time grew with the
    batch). The rows an expert computes are those `dense` computes, so the two agree.
    """
    n, num_chosen = chosen.shape
    picked = jnp.zeros((n, num_chosen, x.shape[1]), x.dtype)  # [N, X, D]
    for e in range(num_experts(w_gelu)):
        hit = chosen == e  # [N, X]
        if live is not None:
            hit = hit & live[:, None]
        out = jax.lax.cond(
            jnp.any(hit),
            lambda e=e: _ffn(x, _expert(w_gelu, e), _expert(w_up, e), _expert(w_down, e)),
            lambda: jnp.zeros_like(x))
        picked = jnp.where(hit[:, :, None], out[:, None, :], picked)
    return combine(picked, gates)


def grouped(x, gates, chosen, w_gelu, w_up, w_down, tile: int, live=None):
    """Copies sorted by expert into tiles of `tile` rows, one expert per tile; the copies
    of tokens that are not `live` form a last group whose tiles never run."""
    n, d = x.shape
    num_chosen = chosen.shape[1]
    experts = num_experts(w_gelu)
    groups = experts + 1
    copies = n * num_chosen
    expert_of_copy = chosen.reshape(-1)  # [N*X]
    if live is not None:
        expert_of_copy = jnp.where(jnp.repeat(live, num_chosen), expert_of_copy, experts)
    order = jnp.argsort(expert_of_copy, stable=True)  # copies grouped by expert
    sorted_expert = expert_of_copy[order]

    # Each group is padded to whole tiles; `slot` is a sorted copy's row there.
    counts = jnp.bincount(expert_of_copy, length=groups)  # [E + 1]
    tiles_per_expert = -(-counts // tile)
    tile_end = jnp.cumsum(tiles_per_expert)  # [E]: first tile after expert e's
    first_tile = tile_end - tiles_per_expert
    rank = jnp.arange(copies) - (jnp.cumsum(counts) - counts)[sorted_expert]
    slot = first_tile[sorted_expert] * tile + rank  # [N*X]

    # Enough tiles for any routing: full tiles plus one partial tile per group.
    num_tiles = -(-copies // tile) + groups
    source = jnp.full((num_tiles * tile,), n).at[slot].set(order // num_chosen)
    rows = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[source]  # row n: padding
    tile_expert = jnp.minimum(
        jnp.searchsorted(tile_end, jnp.arange(num_tiles), side="right"), experts - 1)
    used = jnp.arange(num_tiles) < tile_end[experts - 1]  # the last group's never run

    def run_tile(args):
        xt, e, runs = args
        return jax.lax.cond(runs, lambda: expert_ffn(e, xt, w_gelu, w_up, w_down),
                            lambda: jnp.zeros_like(xt))

    out = jax.lax.map(run_tile, (rows.reshape(num_tiles, tile, d), tile_expert, used))
    per_copy_out = jnp.zeros((copies, d), x.dtype).at[order].set(
        out.reshape(-1, d)[slot])  # back to copy order
    return combine(per_copy_out.reshape(n, num_chosen, d), gates)


def sparse(x, gates, chosen, w_gelu, w_up, w_down, live=None):
    """Only the chosen experts' work: per expert on all rows while there are no more copies
    than experts (each expert read at most once either way), tiles by expert beyond that.
    `live` (bool[N]; None: all) marks the tokens whose output is used: the others (a
    step's padding) run through no expert, and their output is zero."""
    copies = chosen.size
    if copies <= num_experts(w_gelu):
        return per_expert(x, gates, chosen, w_gelu, w_up, w_down, live)
    # Aim for about one tile per expert group, within [8, 128] rows.
    tile = int(min(128, max(8, 1 << (-(-copies // num_experts(w_gelu)) - 1).bit_length())))
    return grouped(x, gates, chosen, w_gelu, w_up, w_down, tile=tile, live=live)


STRATEGIES = {"dense": dense, "sparse": sparse}


def dispatch(strategy: str, x, gates, chosen, w_gelu, w_up, w_down, live=None):
    if strategy not in STRATEGIES:
        raise GrokError(f"unknown MoE strategy {strategy!r}; expected one of {list(STRATEGIES)}")
    return STRATEGIES[strategy](x, gates, chosen, w_gelu, w_up, w_down, live)
