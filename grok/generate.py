"""The generation loop: bucketed prefill into a KV cache, then one jitted step per token.

Shapes are bucketed (batch and prompt length to powers of two, the cache to the length the
request needs, rounded likewise), so new prompts of a seen bucket reuse compiled steps.
Steps are compiled ahead of time and kept per shape key: `compile_count` and
`compile_seconds` say exactly what was compiled. Each decode step donates the cache (updated
in place) and returns only the sampled tokens and their log-probabilities to the host,
replicated, so that every process of a multi-process run reads them and takes the same
decisions.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from grok import sharding
from grok.config import GrokConfig
from grok.kv_cache import init_cache
from grok.sampling import Sample, SamplingParams, check_settings, sample
from grok.tokenizer import Tokenizer, default_allowed

MIN_BUCKET = 16  # smallest prompt-length bucket


def bucket(n: int, cap: int, minimum: int = MIN_BUCKET) -> int:
    """`n` rounded up to a power of two (at least `minimum`), at most `cap`."""
    return min(cap, max(minimum, 1 << max(n - 1, 0).bit_length()))


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """How to sample. Defaults are the release's, except that EOS ends a row."""

    max_new_tokens: int = 100
    temperature: float = 0.01  # 0 is greedy
    top_p: float = 1.0  # nucleus filter, as the release
    top_k: int = 0  # 0 is off
    seed: int | Sequence[int] = 42  # one for all prompts, or one per prompt
    stop: str | Sequence[str] | None = None
    allowed_tokens: Sequence[int] | None = None  # None: all but pad and control pieces


@dataclasses.dataclass(frozen=True)
class Request:
    """Prompts and settings, checked against the model before any work is done."""

    prompts: list[str | None]  # the text, where a prompt was given as text
    prompt_ids: list[list[int]]
    settings: GenerationSettings
    seeds: list[int]
    stops: list[str]
    allowed: np.ndarray  # [V] bool


def make_request(config: GrokConfig, tokenizer: Tokenizer | None,
                 prompts: Sequence[str | Sequence[int]],
                 settings: GenerationSettings) -> Request:
    """Validates everything a user can get wrong; each error names the value and the range."""
    s = settings
    check_settings(s.temperature, s.top_p, s.top_k)
    if isinstance(s.max_new_tokens, bool) or not isinstance(s.max_new_tokens, int) \
            or s.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {s.max_new_tokens!r}")
    stops = [s.stop] if isinstance(s.stop, str) else list(s.stop or [])
    if any(not isinstance(x, str) or not x for x in stops):
        raise ValueError(f"stop strings must be non-empty strings, got {stops!r}")
    if stops and tokenizer is None:
        raise ValueError("stop strings need a tokenizer (pass tokenizer_path to load)")
    if not prompts:
        raise ValueError("no prompts given")
    texts, ids = [], []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"prompt {i} is empty")
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer: pass tokenizer_path to "
                                 "Grok.load, or give prompts as token-id lists")
            row = tokenizer.encode(prompt)
        else:
            row = [int(t) for t in np.asarray(prompt).reshape(-1)] if len(prompt) else []
        if not row:
            raise ValueError(f"prompt {i} is empty")
        try:
            config.check_tokens([row])
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from None
        if len(row) + s.max_new_tokens > config.sequence_len:
            raise ValueError(
                f"prompt {i} has {len(row)} tokens; with max_new_tokens={s.max_new_tokens} "
                f"it needs {len(row) + s.max_new_tokens} positions, more than "
                f"sequence_len={config.sequence_len}")
        texts.append(prompt if isinstance(prompt, str) else None)
        ids.append(row)
    seeds = [s.seed] * len(ids) if isinstance(s.seed, int) else list(s.seed)
    if len(seeds) != len(ids) or any(isinstance(x, bool) or not isinstance(x, int)
                                     for x in seeds):
        raise ValueError(f"seed must be an int or one int per prompt ({len(ids)}), "
                         f"got {s.seed!r}")
    allowed = default_allowed(config, tokenizer)  # no pad, BOS or unknown unless asked
    if s.allowed_tokens is not None:
        chosen = np.asarray(list(s.allowed_tokens))
        if chosen.size == 0 or not np.issubdtype(chosen.dtype, np.integer) \
                or chosen.min() < 0 or chosen.max() >= config.vocab_size:
            raise ValueError(f"allowed_tokens must be a non-empty list of token ids in "
                             f"[0, vocab_size={config.vocab_size})")
        allowed = np.zeros(config.vocab_size, bool)
        allowed[chosen] = True
    return Request(texts, ids, s, seeds, stops, allowed)


@dataclasses.dataclass
class Completion:
    """One prompt's result."""

    prompt: str | None
    prompt_ids: list[int]
    output_ids: list[int]
    output_logprobs: list[float]  # log-softmax of the float32 logits, temperature 1
    top_alternatives: list[list[tuple[int, float]]]  # per token: 8 (id, log-prob), best first
    text: str
    finish_reason: str  # "eos", "stop" or "length"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Row:
    """Host-side state of one prompt while it decodes."""

    prompt: str | None
    prompt_ids: list[int]
    decoder: object | None
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    alternatives: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    text: str = ""
    emitted: int = 0  # text[:emitted] has been handed out
    finish_reason: str | None = None

    def completion(self) -> Completion:
        return Completion(self.prompt, self.prompt_ids, self.output_ids, self.logprobs,
                          self.alternatives, self.text, self.finish_reason or "length")


def _keys(seeds, steps):
    """One PRNG key per row from its request's seed and its own step: same seed, same draws,
    whatever else shares the batch."""
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, steps)


class Generator:
    """Compiled prefill/decode steps for one loaded model, reused across calls."""

    def __init__(self, grok):
        self.grok = grok
        self._compiled: dict[tuple, object] = {}
        self.compile_seconds = 0.0
        self.stats: dict[str, float] = {}

    @property
    def compile_count(self) -> int:
        return len(self._compiled)

    # --- compiled steps -----------------------------------------------------------------

    def _batch_sharding(self, x) -> NamedSharding:
        """Every per-row array leads with the batch, split over `data`; cache keys and
        values [B, S, K, C] also split their heads over `model`."""
        spec = sharding.KV_SPEC if x.ndim == 4 else P(sharding.DATA, *([None] * (x.ndim - 1)))
        return NamedSharding(self.grok.mesh, spec)

    def _out_sharding(self, x):
        """A step's draw (a few numbers per row) is replicated, so that any process can
        read it; everything else stays split by rows."""
        if isinstance(x, Sample):
            return jax.tree.map(lambda _: NamedSharding(self.grok.mesh, P()), x)
        return self._batch_sharding(x)

    def _compiled_step(self, key: tuple, fn, args, donate: tuple[int, ...] = ()):
        if key not in self._compiled:
            start = time.perf_counter()
            in_shardings = jax.tree.map(lambda a: a.sharding, args)
            out_shardings = jax.tree.map(self._out_sharding, jax.eval_shape(fn, *args),
                                         is_leaf=lambda x: isinstance(x, Sample))
            jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                             donate_argnums=donate)
            self._compiled[key] = jitted.lower(*args).compile()
            self.compile_seconds += time.perf_counter() - start
        return self._compiled[key]

    def _prefill_fn(self, max_len: int):
        grok = self.grok

        def prefill(params, tokens, lengths, seeds, settings, allowed):
            cache = init_cache(grok.config, tokens.shape[0], max_len)
            # A fresh cache holds nothing past the prompt bucket: attend to that alone.
            logits, cache = grok.model.apply(params, tokens, cache, num_new=lengths,
                                             attend_len=tokens.shape[1])
            last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
            keys = _keys(seeds, jnp.zeros_like(lengths))
            return cache, sample(last.astype(jnp.float32), keys, settings, allowed)
        return prefill

    def _decode_fn(self, attend_len: int):
        grok = self.grok

        def decode(params, cache, tokens, steps, active, seeds, settings, allowed):
            """Feeds each row its last token; `steps` counts each row's tokens so far."""
            steps = steps + active
            logits, cache = grok.model.apply(params, tokens[:, None], cache,
                                             num_new=active.astype(jnp.int32),
                                             attend_len=attend_len)
            drawn = sample(logits[:, 0].astype(jnp.float32), _keys(seeds, steps),
                           settings, allowed)
            return cache, drawn, steps
        return decode

    def _put(self, x):
        x = np.asarray(x)
        return sharding.put(x, self._batch_sharding(x))

    # --- the loop -----------------------------------------------------------------------

    def run(self, request: Request) -> Iterator[tuple[int, str, bool]]:
        """Yields (prompt index, text increment, row finished) as tokens arrive;
        `self.completions` holds the results when the iterator is exhausted."""
        grok, cfg = self.grok, self.grok.config
        settings = request.settings
        max_new_tokens = settings.max_new_tokens
        rows = [_Row(text, ids, self._decoder()) for text, ids in
                zip(request.prompts, request.prompt_ids, strict=True)]

        n = len(rows)
        batch = sharding.padded_batch(grok.mesh, bucket(n, cap=1 << 30, minimum=1))
        longest = max(len(r.prompt_ids) for r in rows)
        t_bucket = bucket(longest, cap=cfg.sequence_len)
        max_len = bucket(longest + max_new_tokens, cap=cfg.sequence_len)
        max_len = max(max_len, t_bucket)

        tokens = np.full((batch, t_bucket), cfg.pad_token, np.int32)
        lengths = np.ones(batch, np.int32)  # padding rows: one pad token
        for i, r in enumerate(rows):
            tokens[i, : len(r.prompt_ids)] = r.prompt_ids
            lengths[i] = len(r.prompt_ids)
        seed_arr = np.zeros(batch, np.uint32)
        seed_arr[:n] = np.asarray(request.seeds, np.int64) % (1 << 32)
        sampling = SamplingParams(np.full(batch, settings.temperature, np.float32),
                                  np.full(batch, settings.top_p, np.float32),
                                  np.full(batch, settings.top_k, np.int32))
        on_device = [self._put(x) for x in (tokens, lengths, seed_arr)]
        settings_d = jax.tree.map(self._put, sampling)
        allowed_d = self._put(np.broadcast_to(request.allowed, (batch, cfg.vocab_size)))
        seeds_d = on_device[2]

        compiled_before = self.compile_seconds
        args = (grok.params, *on_device, settings_d, allowed_d)
        step = self._compiled_step(("prefill", batch, t_bucket, max_len),
                                   self._prefill_fn(max_len), args)
        start = time.perf_counter()
        cache, drawn_d = step(*args)
        drawn = jax.device_get(drawn_d)
        prefill_s = time.perf_counter() - start

        active = np.zeros(batch, bool)
        active[:n] = True
        steps_d = self._put(np.zeros(batch, np.int32))
        active_d, uploaded = None, None
        decode_s, decode_tokens = 0.0, 0
        while True:
            for i, r in enumerate(rows):
                if active[i]:
                    piece = self._accept(r, drawn, i, max_new_tokens, request.stops)
                    active[i] = r.finish_reason is None
                    if piece or not active[i]:
                        yield i, piece, not active[i]
            if not active.any():
                break
            if uploaded is None or (uploaded != active).any():
                active_d, uploaded = self._put(active), active.copy()  # a row has finished
            args = (grok.params, cache, drawn_d.tokens, steps_d, active_d, seeds_d,
                    settings_d, allowed_d)
            # Attend to the filled part of the cache, bucketed: one compiled step per bucket.
            filled = max(len(r.prompt_ids) + len(r.output_ids)
                         for r, on in zip(rows, active, strict=False) if on)
            attend = bucket(filled, cap=max_len)
            step = self._compiled_step(("decode", batch, max_len, attend),
                                       self._decode_fn(attend), args, donate=(1,))
            start = time.perf_counter()
            cache, drawn_d, steps_d = step(*args)
            drawn = jax.device_get(drawn_d)
            decode_s += time.perf_counter() - start
            decode_tokens += int(active.sum())

        self.completions = [r.completion() for r in rows]
        self.stats = {"compile_s": self.compile_seconds - compiled_before,
                      "prefill_s": prefill_s, "prefill_tokens": int(lengths[:n].sum()),
                      "decode_s": decode_s, "decode_tokens": decode_tokens}

    def _decoder(self):
        tokenizer = self.grok.tokenizer
        return None if tokenizer is None else tokenizer.stream_decoder()

    def _accept(self, row: _Row, drawn: Sample, i: int, max_new_tokens: int,
                stops: list[str]) -> str:
        """Records row i's new token; returns the text that is now final.

        Text that could be the start of a stop string is held back until it is known not
        to be, so a streamed increment is never taken back.
        """
        token = int(drawn.tokens[i])
        row.output_ids.append(token)
        row.logprobs.append(float(drawn.logprobs[i]))
        row.alternatives.append([(int(t), float(lp)) for t, lp in
                                 zip(drawn.top_ids[i], drawn.top_logprobs[i], strict=True)])
        eos = token == self.grok.config.eos_token
        done = eos or len(row.output_ids) >= max_new_tokens
        if row.decoder is not None:
            row.text += "" if eos else row.decoder.push(token)
            row.text += row.decoder.flush() if done else ""
        cuts = [at for s in stops if (at := row.text.find(s, row.emitted)) >= 0]
        if cuts:
            row.text = row.text[: min(cuts)]
            row.finish_reason = "stop"
            done = True
        elif done:
            row.finish_reason = "eos" if eos else "length"
        end = len(row.text) if done else len(row.text) - _stop_prefix_len(row.text, stops)
        piece, row.emitted = row.text[row.emitted:end], end
        return piece


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that begins some stop string."""
    longest = max((len(s) for s in stops), default=1)
    for k in range(min(longest - 1, len(text)), 0, -1):
        if any(len(s) > k and s.startswith(text[-k:]) for s in stops):
            return k
    return 0
