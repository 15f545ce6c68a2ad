"""Expert routing made visible: per-token traces, per-layer tallies and usage statistics.

Every compiled prefill and decode step also returns a `Tally` of the routing it did, over
real tokens only (not the padding of a bucket, rows added for the mesh, free slots or
finished rows): a few kilobytes that ride along with the step's draws to the host, where
`UsageCounter` adds them up in int64. `Grok.expert_usage()` reads that as `ExpertUsage`.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from grok.errors import GrokError
from grok.model import LayerRouting

PHASES = ("prefill", "decode")


class Routing(NamedTuple):
    """Which experts each token chose in each layer (`Grok.routing`)."""

    experts: np.ndarray  # i32[B, T, L, X]: most probable first; -1 at pad tokens
    gates: np.ndarray  # f32[B, T, L, X]: their gate weights as the forward pass used them


class Tally(NamedTuple):
    """One step's routing summed over its real tokens."""

    counts: jax.Array  # i32[L, E]: tokens that chose expert e among their top X
    gate_mass: jax.Array  # f32[L, E]: their summed gate weights
    entropy: jax.Array  # f32[L]: summed router entropy (nats)
    tokens: jax.Array  # i32[]: real tokens


def tally(routing: LayerRouting,  # [B, T, L, X] / [B, T, L]
          real: jax.Array,  # bool[B, T]: tokens that count
          num_experts: int) -> Tally:
    """Sums the routing of the real tokens (one fused pass per output; no [.., E] array is
    formed in memory)."""
    mask = real[:, :, None, None]  # [B, T, 1, 1]
    hits = (routing.experts[..., None] == jnp.arange(num_experts)) & mask[..., None]
    counts = jnp.sum(hits, axis=(0, 1, 3), dtype=jnp.int32)  # [L, E]
    gate_mass = jnp.sum(jnp.where(hits, routing.gates[..., None], 0.0), axis=(0, 1, 3))
    entropy = jnp.sum(jnp.where(real[:, :, None], routing.entropy, 0.0), axis=(0, 1))
    return Tally(counts, gate_mass, entropy, jnp.sum(real, dtype=jnp.int32))


@dataclasses.dataclass(frozen=True)
class ExpertUsage:
    """Routing tallies of every prefill and decode step since load or the last reset.

    `prefill` and `decode` count, per layer and expert, the tokens that chose the expert
    among their top X (so each layer's row sums to X times the tokens). Gate mass is the
    summed gate weight; entropy the mean router entropy per token, in nats (log E at most).
    """

    prefill: np.ndarray  # int64[L, E]
    decode: np.ndarray  # int64[L, E]
    prefill_gate_mass: np.ndarray  # float64[L, E]
    decode_gate_mass: np.ndarray  # float64[L, E]
    prefill_entropy: np.ndarray  # float64[L]: mean per token
    decode_entropy: np.ndarray  # float64[L]
    prefill_tokens: int
    decode_tokens: int

    def counts(self, phase: str = "all") -> np.ndarray:
        """int64[L, E] for "prefill", "decode" or "all" (both)."""
        if phase == "all":
            return self.prefill + self.decode
        if phase not in PHASES:
            raise GrokError(f"phase must be one of {(*PHASES, 'all')}, got {phase!r}")
        return getattr(self, phase)

    def share(self, phase: str = "all") -> np.ndarray:
        """float64[L, E]: each expert's share of its layer's routed tokens (0 if none)."""
        counts = self.counts(phase).astype(np.float64)
        total = counts.sum(axis=-1, keepdims=True)
        return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)

    def imbalance(self, phase: str = "all") -> np.ndarray:
        """float64[L]: the busiest expert's share over the mean share (1 = perfectly even,
        E = one expert takes everything; 0 where the layer saw no tokens)."""
        share = self.share(phase)
        return share.max(axis=-1) * share.shape[-1]

    def to_json(self) -> dict:
        out = {"num_layers": int(self.prefill.shape[0]),
               "num_experts": int(self.prefill.shape[1])}
        for phase in PHASES:
            out[phase] = {
                "tokens": getattr(self, f"{phase}_tokens"),
                "counts": self.counts(phase).tolist(),
                "gate_mass": getattr(self, f"{phase}_gate_mass").tolist(),
                "mean_entropy": getattr(self, f"{phase}_entropy").tolist(),
                "share": self.share(phase).tolist(),
                "imbalance": self.imbalance(phase).tolist(),
            }
        return out


class UsageCounter:
    """Adds step tallies up on the host in 64 bits; safe to read from another thread (a
    metrics endpoint) while the device thread adds."""

    def __init__(self, num_layers: int, num_experts: int):
        self._shape = (num_layers, num_experts)
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._counts = {p: np.zeros(self._shape, np.int64) for p in PHASES}
            self._gates = {p: np.zeros(self._shape, np.float64) for p in PHASES}
            self._entropy = {p: np.zeros(self._shape[0], np.float64) for p in PHASES}
            self._tokens = dict.fromkeys(PHASES, 0)

    def add(self, phase: str, step: Tally) -> None:
        """Adds one step's tally (host arrays)."""
        with self._lock:
            self._counts[phase] += np.asarray(step.counts, np.int64)
            self._gates[phase] += np.asarray(step.gate_mass, np.float64)
            self._entropy[phase] += np.asarray(step.entropy, np.float64)
            self._tokens[phase] += int(step.tokens)

    def snapshot(self) -> ExpertUsage:
        with self._lock:
            fields = {}
            for p in PHASES:
                n = self._tokens[p]
                fields[p] = self._counts[p].copy()
                fields[f"{p}_gate_mass"] = self._gates[p].copy()
                fields[f"{p}_entropy"] = self._entropy[p] / n if n else self._entropy[p] * 0
                fields[f"{p}_tokens"] = n
            return ExpertUsage(**fields)
