"""Compiled steps over a fixed set of decode slots: prefill, insert, generate.

The contract (after JetStream's engine API): `prefill` runs a few prompts through the model
into a fresh cache of their own and draws each one's first token; `insert` writes those rows
into free slots of the persistent `DecodeState` (rows of one KV cache of `slots` x
`max_seq_len`); `generate` advances every slot in use by one token. The engine keeps no
notion of requests: which slot holds what, and when a row is done, is the scheduler's
business (`grok.engine.scheduler`).

Shapes are bucketed so that a few compiled programs serve every request: prefill batches and
the decode rows to powers of two (padded to the mesh's data axis), prompt lengths and the
attended part of the cache to powers of two from `MIN_BUCKET`. Each program is compiled
ahead of time once per shape and kept; `warmup` compiles all of them. Every array of the
decode state declares its layout in `state_specs`, so placements are looked up, not guessed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from grok import compilation, sharding
from grok.engine.request import GenerationSettings, Request, allowed_mask, make_request
from grok.errors import GrokError
from grok.kv_cache import KVCache, LayerCache, init_cache
from grok.quant import storage_dtype
from grok.routing import Tally, tally
from grok.sampling import Sample, SamplingParams, sample
from grok.sharding import DATA, KV_SPEC

MIN_BUCKET = 16  # smallest prompt-length and attention bucket
MAX_SLOTS = 4096  # a sanity bound on max_batch: far past what any device holds

ROWS = P(DATA)  # [B]: one value per row, rows split over `data`
ROWS_BY_VOCAB = P(DATA, None)  # [B, V]
ROWS_BY_SLOT = P(DATA, None)  # [B, S]
REPLICATED = P()  # a step's draw: every process reads it
# Layouts of a prefill's inputs after the parameters, in `Engine._prefill_inputs` order.
PREFILL_INPUT_SPECS = (ROWS_BY_SLOT, ROWS, ROWS, SamplingParams(ROWS, ROWS, ROWS),
                       ROWS_BY_VOCAB)


def bucket(n: int, cap: int, minimum: int = MIN_BUCKET) -> int:
    """`n` rounded up to a power of two (at least `minimum`), at most `cap`."""
    return min(cap, max(minimum, 1 << max(n - 1, 0).bit_length()))


class DecodeState(NamedTuple):
    """Everything a decode step needs, one row per slot; lives on the devices."""

    cache: KVCache  # layers [B, S, K, C] each; lengths [B]; key_valid [B, S]
    tokens: jax.Array  # i32[B]: the slot's last drawn token, fed to the next step
    steps: jax.Array  # i32[B]: tokens drawn so far by the slot's request (its PRNG step)
    seeds: jax.Array  # u32[B]
    sampling: SamplingParams  # [B] each
    allowed: jax.Array  # bool[B, V]: tokens the slot's request may draw


class Prefix(NamedTuple):
    """Prompts prefilled together, waiting to be inserted into slots (on the devices)."""

    cache: KVCache  # layers [Bp, T, K, C]; lengths [Bp]; key_valid [Bp, T]
    first: Sample  # [Bp]: the first drawn token of each row
    seeds: jax.Array  # u32[Bp]
    sampling: SamplingParams
    allowed: jax.Array  # bool[Bp, V]


def _cache_specs(num_layers: int) -> KVCache:
    return KVCache(tuple(LayerCache(KV_SPEC, KV_SPEC) for _ in range(num_layers)),
                   ROWS, ROWS_BY_SLOT)


def state_specs(num_layers: int) -> DecodeState:
    """The layout of every decode-state array: rows over `data`, heads over `model`."""
    return DecodeState(_cache_specs(num_layers), ROWS, ROWS, ROWS,
                       SamplingParams(ROWS, ROWS, ROWS), ROWS_BY_VOCAB)


def prefix_specs(num_layers: int) -> Prefix:
    return Prefix(_cache_specs(num_layers), Sample(*(REPLICATED,) * 4), ROWS,
                  SamplingParams(ROWS, ROWS, ROWS), ROWS_BY_VOCAB)


def _keys(seeds, steps):
    """One PRNG key per row from its request's seed and its own step: same seed, same draws,
    whatever else shares the batch."""
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, steps)


def _seed_bits(seed: int) -> int:
    return seed % (1 << 32)


class Engine:
    """Compiled steps for one loaded model and one decode-state shape."""

    def __init__(self, grok, max_batch: int, max_seq_len: int,
                 log: Callable[[str], None] | None = None):
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
        self.cache_dtype = storage_dtype(grok.mesh.devices.flat[0].platform)
        self.log = log
        sizes, n = {self.slots}, 1
        while n < self.slots:
            sizes.add(min(self.slots, sharding.padded_batch(grok.mesh, n)))
            n *= 2
        self._row_buckets = tuple(sorted(sizes))
        self._compiled: dict[tuple, object] = {}
        self.compile_seconds = 0.0
        self._state_shardings = self._shardings(state_specs(cfg.num_layers))
        self._prefix_shardings = self._shardings(prefix_specs(cfg.num_layers))

    # --- requests ------------------------------------------------------------------------

    def make_request(self, prompt: str | Sequence[int], settings: GenerationSettings,
                     label: str = "the prompt") -> Request:
        """A request checked against the model and this engine's context."""
        return make_request(self.config, self.grok.tokenizer, prompt, settings,
                            max_seq_len=self.max_seq_len, label=label)

    # --- shapes --------------------------------------------------------------------------

    def row_buckets(self) -> list[int]:
        """The batch sizes prefill and decode compile for: powers of two up to the slots,
        each padded to the data axis."""
        return list(self._row_buckets)

    def length_buckets(self) -> list[int]:
        """Prompt-length and attention buckets up to the cache length."""
        out, n = [], min(MIN_BUCKET, self.max_seq_len)
        while True:
            out.append(n)
            if n >= self.max_seq_len:
                return out
            n = min(self.max_seq_len, 2 * n)

    def rows_for(self, n: int) -> int:
        """The compiled batch that holds `n` rows."""
        return next(b for b in self._row_buckets if b >= n)

    def prompt_bucket(self, longest: int) -> int:
        return bucket(longest, cap=self.max_seq_len)

    # --- the three steps ------------------------------------------------------------------

    def init_state(self) -> DecodeState:
        """An empty decode state: every slot free."""
        return self._init_step()()

    def prefill(self, requests: Sequence[Request]) -> tuple[Prefix, Sample]:
        """Runs the prompts (at most `slots`) through the model in one batch; returns the
        rows on the devices and their first draws on the host."""
        n = len(requests)
        if not 1 <= n <= self.slots:
            raise ValueError(f"prefill takes 1 to {self.slots} requests, got {n}")
        batch = self.rows_for(n)
        length = self.prompt_bucket(max(len(r.prompt_ids) for r in requests))
        tokens, lengths, seeds, sampling, allowed = arrays = self._prefill_inputs(batch, length)
        for i, r in enumerate(requests):
            s = r.settings
            tokens[i, : len(r.prompt_ids)] = r.prompt_ids
            lengths[i] = len(r.prompt_ids)
            seeds[i] = _seed_bits(s.seed)
            sampling.temperature[i], sampling.top_p[i], sampling.top_k[i] = \
                s.temperature, s.top_p, s.top_k
            allowed[i] = allowed_mask(self.config, s, self.grok.tokenizer)
        args = (self.grok.params, *jax.tree.map(self._put, arrays, PREFILL_INPUT_SPECS))
        step = self._prefill_step(batch, length, args)
        prefix, tally = step(*args)
        first, tally = jax.device_get((prefix.first, tally))
        self._count("prefill", tally)
        return prefix, first

    def insert(self, prefix: Prefix, state: DecodeState, slots: Sequence[int]) -> DecodeState:
        """Writes prefix row i into slot `slots[i]` (rows past len(slots) are padding);
        the state is donated and updated in place."""
        batch = prefix.seeds.shape[0]
        length = prefix.cache.key_valid.shape[1]
        if len(slots) > batch or any(not 0 <= s < self.slots for s in slots):
            raise ValueError(f"bad slots {list(slots)} for a prefix of {batch} rows and "
                             f"{self.slots} slots")
        index = np.full(batch, self.slots, np.int32)  # out of range: dropped
        index[: len(slots)] = slots
        args = (state, prefix, self._put(index, REPLICATED))
        return self._insert_step(batch, length, args)(*args)

    def generate(self, state: DecodeState, active: jax.Array, rows: int, filled: int
                 ) -> tuple[DecodeState, Sample]:
        """One token for each active slot among the first `rows` (a bucket from
        `row_buckets`); `active` is bool[slots] on the devices (see `put_active`);
        `filled` is the most cache slots any active row will hold after this step.
        Returns the new state and the draws of the first `rows` slots, on the host."""
        attend = bucket(filled, cap=self.max_seq_len)
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

    def warmup(self) -> None:
        """Compiles every step any request can need, so none compiles while serving."""
        self._init_step()  # compiled, not run: the scheduler makes its own state
        state = self._with_shardings(jax.eval_shape(self._init_fn()), self._state_shardings)
        params = self.grok.params
        for batch in self.row_buckets():
            for length in self.length_buckets():
                args = (params, *jax.tree.map(
                    lambda a, spec: self._abstract(a.shape, a.dtype, spec),
                    self._prefill_inputs(batch, length), PREFILL_INPUT_SPECS))
                self._prefill_step(batch, length, args)
                prefix, _ = jax.eval_shape(self._prefill_fn(), *args)
                self._insert_step(batch, length, (
                    state, self._with_shardings(prefix, self._prefix_shardings),
                    self._abstract((batch,), jnp.int32, REPLICATED)))
            for attend in self.length_buckets():
                self._decode_step(batch, attend, (
                    params, state, self._abstract((self.slots,), jnp.bool_, ROWS)))

    @property
    def compile_count(self) -> int:
        return len(self._compiled)

    # --- one compiled program per step and shape (serving and warmup alike) ---------------

    def _prefill_inputs(self, batch: int, length: int) -> tuple:
        """Host inputs of a prefill of `batch` rows, each a padding row until filled in:
        tokens [B, T], lengths [B], seeds [B], SamplingParams [B], allowed [B, V]."""
        return (np.full((batch, length), self.config.pad_token, np.int32),
                np.zeros(batch, np.int32), np.zeros(batch, np.uint32),
                SamplingParams(np.zeros(batch, np.float32), np.ones(batch, np.float32),
                               np.zeros(batch, np.int32)),
                np.ones((batch, self.config.vocab_size), bool))

    def _init_step(self):
        return self._compiled_step(("init",), self._init_fn(), (), "empty decode state")

    def _prefill_step(self, batch: int, length: int, args):
        return self._compiled_step(("prefill", batch, length), self._prefill_fn(), args,
                                   f"prefill (batch {batch}, prompt bucket {length})")

    def _insert_step(self, batch: int, length: int, args):
        return self._compiled_step(("insert", batch, length), self._insert_fn(), args,
                                   f"insert (batch {batch}, prompt bucket {length})",
                                   donate=(0,))

    def _decode_step(self, rows: int, attend: int, args):
        return self._compiled_step(("decode", rows, attend), self._decode_fn(rows, attend),
                                   args, f"decode step (rows {rows}, attending {attend})",
                                   donate=(1,))

    # --- the traced functions -------------------------------------------------------------

    def _init_fn(self):
        cfg, slots, max_len = self.config, self.slots, self.max_seq_len
        cache_dtype = self.cache_dtype

        def init():
            zeros = jnp.zeros((slots,), jnp.int32)
            return DecodeState(init_cache(cfg, slots, max_len, cache_dtype), zeros, zeros,
                               jnp.zeros((slots,), jnp.uint32),
                               SamplingParams(jnp.zeros((slots,), jnp.float32),
                                              jnp.ones((slots,), jnp.float32), zeros),
                               jnp.ones((slots, cfg.vocab_size), bool))
        return init

    def _prefill_fn(self):
        grok, cfg, cache_dtype = self.grok, self.config, self.cache_dtype

        def prefill(params, tokens, lengths, seeds, sampling, allowed):
            cache = init_cache(cfg, tokens.shape[0], tokens.shape[1], cache_dtype)
            logits, cache, routing = grok.model.apply(params, tokens, cache, num_new=lengths,
                                                      with_routing=True)
            last_index = jnp.maximum(lengths - 1, 0)[:, None, None]
            last = jnp.take_along_axis(logits, last_index, axis=1)[:, 0]
            first = sample(last.astype(jnp.float32), _keys(seeds, jnp.zeros_like(lengths)),
                           sampling, allowed)
            real = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]  # [Bp, T]
            return Prefix(cache, first, seeds, sampling, allowed), self._tally(routing, real)
        return prefill

    def _tally(self, routing, real) -> Tally | None:
        """The step's routing tally, or None (nothing computed) with statistics off."""
        if not self.grok.expert_stats:
            return None
        return tally(routing, real, self.config.num_experts)

    def _insert_fn(self):
        def insert(state: DecodeState, prefix: Prefix, slots):
            length = prefix.cache.key_valid.shape[1]

            def put(full, rows):  # per-row values [B, ...] <- [Bp, ...]
                return full.at[slots].set(rows, mode="drop")

            def put_kv(full, rows):  # [B, S, K, C] <- [Bp, T, K, C]: the first T slots
                return full.at[slots, :length].set(rows, mode="drop")

            layers = tuple(LayerCache(put_kv(a.k, b.k), put_kv(a.v, b.v))
                           for a, b in zip(state.cache.layers, prefix.cache.layers,
                                           strict=True))
            key_valid = jnp.zeros((slots.shape[0], state.cache.max_len), bool)
            key_valid = key_valid.at[:, :length].set(prefix.cache.key_valid)
            cache = KVCache(layers, put(state.cache.lengths, prefix.cache.lengths),
                            state.cache.key_valid.at[slots].set(key_valid, mode="drop"))
            return DecodeState(
                cache, put(state.tokens, prefix.first.tokens),
                put(state.steps, jnp.zeros_like(prefix.first.tokens)),
                put(state.seeds, prefix.seeds),
                SamplingParams(*(put(a, b) for a, b in zip(state.sampling, prefix.sampling,
                                                            strict=True))),
                put(state.allowed, prefix.allowed))
        return insert

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
                "prefill": (self._prefix_shardings, tally_out),
                "insert": self._state_shardings,
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
            if self.log is not None:
                cached = compilation.cache_hits() > hits
                self.log(f"{'loaded' if cached else 'compiled'} {what} in {took:.1f} s"
                         f"{' (from the compilation cache)' if cached else ''}")
        return self._compiled[key]
