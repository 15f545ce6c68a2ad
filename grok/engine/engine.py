"""Compiled steps over a fixed set of decode slots: prefill (with insert) and generate.

The contract (after JetStream's engine API, with its prefill and insert as one program):
`prefill` runs a few prompts through the model, draws each one's first token and writes
each row into its free slot of the persistent `DecodeState` (rows of one KV cache of
`slots` x `max_seq_len`), donated and updated in place; `generate` advances every slot in
use by one token. The engine keeps no notion of requests: which slot holds what, and when a
row is done, is the scheduler's business (`grok.engine.scheduler`). A separate insert
program would be one more per prompt length, since it takes the prefilled rows' keys and
values as they are shaped.

Shapes are bucketed so that a few compiled programs serve every request: prefill batches and
the decode rows to powers of two (padded to the mesh's data axis), prompt lengths and the
attended part of the cache to powers of two from a floor (`Buckets`, per platform). Each
program is compiled ahead of time once per shape and kept; `warmup` compiles all of them.
Every array of the decode state declares its layout in `STATE_SPECS`, so placements are
looked up, not guessed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from grok import compilation, sharding
from grok.config import GrokConfig
from grok.engine.request import GenerationSettings, Request, allowed_mask, make_request
from grok.errors import GrokError
from grok.kv_cache import KVCache, init_cache
from grok.quant import storage_dtype
from grok.routing import Tally, tally
from grok.sampling import Sample, SamplingParams, sample
from grok.sharding import DATA, LAYERS_KV_SPEC

MIN_BUCKET = 16  # smallest prompt-length and attention bucket on CPU
MAX_SLOTS = 4096  # a sanity bound on max_batch: far past what any device holds

ROWS = P(DATA)  # [B]: one value per row, rows split over `data`
ROWS_BY_VOCAB = P(DATA, None)  # [B, V]
ROWS_BY_SLOT = P(DATA, None)  # [B, S]
REPLICATED = P()  # a step's draw: every process reads it
# Layouts of a prefill's inputs after the parameters and the state, in
# `Engine._prefill_inputs` order: target slots, tokens, lengths, seeds, sampling, allowed.
PREFILL_INPUT_SPECS = (REPLICATED, ROWS_BY_SLOT, ROWS, ROWS, SamplingParams(ROWS, ROWS, ROWS),
                       ROWS_BY_VOCAB)


def bucket(n: int, cap: int, minimum: int = MIN_BUCKET) -> int:
    """`n` rounded up to a power of two (at least `minimum`), at most `cap`."""
    return min(cap, max(minimum, 1 << max(n - 1, 0).bit_length()))


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Which shapes the engine compiles, so that a few programs serve every request.

    An accelerator reads weights at about 3 TB/s and multiplies at about 1000 TFLOP/s, so a
    step over fewer than some 300 tokens costs its weight reads, whatever its token count:
    padding a prompt to 128 tokens, attention to 1024 positions (a few percent of a step's
    bytes on Grok-1) or 5 rows to 16 costs little, and batching prompts gains only while
    batch x length stays within about 1024 tokens (beyond, one prompt at a time does the
    same work, and a batch's attention temporaries grow as batch x length^2: 33 GiB per
    H100 for 8 prompts of 8192). CPU multiplies slowly enough that every token counts.
    """

    min_prompt: int  # smallest prompt-length bucket
    min_attend: int  # smallest attention bucket
    prefill_tokens: int | None  # batch x length a batched prefill stays within; None: any
    row_ratio: int = 2  # consecutive row buckets (prefill batches, decode rows) differ so

    def __post_init__(self):
        for name in ("min_prompt", "min_attend", "prefill_tokens", "row_ratio"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1
                                      or value & (value - 1)):
                raise GrokError(f"Buckets.{name} must be a power of two, got {value!r:.40}")
        if self.row_ratio < 2:
            raise GrokError(f"Buckets.row_ratio must be at least 2, got {self.row_ratio}")

    @classmethod
    def for_platform(cls, platform: str) -> Buckets:
        if platform == "cpu":
            return cls(MIN_BUCKET, MIN_BUCKET, None)
        return cls(min_prompt=128, min_attend=1024, prefill_tokens=1024, row_ratio=4)


class DecodeState(NamedTuple):
    """Everything a decode step needs, one row per slot; lives on the devices."""

    cache: KVCache  # k, v [L, B, K, S, C]; lengths [B]; key_valid [B, S]
    tokens: jax.Array  # i32[B]: the slot's last drawn token, fed to the next step
    steps: jax.Array  # i32[B]: tokens drawn so far by the slot's request (its PRNG step)
    seeds: jax.Array  # u32[B]
    sampling: SamplingParams  # [B] each
    allowed: jax.Array  # bool[B, V]: tokens the slot's request may draw


CACHE_SPECS = KVCache(LAYERS_KV_SPEC, LAYERS_KV_SPEC, ROWS, ROWS_BY_SLOT)
# The layout of every decode-state array: rows over `data`, heads over `model`.
STATE_SPECS = DecodeState(CACHE_SPECS, ROWS, ROWS, ROWS, SamplingParams(ROWS, ROWS, ROWS),
                          ROWS_BY_VOCAB)


def init_state_fn(config: GrokConfig, slots: int, max_len: int, cache_dtype):
    """The function that makes an empty decode state: every slot free."""
    def init():
        zeros = jnp.zeros((slots,), jnp.int32)
        return DecodeState(init_cache(config, slots, max_len, cache_dtype), zeros, zeros,
                           jnp.zeros((slots,), jnp.uint32),
                           SamplingParams(jnp.zeros((slots,), jnp.float32),
                                          jnp.ones((slots,), jnp.float32), zeros),
                           jnp.ones((slots, config.vocab_size), bool))
    return init


def state_shapes(config: GrokConfig, mesh, slots: int, max_len: int) -> DecodeState:
    """The decode state of `slots` rows (a multiple of the data axis) of `max_len`
    positions, as ShapeDtypeStructs placed as `STATE_SPECS` says: its bytes per device,
    known before anything is allocated."""
    cache_dtype = storage_dtype(mesh.devices.flat[0].platform)
    shapes = jax.eval_shape(init_state_fn(config, slots, max_len, cache_dtype))
    return jax.tree.map(
        lambda a, spec: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec)),
        shapes, STATE_SPECS, is_leaf=lambda x: isinstance(x, P))


def _write_slots(state: DecodeState, slots, cache: KVCache, tokens, seeds, sampling,
                 allowed) -> DecodeState:
    """Prefilled rows [Bp, ...] (cache k, v [L, Bp, K, T, C]) into slots `slots[i]` of
    the state; rows whose slot is out of range (padding) are dropped."""
    length = cache.key_valid.shape[1]

    def put(full, rows):  # per-row values [B, ...] <- [Bp, ...]
        return full.at[slots].set(rows, mode="drop")

    def put_kv(full, rows):  # [L, B, K, S, C] <- [L, Bp, K, T, C]: the first T slots
        return full.at[:, slots, :, :length].set(rows.astype(full.dtype), mode="drop")

    key_valid = jnp.zeros((slots.shape[0], state.cache.max_len), bool)
    key_valid = key_valid.at[:, :length].set(cache.key_valid)
    return DecodeState(
        KVCache(put_kv(state.cache.k, cache.k), put_kv(state.cache.v, cache.v),
                put(state.cache.lengths, cache.lengths),
                state.cache.key_valid.at[slots].set(key_valid, mode="drop")),
        put(state.tokens, tokens), put(state.steps, jnp.zeros_like(tokens)),
        put(state.seeds, seeds),
        SamplingParams(*(put(a, b) for a, b in zip(state.sampling, sampling, strict=True))),
        put(state.allowed, allowed))


def _keys(seeds, steps):
    """One PRNG key per row from its request's seed and its own step: same seed, same draws,
    whatever else shares the batch."""
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, steps)


def _seed_bits(seed: int) -> int:
    return seed % (1 << 32)


class Engine:
    """Compiled steps for one loaded model and one decode-state shape."""

    def __init__(self, grok, max_batch: int, max_seq_len: int,
                 log: Callable[[str], None] | None = None, buckets: Buckets | None = None):
        cfg = grok.config
        for name, value, low, high in (("max_batch", max_batch, 1, MAX_SLOTS),
                                       ("max_seq_len", max_seq_len, 2, cfg.sequence_len)):
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not low <= value <= high:
                raise GrokError(f"{name} must be an integer in [{low}, {high}], "
                                f"got {value!r:.40}")
        self.grok = grok
        self.config = cfg
        self.mesh = grok.mesh
        self.slots = sharding.padded_batch(grok.mesh, max_batch)  # rows of the decode state
        self.max_seq_len = max_seq_len
        # Keys and values are bf16 numbers; on CPU they are held as float32, since XLA:CPU
        # would otherwise convert the whole cache to float32 for its dots and scatters at
        # every step (measured +29% per decode step with 16 slots of 288 positions).
        platform = grok.mesh.devices.flat[0].platform
        self.cache_dtype = storage_dtype(platform)
        self.buckets = Buckets.for_platform(platform) if buckets is None else buckets
        self.log = log
        sizes, n = {self.slots}, 1
        while n < self.slots:
            sizes.add(min(self.slots, sharding.padded_batch(grok.mesh, n)))
            n *= self.buckets.row_ratio
        self._row_buckets = tuple(sorted(sizes))
        self._compiled: dict[tuple, object] = {}
        self.compile_times: dict[tuple, float] = {}  # seconds each program took to compile
        self.compile_seconds = 0.0
        self._state_shardings = self._shardings(STATE_SPECS)

    # --- requests ------------------------------------------------------------------------

    def make_request(self, prompt: str | Sequence[int], settings: GenerationSettings,
                     label: str = "the prompt") -> Request:
        """A request checked against the model and this engine's context."""
        return make_request(self.config, self.grok.tokenizer, prompt, settings,
                            max_seq_len=self.max_seq_len, label=label)

    # --- shapes --------------------------------------------------------------------------

    def row_buckets(self) -> list[int]:
        """The batch sizes prefill and decode compile for: powers of `row_ratio` up to the
        slots, each padded to the data axis."""
        return list(self._row_buckets)

    def _ladder(self, minimum: int) -> list[int]:
        out, n = [], min(minimum, self.max_seq_len)
        while True:
            out.append(n)
            if n >= self.max_seq_len:
                return out
            n = min(self.max_seq_len, 2 * n)

    def prompt_buckets(self) -> list[int]:
        """Prompt-length buckets up to the cache length."""
        return self._ladder(self.buckets.min_prompt)

    def attend_buckets(self) -> list[int]:
        """Attention buckets (the attended part of the cache) up to the cache length."""
        return self._ladder(self.buckets.min_attend)

    def rows_for(self, n: int) -> int:
        """The compiled batch that holds `n` rows."""
        return next(b for b in self._row_buckets if b >= n)

    def prompt_bucket(self, longest: int) -> int:
        return bucket(longest, cap=self.max_seq_len, minimum=self.buckets.min_prompt)

    def attend_bucket(self, filled: int) -> int:
        return bucket(filled, cap=self.max_seq_len, minimum=self.buckets.min_attend)

    def prefill_groups(self, prompt_lengths: Sequence[int]) -> list[list[int]]:
        """Which prompts (indices, in order) share a prefill: one prefill per prompt-length
        bucket, so a long prompt does not pad short ones, of at most the prompts the
        engine batches at that length."""
        buckets: dict[int, list[int]] = {}
        for i, n in enumerate(prompt_lengths):
            buckets.setdefault(self.prompt_bucket(n), []).append(i)
        return [members[i:i + self.max_prefill_batch(length)]
                for length, members in buckets.items()
                for i in range(0, len(members), self.max_prefill_batch(length))]

    def max_prefill_batch(self, length: int) -> int:
        """The most prompts of bucket `length` one prefill takes (see `Buckets`)."""
        budget = self.buckets.prefill_tokens
        fitting = [b for b in self._row_buckets if budget is None or b * length <= budget]
        return max(fitting, default=self._row_buckets[0])

    # --- the three steps ------------------------------------------------------------------

    def init_state(self) -> DecodeState:
        """An empty decode state: every slot free."""
        return self._init_step()()

    def prefill(self, requests: Sequence[Request], state: DecodeState,
                slots: Sequence[int]) -> tuple[DecodeState, Sample]:
        """Runs the prompts (at most `slots`) through the model in one batch and writes
        request i into slot `slots[i]` of the state (donated: updated in place), ready to
        decode; returns the new state and the first draws on the host."""
        n = len(requests)
        length = self.prompt_bucket(max(len(r.prompt_ids) for r in requests))
        if not 1 <= n <= self.max_prefill_batch(length):
            raise ValueError(f"a prefill of prompt bucket {length} takes 1 to "
                             f"{self.max_prefill_batch(length)} requests, got {n}")
        if len(slots) != n or len(set(slots)) != n or any(
                not 0 <= s < self.slots for s in slots):
            raise ValueError(f"bad slots {list(slots)} for {n} requests and {self.slots} "
                             "slots")
        batch = self.rows_for(n)
        arrays = self._prefill_inputs(batch, length)
        index, tokens, lengths, seeds, sampling, allowed = arrays
        index[:n] = slots  # the padding rows' slot is out of range: their writes are dropped
        for i, r in enumerate(requests):
            s = r.settings
            tokens[i, : len(r.prompt_ids)] = r.prompt_ids
            lengths[i] = len(r.prompt_ids)
            seeds[i] = _seed_bits(s.seed)
            sampling.temperature[i], sampling.top_p[i], sampling.top_k[i] = \
                s.temperature, s.top_p, s.top_k
            allowed[i] = allowed_mask(self.config, s, self.grok.tokenizer)
        args = (self.grok.params, state, *jax.tree.map(self._put, arrays, PREFILL_INPUT_SPECS))
        state, first, tally = self._prefill_step(batch, length, args)(*args)
        first, tally = jax.device_get((first, tally))
        self._count("prefill", tally)
        return state, first

    def generate(self, state: DecodeState, active: jax.Array, rows: int, filled: int
                 ) -> tuple[DecodeState, Sample]:
        """One token for each active slot among the first `rows` (a bucket from
        `row_buckets`); `active` is bool[slots] on the devices (see `put_active`);
        `filled` is the most cache slots any active row will hold after this step.
        Returns the new state and the draws of the first `rows` slots, on the host."""
        attend = self.attend_bucket(filled)
        args = (self.grok.params, state, active)
        state, drawn, tally = self._decode_step(rows, attend, args)(*args)
        drawn, tally = jax.device_get((drawn, tally))
        self._count("decode", tally)
        return state, drawn

    def _count(self, phase: str, tally: Tally | None) -> None:
        if tally is not None:
            self.grok.usage.add(phase, tally)

    def put_active(self, active: np.ndarray) -> jax.Array:
        """bool[slots]: which slots hold a running request (uploaded when it changes)."""
        return self._put(np.asarray(active, bool), ROWS)

    def warmup_keys(self) -> list[tuple]:
        """Every program a request can need, as `programs()` keys: what `warmup` compiles."""
        keys: list[tuple] = [("init",)]
        for batch in self.row_buckets():
            keys += [("prefill", batch, length) for length in self.prompt_buckets()
                     if batch <= self.max_prefill_batch(length)]
            keys += [("decode", batch, attend) for attend in self.attend_buckets()]
        return keys

    def warmup(self, keys: Sequence[tuple] | None = None,
               progress: Callable[[int, int, float], None] | None = None) -> None:
        """Compiles every program of `keys` (default: `warmup_keys()`, all any request can
        need), so none compiles while serving. `progress(done, total, seconds)` is called
        before the first compile and after each."""
        keys = self.warmup_keys() if keys is None else list(keys)
        start = time.perf_counter()
        if progress is not None:
            progress(0, len(keys), 0.0)
        for done, key in enumerate(keys, 1):
            self.compile_program(key)
            if progress is not None:
                progress(done, len(keys), time.perf_counter() - start)

    def compile_program(self, key: tuple):
        """The compiled program of `key` (see `programs()`), compiled now if it is not yet,
        from abstract inputs: no device memory is touched."""
        kind, *shape = key
        if kind == "init":
            return self._init_step()
        params, state = self.grok.params, self.state_shapes()
        if kind == "prefill":
            batch, length = shape
            return self._prefill_step(batch, length, (params, state, *jax.tree.map(
                lambda a, spec: self._abstract(a.shape, a.dtype, spec),
                self._prefill_inputs(batch, length), PREFILL_INPUT_SPECS)))
        if kind == "decode":
            rows, attend = shape
            return self._decode_step(rows, attend, (
                params, state, self._abstract((self.slots,), jnp.bool_, ROWS)))
        raise ValueError(f"unknown program key {key!r}")

    def state_shapes(self) -> DecodeState:
        """The decode state as `jax.ShapeDtypeStruct`s with their shardings: its size
        without allocating it."""
        return state_shapes(self.config, self.mesh, self.slots, self.max_seq_len)

    @property
    def compile_count(self) -> int:
        return len(self._compiled)

    def programs(self) -> dict[tuple, jax.stages.Compiled]:
        """Every program compiled so far, by key: ("init",), ("prefill", batch, length),
        ("decode", rows, attend). For sizing and inspection
        (`memory_analysis`, `as_text`)."""
        return dict(self._compiled)

    # --- one compiled program per step and shape (serving and warmup alike) ---------------

    def _prefill_inputs(self, batch: int, length: int) -> tuple:
        """Host inputs of a prefill of `batch` rows, each a padding row until filled in:
        target slots [B] (out of range: dropped), tokens [B, T], lengths [B], seeds [B],
        SamplingParams [B], allowed [B, V]."""
        return (np.full(batch, self.slots, np.int32),
                np.full((batch, length), self.config.pad_token, np.int32),
                np.zeros(batch, np.int32), np.zeros(batch, np.uint32),
                SamplingParams(np.zeros(batch, np.float32), np.ones(batch, np.float32),
                               np.zeros(batch, np.int32)),
                np.ones((batch, self.config.vocab_size), bool))

    def _init_step(self):
        return self._compiled_step(("init",), self._init_fn(), (), "empty decode state")

    def _prefill_step(self, batch: int, length: int, args):
        return self._compiled_step(("prefill", batch, length), self._prefill_fn(), args,
                                   f"prefill (batch {batch}, prompt bucket {length})",
                                   donate=(1,))

    def _decode_step(self, rows: int, attend: int, args):
        return self._compiled_step(("decode", rows, attend), self._decode_fn(rows, attend),
                                   args, f"decode step (rows {rows}, attending {attend})",
                                   donate=(1,))

    # --- the traced functions -------------------------------------------------------------

    def _init_fn(self):
        return init_state_fn(self.config, self.slots, self.max_seq_len, self.cache_dtype)

    def _prefill_fn(self):
        grok, cfg, cache_dtype = self.grok, self.config, self.cache_dtype

        def prefill(params, state: DecodeState, slots, tokens, lengths, seeds, sampling,
                    allowed):
            cache = init_cache(cfg, tokens.shape[0], tokens.shape[1], cache_dtype)
            logits, cache, routing = grok.model.apply(params, tokens, cache, num_new=lengths,
                                                      with_routing=True)
            last_index = jnp.maximum(lengths - 1, 0)[:, None, None]
            last = jnp.take_along_axis(logits, last_index, axis=1)[:, 0]
            first = sample(last.astype(jnp.float32), _keys(seeds, jnp.zeros_like(lengths)),
                           sampling, allowed)
            state = _write_slots(state, slots, cache, first.tokens, seeds, sampling, allowed)
            real = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]  # [Bp, T]
            return state, first, self._tally(routing, real)
        return prefill

    def _tally(self, routing, real) -> Tally | None:
        """The step's routing tally, or None (nothing computed) with statistics off."""
        if not self.grok.expert_stats:
            return None
        return tally(routing, real, self.config.num_experts)

    def _decode_fn(self, rows: int, attend: int):
        grok = self.grok

        def decode(params, state: DecodeState, active):
            """Feeds each of the first `rows` slots its last token; free slots add
            nothing to the cache (num_new 0) and their draws are ignored."""
            on = active[:rows]
            steps = state.steps[:rows] + on
            logits, cache, routing = grok.model.apply(
                params, state.tokens[:rows, None], state.cache, num_new=on.astype(jnp.int32),
                attend_len=attend, with_routing=True)
            sampling = SamplingParams(*(x[:rows] for x in state.sampling))
            drawn = sample(logits[:, 0].astype(jnp.float32),
                           _keys(state.seeds[:rows], steps), sampling, state.allowed[:rows])
            state = state._replace(cache=cache,
                                   tokens=state.tokens.at[:rows].set(drawn.tokens),
                                   steps=state.steps.at[:rows].set(steps))
            return state, drawn, self._tally(routing, on[:, None])
        return decode

    # --- compiling and placing --------------------------------------------------------------

    def _shardings(self, specs):
        return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), specs,
                            is_leaf=lambda x: isinstance(x, P))

    def _abstract(self, shape, dtype, spec: P) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(self.mesh, spec))

    @staticmethod
    def _with_shardings(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            tree, shardings)

    def _put(self, host, spec: P) -> jax.Array:
        return sharding.put(host, NamedSharding(self.mesh, spec))

    def _out_shardings(self, kind: str):
        replicated = NamedSharding(self.mesh, REPLICATED)
        tally_out = Tally(*(replicated,) * 4) if self.grok.expert_stats else None
        sample_out = Sample(*(replicated,) * 4)
        return {"init": self._state_shardings,
                "prefill": (self._state_shardings, sample_out, tally_out),
                "decode": (self._state_shardings, sample_out, tally_out)}[kind]

    def _compiled_step(self, key: tuple, fn, args, what: str, donate: tuple[int, ...] = ()):
        if key not in self._compiled:
            if self.log is not None:  # on the real model a compile takes minutes
                self.log(f"compiling {what} ...")
            start, hits = time.perf_counter(), compilation.cache_hits()
            in_shardings = jax.tree.map(lambda a: a.sharding, args)
            jitted = jax.jit(fn, in_shardings=in_shardings,
                             out_shardings=self._out_shardings(key[0]),
                             donate_argnums=donate)
            self._compiled[key] = jitted.lower(*args).compile()
            took = time.perf_counter() - start
            self.compile_seconds += took
            self.compile_times[key] = took
            if self.log is not None:
                cached = compilation.cache_hits() > hits
                self.log(f"{'loaded' if cached else 'compiled'} {what} in {took:.1f} s"
                         f"{' (from the compilation cache)' if cached else ''}")
        return self._compiled[key]
