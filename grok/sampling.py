"""Token sampling: the release's temperature and nucleus rules, plus top-k and greedy rows.

Settings are per-row arrays, so one compiled step serves any mix of requests, and each row
draws with its own key, so a request's output does not depend on what shares its batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from grok.errors import GrokError

# Logit given to filtered-out tokens, as in the release: exp(-1e10 - max) is exactly 0.
NEG = -1e10
# How many most-likely alternatives each step reports, as the release's TOP_K.
TOP_ALTERNATIVES = 8


class SamplingParams(NamedTuple):
    """Per-row settings: temperature f32[B] (0 = greedy), top_p f32[B] in (0, 1],
    top_k i32[B] (0 = off)."""

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array


class Controls(NamedTuple):
    """Per-row steering, as OpenAI's and vLLM's APIs define it: `logit_bias` is added to
    the logits, then repeated tokens are penalised (vLLM's order), and stop tokens are
    barred until `min_tokens` are generated. Neutral values (bias 0, penalties 0, 0 and 1)
    leave a row's logits bit for bit unchanged, so a row without controls draws the same
    whatever shares its batch."""

    on: jax.Array  # bool[B]: the row sets a bias or penalty (none: the step skips the work)
    bias: jax.Array  # f32[B, V]: added to the logits, in [-100, 100]
    seen: jax.Array  # bool[B, V]: tokens of the prompt (for the repetition penalty)
    presence: jax.Array  # f32[B]: subtracted once from every generated token's logit
    frequency: jax.Array  # f32[B]: subtracted per occurrence of a generated token
    repetition: jax.Array  # f32[B]: prompt and generated tokens: positive logits / r, others x r
    stop_tokens: jax.Array  # bool[B, V]: EOS (unless ignored) and the stop token ids
    min_tokens: jax.Array  # i32[B]: stop tokens are barred until this many are generated


def apply_controls(logits, controls: Controls, counts) -> jax.Array:
    """logits f32[B, V] after each row's bias and penalties; counts i32[B, V] how often
    each token was generated so far."""
    def adjust(logits):
        c = controls
        x = logits + c.bias
        repeated = c.seen | (counts > 0)
        r = c.repetition[:, None]
        x = jnp.where(repeated, jnp.where(x > 0, x / r, x * r), x)
        n = counts.astype(jnp.float32)
        return (x - c.frequency[:, None] * n
                - c.presence[:, None] * (counts > 0).astype(jnp.float32))
    return jax.lax.cond(jnp.any(controls.on), adjust, lambda x: x, logits)


def bar_stop_tokens(allowed, controls: Controls, generated) -> jax.Array:
    """allowed bool[B, V] less each row's stop tokens while it has generated (i32[B])
    fewer than its min_tokens."""
    return allowed & ~(controls.stop_tokens & (generated < controls.min_tokens)[:, None])


def count_tokens(counts, tokens, add) -> jax.Array:
    """counts i32[B, V] with each row's token (i32[B]) counted `add` (i32[B]) more."""
    return counts.at[jnp.arange(counts.shape[0]), tokens].add(add)


def mask_words(vocab_size: int) -> int:
    """int32 words of one row's packed token mask (see `unpack_token_mask`)."""
    return (vocab_size + 31) // 32


def unpack_token_mask(words, vocab: int) -> jax.Array:
    """bool[B, V] from packed int32 words [B, ceil(V / 32)], bit j of word i allowing
    token 32 i + j (xgrammar's layout): shifts and masks, no float copy of the mask."""
    shifts = jnp.arange(32, dtype=jnp.int32)
    bits = (words[:, :, None] >> shifts) & 1  # arithmetic shift: the sign bit is bit 31
    return bits.reshape(words.shape[0], -1)[:, :vocab].astype(bool)


def target_logits(logits, targets) -> tuple[jax.Array, jax.Array]:
    """For logits [..., V] and token ids `targets` [...] (-1 reads token 0): each target's
    logit [..., 1], as the logits' dtype, and the float32 log-normalizer [...]; their
    difference is the target's log-probability. Reductions over the logits as they are,
    so no float32 copy of all of them is made (2 GiB per 4096 positions of Grok-1's
    vocabulary)."""
    normalizer = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)
    return chosen, normalizer


class Sample(NamedTuple):
    """One step's draw. Log-probabilities are of the raw logits (temperature 1, before any
    control, filter or mask), so they describe the model, not the sampler settings."""

    tokens: jax.Array  # i32[B]
    logprobs: jax.Array  # f32[B], of the chosen token
    top_ids: jax.Array  # i32[B, min(8, V)], most likely first
    top_logprobs: jax.Array  # f32[B, min(8, V)]


def _first_violation(name: str, values, ok: np.ndarray, allowed: str) -> None:
    if not ok.all():
        bad = np.asarray(values).reshape(-1)[np.flatnonzero(~ok.reshape(-1))[0]]
        raise GrokError(f"{name} must be {allowed}, got {bad.item()!r}")


def check_settings(temperature, top_p, top_k) -> None:
    """Validates user settings (scalars or per-row arrays) before they reach a jitted step,
    where a bad value would silently give garbage."""
    t, p, k = (np.asarray(v) for v in (temperature, top_p, top_k))
    for name, v, kinds in (("temperature", t, "iuf"), ("top_p", p, "iuf"), ("top_k", k, "iu")):
        if v.dtype.kind not in kinds:
            what = "an integer" if kinds == "iu" else "a number"
            raise GrokError(f"{name} must be {what}, got {v.tolist()!r}")
    _first_violation("temperature", t, np.isfinite(t) & (t >= 0),
                     "a finite number >= 0 (0 = greedy)")
    _first_violation("top_p", p, (p > 0) & (p <= 1), "in (0, 1]")
    # The upper bound is int32's: top_k travels as i32; any k >= vocab keeps every token.
    _first_violation("top_k", k, (k >= 0) & (k < 2**31), "an integer in [0, 2**31) (0 = off)")


def _check_shapes(logits, keys, params: SamplingParams, allowed) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {logits.shape}")
    batch = logits.shape[0]
    if not jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key) or keys.shape != (batch,):
        raise ValueError(f"keys must be a typed PRNG key array of shape ({batch},), got "
                         f"{keys.dtype}{list(keys.shape)}")
    for name, v in zip(SamplingParams._fields, params, strict=True):
        if jnp.shape(v) != (batch,):
            raise ValueError(f"params.{name} must have shape ({batch},), got {jnp.shape(v)}")
    if allowed is not None and allowed.shape != logits.shape:
        raise ValueError(f"allowed must have the logits' shape {logits.shape}, got "
                         f"{allowed.shape}")


def filter_logits(logits, params: SamplingParams, allowed=None) -> jax.Array:
    """The logits each sampled row draws from: scaled by 1/temperature, disallowed tokens and
    those outside top-k and top-p at NEG. Rows with temperature 0 are filtered at
    temperature 1 (`sample` takes their argmax, which every filter keeps).

    Guards the release lacks, none of which moves a token in or out for ordinary settings:
    logits are shifted by the row's largest allowed logit before dividing, so a tiny
    temperature cannot overflow to inf (softmax and the filters are shift-invariant);
    scaled logits are floored at NEG, so removing tokens keeps the sorted row sorted; and
    if rounding keeps every cumulative sum below 1 - top_p (top_p under ~1e-7, where
    1 - top_p rounds to 1), the threshold is the largest logit; the release keeps all.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    if allowed is None:
        allowed = jnp.ones(logits.shape, bool)
    temperature = jnp.asarray(params.temperature, jnp.float32)[:, None]
    temperature = jnp.where(temperature > 0, temperature, 1.0)
    shift = jnp.max(jnp.where(allowed, logits, NEG), axis=-1, keepdims=True)
    scaled = jnp.maximum((logits - shift) / temperature, NEG)
    scaled = jnp.where(allowed, scaled, NEG)
    k = jnp.asarray(params.top_k, jnp.int32)[:, None]
    k = jnp.where((k <= 0) | (k > vocab), vocab, k)
    top_p = jnp.asarray(params.top_p, jnp.float32)[:, None]
    # Sorting the vocabulary is most of the sampler's cost; with top-k off and top_p = 1
    # every token is kept, so the sort is skipped unless some row filters.
    return jax.lax.cond(jnp.any((k < vocab) | (top_p < 1)), _top_k_top_p,
                        lambda scaled, *_: scaled, scaled, k, top_p)


def _top_k_top_p(scaled, k, top_p):
    vocab = scaled.shape[-1]
    ascending = jnp.sort(scaled, axis=-1)
    # Top-k: keep logits >= the k-th largest (ties kept).
    kth = jnp.take_along_axis(ascending, vocab - k, axis=-1)
    scaled = jnp.where(scaled >= kth, scaled, NEG)
    # Everything is >= NEG, so removing the tokens below kth keeps `ascending` sorted.
    ascending = jnp.where(ascending >= kth, ascending, NEG)

    # Top-p, as the release: first ascending position where the cumulative probability
    # reaches 1 - top_p; keep every logit >= the logit there.
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    position = jnp.min(jnp.where(cumulative >= 1 - top_p, jnp.arange(vocab), vocab - 1),
                       axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ascending, position, axis=-1)
    return jnp.where(scaled >= threshold, scaled, NEG)


def sample(logits, keys, params: SamplingParams, allowed=None,
           controls: Controls | None = None, counts=None) -> Sample:
    """Draws one token per row: logits f32[B, V]; keys a typed PRNG key array [B], one per
    row; allowed an optional bool[B, V] mask of tokens that may be drawn at all; controls
    the rows' bias and penalties over counts i32[B, V] of their generated tokens (greedy
    rows take the argmax after them, as vLLM's)."""
    _check_shapes(logits, keys, params, allowed)
    logits = logits.astype(jnp.float32)
    steered = logits if controls is None else apply_controls(logits, controls, counts)
    greedy = jnp.asarray(params.temperature) == 0
    drawn = jax.lax.cond(  # an all-greedy batch draws nothing
        jnp.all(greedy), lambda: jnp.zeros(logits.shape[:1], jnp.int32),
        lambda: jax.vmap(jax.random.categorical)(
            keys, filter_logits(steered, params, allowed)).astype(jnp.int32))
    masked = steered if allowed is None else jnp.where(allowed, steered, NEG)
    tokens = jnp.where(greedy, jnp.argmax(masked, axis=-1), drawn).astype(jnp.int32)

    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_logprobs, top_ids = jax.lax.top_k(logprobs, min(TOP_ALTERNATIVES, logits.shape[-1]))
    return Sample(tokens, chosen, top_ids.astype(jnp.int32), top_logprobs)
