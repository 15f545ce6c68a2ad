"""Expert computation: run each token through its chosen experts and combine by gate.

Shape letters as in `grok.model`: N tokens, D model width, F expert width, E experts,
X experts chosen per token. Expert e computes `(gelu(x @ w_gelu[e]) * (x @ w_up[e])) @
w_down[e]` in bf16, and a token's output is the sum over its chosen experts of
`gate.astype(bf16) * expert_out`, as the release combines them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from grok.quant import qdot


def combine(expert_out, gates):
    """expert_out [N, X, D] (bf16), gates [N, X] (f32) -> [N, D]: the gated sum, in bf16."""
    gates = gates.astype(expert_out.dtype)
    out = gates[:, 0, None] * expert_out[:, 0]
    for j in range(1, expert_out.shape[1]):
        out = out + gates[:, j, None] * expert_out[:, j]
    return out


def dense(x, gates, chosen, w_gelu, w_up, w_down):
    """Every expert on every token, then keep the chosen ones: the release's formulation.

    Costs E/X times the useful work; kept as the oracle the faster paths are tested against.
    x [N, D]; gates, chosen [N, X]; w_gelu, w_up [E, D, F]; w_down [E, F, D].
    """
    h = jax.nn.gelu(qdot("nd,edf->enf", x, w_gelu)) * qdot("nd,edf->enf", x, w_up)
    out = qdot("enf,efd->ned", h, w_down)  # [N, E, D]
    picked = jnp.take_along_axis(out, chosen[:, :, None], axis=1)  # [N, X, D]
    return combine(picked, gates)


STRATEGIES = {"dense": dense}


def dispatch(strategy: str, x, gates, chosen, w_gelu, w_up, w_down):
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown MoE strategy {strategy!r}; expected one of {list(STRATEGIES)}")
    return STRATEGIES[strategy](x, gates, chosen, w_gelu, w_up, w_down)
