"""Log-likelihoods of given text: what evaluation harnesses ask of a base model.

EleutherAI's lm-evaluation-harness scores multiple-choice and perplexity tasks with two
calls, which `Grok.score` and `Grok.score_rolling` answer with its rules, so that the
numbers it gets from this library and from the server's `echo` agree:

- `loglikelihood(context, continuation)`: the continuation's log-probability given the
  context and whether greedy decoding would have produced it. Text pairs are encoded as
  lm_eval's `_encode_pair` does (the context's trailing spaces move to the continuation,
  and the continuation is what encoding the whole adds to the context's tokens), and a
  pair longer than the context window keeps its last tokens.
- `loglikelihood_rolling(text)`: every token's log-probability, in disjoint windows of
  `sequence_len` tokens, each scored given the token before it (the first: a prefix
  token, BOS) and its own earlier tokens (lm_eval's rolling windows of context 1).

Pairs run in batches of a few bucketed shapes on the mesh; the logits never leave the
devices (each position returns its target's log-probability and whether it was the
argmax).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grok.config import GrokConfig
from grok.engine.engine import MIN_BUCKET, bucket
from grok.errors import GrokError
from grok.sampling import target_logits
from grok.tokenizer import Tokenizer

# Tokens (rows x length) of one scoring batch at most: its logits stay within 4 GiB at
# Grok-1's vocabulary (bf16), and a full-context row still fits.
BATCH_TOKENS = 8192


@dataclasses.dataclass(frozen=True)
class Score:
    """The log-likelihood of one continuation (or text)."""

    tokens: list[int]  # the scored tokens
    logprobs: list[float]  # each token's log-probability given everything before it
    greedy: bool  # every token was the most likely one there (greedy decoding's choice)

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str
                ) -> tuple[list[int], list[int]]:
    """lm_eval's rule: the context's trailing spaces join the continuation; the
    continuation's tokens are what encoding both adds after the context's own."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def rolling_windows(ids: Sequence[int], prefix_token: int, window: int
                    ) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that score every token of `ids` once, in runs of
    `window`: each given the token before the run (the first: `prefix_token`) and the
    run's own earlier tokens (lm_eval's `get_rolling_token_windows` with context 1, made
    disjoint)."""
    ids = list(ids)
    first = min(window, len(ids))
    pairs = [([prefix_token], ids[:first])]
    done = first
    while done < len(ids):
        end = min(len(ids), done + window)
        # The window's inputs end before its last token; the context is what precedes
        # the predicted run within them: the token before the run, if the run is full.
        inputs = ids[end - window - 1:end - 1]
        predicted = ids[done:end]
        pairs.append((inputs[:len(inputs) - len(predicted) + 1], predicted))
        done = end
    return pairs


class Scorer:
    """Batched scoring of (context ids, continuation ids) pairs on one model's mesh."""

    def __init__(self, config: GrokConfig, apply: Callable, place: Callable,
                 fetch: Callable, padded_batch: Callable[[int], int]):
        """`apply(params, tokens)` gives the model's logits; `place` puts host tokens
        [B, T] on the mesh (B as `padded_batch` pads it); `fetch` brings a result back."""
        self.config = config
        self._apply, self._place, self._fetch = apply, place, fetch
        self._padded_batch = padded_batch
        self._step = jax.jit(self._score_fn)

    def _score_fn(self, params, tokens, targets):
        """tokens, targets i32[B, T] (targets -1: not scored) -> each position's target
        log-probability f32[B, T] (0 where not scored) and whether it was the argmax
        bool[B, T] (True where not scored)."""
        logits = self._apply(params, tokens)
        target, normalizer = target_logits(logits, targets)
        scored = targets >= 0
        best = jnp.argmax(logits, axis=-1) == targets
        return (jnp.where(scored, target[..., 0].astype(jnp.float32) - normalizer, 0.0),
                best | ~scored)

    def score(self, params, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
              ) -> list[Score]:
        window = self.config.sequence_len
        rows = []
        for i, (context, continuation) in enumerate(pairs):
            if not continuation:
                raise GrokError(f"continuation {i} is empty: nothing to score")
            if not context:
                raise GrokError(f"context {i} is empty: the first token needs one before "
                                f"it (lm_eval passes a prefix token such as BOS)")
            if len(continuation) > window:
                raise GrokError(f"continuation {i} has {len(continuation)} tokens, more "
                                f"than sequence_len={window} (score_rolling windows a "
                                f"long text)")
            whole = list(context) + list(continuation)
            bad = [t for t in whole if not 0 <= t < self.config.vocab_size]
            if bad:
                raise GrokError(f"pair {i}: token id {bad[0]} is outside [0, vocab_size="
                                f"{self.config.vocab_size})")
            inputs = whole[:-1][-window:]  # a pair past the window keeps its last tokens
            targets = whole[1:][-window:]
            rows.append((inputs, targets, len(continuation)))
        out: list[Score | None] = [None] * len(rows)
        # Longest first, so each batch's rows share a length bucket where they can.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        start = 0
        while start < len(order):
            length = bucket(len(rows[order[start]][0]), cap=window, minimum=MIN_BUCKET)
            batch = max(1, min(len(order) - start, BATCH_TOKENS // length))
            members = order[start:start + batch]
            start += len(members)
            for i, score in zip(members, self._run(params, [rows[i] for i in members],
                                                   length), strict=True):
                out[i] = score
        return out

    def _run(self, params, rows, length: int) -> list[Score]:
        batch = self._padded_batch(bucket(len(rows), cap=1 << 30, minimum=1))
        tokens = np.full((batch, length), self.config.pad_token, np.int32)
        targets = np.full((batch, length), -1, np.int32)
        for b, (inputs, row_targets, n) in enumerate(rows):
            tokens[b, :len(inputs)] = inputs
            last = len(row_targets)
            targets[b, last - n:last] = row_targets[last - n:]
        logprobs, best = self._step(params, self._place(tokens), self._place(targets))
        logprobs, best = self._fetch(logprobs), self._fetch(best)
        scores = []
        for b, (_, row_targets, n) in enumerate(rows):
            last = len(row_targets)
            scored = slice(last - n, last)
            scores.append(Score(list(row_targets[scored]),
                                [float(x) for x in logprobs[b, scored]],
                                bool(best[b, scored].all())))
        return scores


def join(scores: Sequence[Score]) -> Score:
    """One score of consecutive parts (a rolling text's windows)."""
    return Score([t for s in scores for t in s.tokens], [x for s in scores for x in s.logprobs],
                 all(s.greedy for s in scores))
