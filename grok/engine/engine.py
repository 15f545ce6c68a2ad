"""Compiled steps over a fixed set of decode slots: prefill (with insert) and generate.

The contract (after JetStream's engine API, with its prefill and insert as one program):
`prefill` runs a few prompts (or a part of each: `PrefillRow`) through the model straight
into their slots of the persistent `DecodeState` (rows of one KV cache of `slots` x
`max_seq_len`), donated and updated in place, and draws each one's first token; `generate`
advances every slot in use by one token; `prefill_and_generate` does both in one pass of the
model (a prompt's chunk riding along with a decode step). A prefill may continue what a
slot's cache already holds (an earlier chunk of a long prompt, or a cached prefix that
`load_blocks` copied in from the prefix cache's pool; `save_blocks` copies full blocks out
to it). The engine keeps no notion of requests: which slot holds what, and when a row is
done, is the scheduler's business (`grok.engine.scheduler`).

Shapes are bucketed so that a few compiled programs serve every request: prefill batches and
the decode rows to powers of two (padded to the mesh's data axis), prompt lengths and the
attended part of the cache to powers of two from a floor (`Buckets`, per platform), and
with chunked prefill no prompt part is longer than a chunk. A step that reads the cache
chooses its attention bucket as it runs (`model.Reach`: one branch per bucket), so no
program is specialised to how full the cache is. Each
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
from grok.engine.prefix_cache import POOL_SPECS, BlockPool, PrefixCache
from grok.engine.request import GenerationSettings, Request, allowed_mask, make_request
from grok.errors import GrokError
from grok.kv_cache import KVCache, init_cache
from grok.model import Reach, Segment
from grok.quant import storage_dtype
from grok.routing import Tally, tally
from grok.sampling import (
    TOP_ALTERNATIVES,
    Controls,
    Sample,
    SamplingParams,
    bar_stop_tokens,
    count_tokens,
    mask_words,
    sample,
    target_logits,
    unpack_token_mask,
)
from grok.sharding import DATA, LAYERS_KV_SPEC

MIN_BUCKET = 16  # smallest prompt-length and attention bucket on CPU
MAX_SLOTS = 4096  # a sanity bound on max_batch: far past what any device holds

ROWS = P(DATA)  # [B]: one value per row, rows split over `data`
ROWS_BY_VOCAB = P(DATA, None)  # [B, V]
ROWS_BY_SLOT = P(DATA, None)  # [B, S]
ROWS_BY_WORD = P(DATA, None)  # [B, ceil(V / 32)]: packed token masks
REPLICATED = P()  # a step's draw: every process reads it
CONTROL_SPECS = Controls(ROWS, ROWS_BY_VOCAB, ROWS_BY_VOCAB, ROWS, ROWS, ROWS, ROWS_BY_VOCAB,
                         ROWS)
# Layouts of a prefill's inputs after the parameters and the state, in
# `Engine._prefill_inputs` order: target slots, starts, tokens, lengths, seeds, sampling,
# allowed, controls, each position's next prompt token where the prompt is scored, and
# the packed token masks of the draws.
PREFILL_INPUT_SPECS = (REPLICATED, ROWS, ROWS_BY_SLOT, ROWS, ROWS,
                       SamplingParams(ROWS, ROWS, ROWS), ROWS_BY_VOCAB, CONTROL_SPECS,
                       ROWS_BY_SLOT, ROWS_BY_WORD)


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
    # Consecutive row buckets of mixed steps (decode rows and a prompt chunk in one pass)
    # differ so; None: as `row_ratio`. On accelerators a mixed step already carries a chunk
    # of hundreds of tokens, so a coarser ladder costs it little (a padded row reads only
    # its slot's cache, up to the step's attention bucket) and keeps chunking from adding
    # more mixed programs than the prompt buckets past the chunk that it saves.
    mixed_row_ratio: int | None = None

    def __post_init__(self):
        for name in ("min_prompt", "min_attend", "prefill_tokens", "row_ratio",
                     "mixed_row_ratio"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1
                                      or value & (value - 1)):
                raise GrokError(f"Buckets.{name} must be a power of two, got {value!r:.40}")
        if self.row_ratio < 2:
            raise GrokError(f"Buckets.row_ratio must be at least 2, got {self.row_ratio}")
        if self.mixed_row_ratio is not None and self.mixed_row_ratio < self.row_ratio:
            raise GrokError(f"Buckets.mixed_row_ratio must be at least row_ratio "
                            f"({self.row_ratio}), got {self.mixed_row_ratio}")

    @classmethod
    def for_platform(cls, platform: str) -> Buckets:
        if platform == "cpu":
            return cls(MIN_BUCKET, MIN_BUCKET, None)
        return cls(min_prompt=128, min_attend=1024, prefill_tokens=1024, row_ratio=4,
                   mixed_row_ratio=16)


class DecodeState(NamedTuple):
    """Everything a decode step needs, one row per slot; lives on the devices."""

    cache: KVCache  # k, v [L, B, K, S, C]; lengths [B]; key_valid [B, S]
    tokens: jax.Array  # i32[B]: the slot's last drawn token, fed to the next step
    steps: jax.Array  # i32[B]: tokens drawn so far by the slot's request (its PRNG step)
    seeds: jax.Array  # u32[B]
    sampling: SamplingParams  # [B] each
    allowed: jax.Array  # bool[B, V]: tokens the slot's request may draw
    controls: Controls  # [B] and [B, V]: the request's bias, penalties and min_tokens
    counts: jax.Array  # i32[B, V]: how often the slot's request drew each token


CACHE_SPECS = KVCache(LAYERS_KV_SPEC, LAYERS_KV_SPEC, ROWS, ROWS_BY_SLOT)
# The layout of every decode-state array: rows over `data`, heads over `model`.
STATE_SPECS = DecodeState(CACHE_SPECS, ROWS, ROWS, ROWS, SamplingParams(ROWS, ROWS, ROWS),
                          ROWS_BY_VOCAB, CONTROL_SPECS, ROWS_BY_VOCAB)


def init_state_fn(config: GrokConfig, slots: int, max_len: int, cache_dtype):
    """The function that makes an empty decode state: every slot free."""
    def init():
        zeros = jnp.zeros((slots,), jnp.int32)
        return DecodeState(init_cache(config, slots, max_len, cache_dtype), zeros, zeros,
                           jnp.zeros((slots,), jnp.uint32),
                           SamplingParams(jnp.zeros((slots,), jnp.float32),
                                          jnp.ones((slots,), jnp.float32), zeros),
                           jnp.ones((slots, config.vocab_size), bool),
                           neutral_controls(slots, config.vocab_size, jnp),
                           jnp.zeros((slots, config.vocab_size), jnp.int32))
    return init


def neutral_controls(rows: int, vocab: int, xp=np) -> Controls:
    """`rows` rows that steer nothing (no bias, no penalty, no min_tokens), as NumPy
    arrays (for a prefill's inputs) or, with xp=jnp, traced ones."""
    return Controls(xp.zeros(rows, bool), xp.zeros((rows, vocab), np.float32),
                    xp.zeros((rows, vocab), bool), xp.zeros(rows, np.float32),
                    xp.zeros(rows, np.float32), xp.ones(rows, np.float32),
                    xp.zeros((rows, vocab), bool), xp.zeros(rows, np.int32))


def fill_controls(controls: Controls, i: int, request: Request, eos_token: int) -> None:
    """Row i of host `controls`, neutral as `neutral_controls` makes it, from the request's
    settings."""
    s = request.settings
    controls.on[i] = s.steered
    for token, bias in s.logit_bias:
        controls.bias[i, token] = bias
    if s.repetition_penalty != 1:
        controls.seen[i, list(request.prompt_ids)] = True
    controls.presence[i], controls.frequency[i], controls.repetition[i] = \
        s.presence_penalty, s.frequency_penalty, s.repetition_penalty
    controls.stop_tokens[i, list(s.stop_token_ids)] = True
    controls.stop_tokens[i, eos_token] = not s.ignore_eos
    controls.min_tokens[i] = s.min_tokens


def state_shapes(config: GrokConfig, mesh, slots: int, max_len: int) -> DecodeState:
    """The decode state of `slots` rows (a multiple of the data axis) of `max_len`
    positions, as ShapeDtypeStructs placed as `STATE_SPECS` says: its bytes per device,
    known before anything is allocated."""
    cache_dtype = storage_dtype(mesh.devices.flat[0].platform)
    shapes = jax.eval_shape(init_state_fn(config, slots, max_len, cache_dtype))
    return jax.tree.map(
        lambda a, spec: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec)),
        shapes, STATE_SPECS, is_leaf=lambda x: isinstance(x, P))


class PromptScores(NamedTuple):
    """What a prefill reports of each position t of each row's part, for rows that score
    their prompt (zeros elsewhere): the log-probability of the prompt token after it
    (token start + t + 1; 0 where there is none), that token's rank (1: the most likely)
    and the 8 most likely tokens there, of the raw temperature-1 logits."""

    logprobs: np.ndarray  # f32[B, T]
    ranks: np.ndarray  # i32[B, T]
    top_ids: np.ndarray  # i32[B, T, 8]
    top_logprobs: np.ndarray  # f32[B, T, 8]


class PrefillRow(NamedTuple):
    """One request's part of a prefill: prompt tokens [start, stop) into slot `slot`, whose
    cache holds the first `start` already (a cached prefix, or earlier chunks). `mask`: the
    packed tokens its draw may take (int32 [ceil(V / 32)], a grammar's), None for all."""

    request: Request
    slot: int
    start: int
    stop: int
    mask: np.ndarray | None = None

    @property
    def final(self) -> bool:
        """The prompt's last part: its draw is the request's first token."""
        return self.stop == len(self.request.prompt_ids)


def _keys(seeds, steps):
    """One PRNG key per row from its request's seed and its own step: same seed, same draws,
    whatever else shares the batch."""
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, steps)


def _seed_bits(seed: int) -> int:
    return seed % (1 << 32)


class Engine:
    """Compiled steps for one loaded model and one decode-state shape."""

    def __init__(self, grok, max_batch: int, max_seq_len: int,
                 log: Callable[[str], None] | None = None, buckets: Buckets | None = None,
                 prefill_chunk: int | None = None, deterministic: bool = False):
        """`prefill_chunk`: the most prompt tokens one prefill takes of a prompt (longer
        ones are prefilled a chunk at a time, between decode steps), a power of two; None:
        whole prompts. `deterministic`: every step has one shape whatever is in flight
        (decode: all slots, the whole cache attended; prefill: one row of one chunk, at
        positions that are multiples of the chunk), so that a request's numbers do not
        depend on other requests, on the prefix cache or on when it joined (see README)."""
        cfg = grok.config
        for name, value, low, high in (("max_batch", max_batch, 1, MAX_SLOTS),
                                       ("max_seq_len", max_seq_len, 2, cfg.sequence_len)):
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not low <= value <= high:
                raise GrokError(f"{name} must be an integer in [{low}, {high}], "
                                f"got {value!r:.40}")
        check_steps(prefill_chunk, deterministic)
        self.prefill_chunk = prefill_chunk
        self.deterministic = deterministic
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
        self._row_buckets = self._rows_ladder(self.buckets.row_ratio)
        self._mixed_row_buckets = self._rows_ladder(self.buckets.mixed_row_ratio
                                                    or self.buckets.row_ratio)
        self._attend_buckets = ((max_seq_len,) if deterministic
                                else tuple(self._ladder(self.buckets.min_attend)))
        self._compiled: dict[tuple, object] = {}
        self.compile_times: dict[tuple, float] = {}  # seconds each program took to compile
        self.compile_seconds = 0.0
        self._state_shardings = self._shardings(STATE_SPECS)
        self.mask_words = mask_words(cfg.vocab_size)
        self._all_tokens: dict[int, jax.Array] = {}  # rows -> masks allowing every token
        self._indices: dict[int, jax.Array] = {}  # i -> i32[] i on the devices

    # --- requests ------------------------------------------------------------------------

    def make_request(self, prompt: str | Sequence[int], settings: GenerationSettings,
                     label: str = "the prompt", grammar=None) -> Request:
        """A request checked against the model and this engine's context. A structure is
        compiled here (waiting for it) unless `grammar` is it, compiled already."""
        if settings.structure is not None and grammar is None:
            grammar = self.grok.grammars.compile(settings.structure)
        return make_request(self.config, self.grok.tokenizer, prompt, settings,
                            max_seq_len=self.max_seq_len, label=label, grammar=grammar)

    # --- shapes --------------------------------------------------------------------------

    def row_buckets(self) -> list[int]:
        """The batch sizes prefill and decode compile for: powers of `row_ratio` up to the
        slots, each padded to the data axis."""
        return list(self._row_buckets)

    def _rows_ladder(self, ratio: int) -> tuple[int, ...]:
        """Powers of `ratio` up to the slots, each padded to the data axis, and the slots."""
        sizes, n = {self.slots}, 1
        while n < self.slots:
            sizes.add(min(self.slots, sharding.padded_batch(self.grok.mesh, n)))
            n *= ratio
        return tuple(sorted(sizes))

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
        """Attention buckets (the attended part of the cache) up to the cache length: the
        lengths a step's attention chooses among as it runs."""
        return list(self._attend_buckets)

    def rows_for(self, n: int) -> int:
        """The compiled batch that holds `n` rows."""
        return next(b for b in self._row_buckets if b >= n)

    def mixed_rows_for(self, n: int) -> int:
        """The compiled mixed step (`prefill_and_generate`) that decodes `n` rows."""
        return next(b for b in self._mixed_row_buckets if b >= n)

    def prompt_bucket(self, longest: int) -> int:
        if self.deterministic:
            return min(self.prefill_chunk, self.max_seq_len)
        return bucket(longest, cap=self.max_seq_len, minimum=self.buckets.min_prompt)

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

    def prefill_key(self, rows: Sequence[PrefillRow]) -> tuple:
        """The program a prefill of these rows runs: ("prefill", batch, length), whether
        the rows start their prompts or continue them (after a chunk, a cached prefix)."""
        return ("prefill", self.rows_for(len(rows)),
                self.prompt_bucket(max(r.stop - r.start for r in rows)))

    def _reach(self, key: tuple) -> tuple[int, ...]:
        """The attention buckets a step of program `key` chooses among: for a prefill,
        those that hold its part; all for decode steps."""
        kind, *shape = key
        least = shape[1] if kind == "prefill" else 1
        return tuple(a for a in self._attend_buckets if a >= least)

    def _reach_index(self, key: tuple, filled: int) -> jax.Array:
        """i32[] on the devices: which of `_reach(key)` a step whose rows fill `filled`
        cache slots reads."""
        lengths = self._reach(key)
        i = next((i for i, n in enumerate(lengths) if n >= filled), len(lengths) - 1)
        if i not in self._indices:
            self._indices[i] = self._put(np.int32(i), REPLICATED)
        return self._indices[i]

    # --- the steps ---------------------------------------------------------------------------

    def init_state(self) -> DecodeState:
        """An empty decode state: every slot free."""
        return self._init_step()()

    def prefill(self, rows: Sequence[PrefillRow], state: DecodeState
                ) -> tuple[DecodeState, Sample, PromptScores | None]:
        """Runs each row's prompt part through the model in one batch, straight into its
        slot of the state (donated: updated in place), and draws the token after it (the
        request's first, for a `final` row; meaningless otherwise). Returns the new state,
        the draws on the host, and `PromptScores` where some row's request asks for its
        prompt's log-probabilities (computed only then)."""
        n = len(rows)
        key = self.prefill_key(rows)
        _, batch, length = key
        if not 1 <= n <= self.max_prefill_batch(length):
            raise ValueError(f"a prefill of prompt bucket {length} takes 1 to "
                             f"{self.max_prefill_batch(length)} rows, got {n}")
        self._check_rows(rows)
        arrays = self._prefill_arrays(rows, batch, length)
        args = (self.grok.params, state, self._reach_index(key, max(r.stop for r in rows)),
                *jax.tree.map(self._put, arrays, PREFILL_INPUT_SPECS))
        state, first, tally, scores = self._prefill_step(key, args)(*args)
        scored = any(r.request.settings.prompt_logprobs for r in rows)
        first, tally, scores = jax.device_get((first, tally, scores if scored else None))
        self._count("prefill", tally)
        return state, first, scores

    def prefill_and_generate(self, part: PrefillRow, state: DecodeState, active: jax.Array,
                             rows: int, filled: int,
                             masks: dict[int, np.ndarray] | None = None
                             ) -> tuple[DecodeState, Sample, Sample, PromptScores | None]:
        """`generate` and a `prefill` of one prompt part of at most `mixed_length` tokens
        as one step, in which the model reads its weights once for both: a decode step
        costs its weight reads more than its rows, so the part adds little more than its
        own arithmetic, where a prefill step of its own would read the weights again. Arguments
        as `generate` (`filled` for the decoding rows); returns the new state, the decode
        draws, the part's draw and its `PromptScores` (as `prefill`). The step decodes
        `mixed_rows_for(rows)` rows. Only while `mixes`."""
        if not self.mixes:
            raise ValueError("steps mix a prefill in only with a prefill chunk, outside "
                             "deterministic steps")
        length = self.mixed_length
        self._check_rows([part])
        if part.stop - part.start > length:
            raise ValueError(f"a mixed step's part holds at most {length} tokens, got "
                             f"{part[1:]}")
        rows = self.mixed_rows_for(rows)
        arrays = self._prefill_arrays([part], self._row_buckets[0], length)
        args = (self.grok.params, state, active, self._token_masks(rows, masks),
                self._reach_index(("mixed", rows), max(filled, part.stop)),
                *jax.tree.map(self._put, arrays, PREFILL_INPUT_SPECS))
        state, drawn, first, decode_tally, prefill_tally, scores = \
            self._mixed_step(rows, args)(*args)
        scored = part.request.settings.prompt_logprobs
        drawn, first, decode_tally, prefill_tally, scores = jax.device_get(
            (drawn, first, decode_tally, prefill_tally, scores if scored else None))
        self._count("decode", decode_tally)
        self._count("prefill", prefill_tally)
        return state, drawn, first, scores

    def _check_rows(self, rows: Sequence[PrefillRow]) -> None:
        """Each row a part of its prompt, into its own slot of this engine."""
        slots = [r.slot for r in rows]
        if len(set(slots)) != len(rows) or any(not 0 <= s < self.slots for s in slots) or any(
                not 0 <= r.start < r.stop <= len(r.request.prompt_ids) for r in rows):
            raise ValueError(f"bad prefill rows {[r[1:] for r in rows]} for {self.slots} "
                             "slots")

    @property
    def mixes(self) -> bool:
        """Whether prompt parts run inside decode steps (`prefill_and_generate`): with a
        prefill chunk, except in deterministic steps, whose one shape they would break."""
        return self.prefill_chunk is not None and not self.deterministic

    @property
    def mixed_length(self) -> int:
        """The prompt tokens a mixed step's part holds (with a prefill chunk): the chunk's
        bucket."""
        return self.prompt_bucket(self.prefill_chunk)

    def load_blocks(self, state: DecodeState, cache: PrefixCache, slot: int,
                    blocks: Sequence[int], prompt_ids: Sequence[int]) -> DecodeState:
        """Copies pool blocks (a prompt's first len(blocks) blocks) into slot `slot`, whose
        cache then holds those tokens (the state is donated)."""
        cached = len(blocks) * cache.block_size
        ids = self._block_ids(cache, dict(enumerate(blocks)))
        valid = np.zeros(self.max_seq_len, bool)
        valid[:cached] = np.asarray(prompt_ids[:cached]) > self.config.pad_token
        args = (state, cache.pool, self._put(np.int32(slot), REPLICATED), ids,
                self._put(np.int32(cached), REPLICATED), self._put(valid, REPLICATED))
        return self._blocks_step("load_blocks", cache, args)(*args)

    def save_blocks(self, state: DecodeState, cache: PrefixCache, slot: int,
                    blocks: dict[int, int]) -> BlockPool:
        """Copies blocks of slot `slot`'s cache into the pool: `blocks` maps a block's
        position in the row (its i-th block) to the pool block it goes to. Returns the new
        pool (the old one is donated)."""
        args = (state, cache.pool, self._put(np.int32(slot), REPLICATED),
                self._block_ids(cache, blocks))
        return self._blocks_step("save_blocks", cache, args)(*args)

    def _block_ids(self, cache: PrefixCache, blocks: dict[int, int]) -> jax.Array:
        """i32[row blocks]: the pool block of each block of a slot's row; the pool's size
        (out of range: nothing copied) where none."""
        ids = np.full(self.max_seq_len // cache.block_size, cache.settings.blocks, np.int32)
        for position, block in blocks.items():
            ids[position] = block
        return self._put(ids, REPLICATED)

    def generate(self, state: DecodeState, active: jax.Array, rows: int, filled: int,
                 masks: dict[int, np.ndarray] | None = None) -> tuple[DecodeState, Sample]:
        """One token for each active slot among the first `rows` (a bucket from
        `row_buckets`); `active` is bool[slots] on the devices (see `put_active`);
        `filled` is the most cache slots any active row will hold after this step;
        `masks` the packed tokens some slots may draw (a grammar's; int32 [ceil(V / 32)]
        by slot), the others drawing from all. Returns the new state and the draws of the
        first `rows` slots, on the host. Deterministic steps decode every slot."""
        rows = self.slots if self.deterministic else rows
        args = (self.grok.params, state, active, self._token_masks(rows, masks),
                self._reach_index(("decode", rows), filled))
        state, drawn, tally = self._decode_step(rows, args)(*args)
        drawn, tally = jax.device_get((drawn, tally))
        self._count("decode", tally)
        return state, drawn

    def _token_masks(self, rows: int, masks: dict[int, np.ndarray] | None) -> jax.Array:
        """The decode step's int32 [rows, ceil(V / 32)] masks: all tokens (uploaded once
        per row bucket) unless some slot has its own."""
        if not masks:
            if rows not in self._all_tokens:
                self._all_tokens[rows] = self._put(
                    np.full((rows, self.mask_words), -1, np.int32), ROWS_BY_WORD)
            return self._all_tokens[rows]
        host = np.full((rows, self.mask_words), -1, np.int32)
        for slot, mask in masks.items():
            host[slot] = mask
        return self._put(host, ROWS_BY_WORD)

    def _count(self, phase: str, tally: Tally | None) -> None:
        if tally is not None:
            self.grok.usage.add(phase, tally)

    def put_active(self, active: np.ndarray) -> jax.Array:
        """bool[slots]: which slots hold a running request (uploaded when it changes)."""
        return self._put(np.asarray(active, bool), ROWS)

    def warmup_keys(self) -> list[tuple]:
        """Every program a request can need, as `programs()` keys: what `warmup` compiles."""
        cache = self.grok.prefix_cache
        blocks = ([("load_blocks", cache.settings), ("save_blocks", cache.settings)]
                  if cache is not None and self.max_seq_len >= cache.block_size else [])
        if self.deterministic:
            return [("init",), ("prefill", self._row_buckets[0], self.prompt_bucket(1)),
                    ("decode", self.slots), *blocks]
        chunk = self.prefill_chunk or self.max_seq_len
        lengths = [n for n in self.prompt_buckets() if n <= max(chunk, self.buckets.min_prompt)]
        keys: list[tuple] = [("init",)]
        for batch in self.row_buckets():
            keys += [("prefill", batch, length) for length in lengths
                     if batch <= self.max_prefill_batch(length)]
            keys.append(("decode", batch))
        if self.mixes:
            keys += [("mixed", rows) for rows in self._mixed_row_buckets]
        return keys + blocks

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
        index = self._abstract((), jnp.int32, REPLICATED)
        if kind == "prefill":
            batch, length = shape
            return self._prefill_step(key, (params, state, index, *jax.tree.map(
                lambda a, spec: self._abstract(a.shape, a.dtype, spec),
                self._prefill_inputs(batch, length), PREFILL_INPUT_SPECS)))
        if kind in ("load_blocks", "save_blocks"):
            cache = self.grok.prefix_cache
            if cache is None or cache.settings != shape[0]:
                raise ValueError(f"{key!r}: the model's prefix cache is "
                                 f"{None if cache is None else cache.settings}")
            scalar = self._abstract((), jnp.int32, REPLICATED)
            ids = self._abstract((self.max_seq_len // cache.block_size,), jnp.int32,
                                 REPLICATED)
            args = (state, cache.shapes(), scalar, ids)
            if kind == "load_blocks":
                args += (scalar, self._abstract((self.max_seq_len,), jnp.bool_, REPLICATED))
            return self._blocks_step(kind, cache, args)
        if kind in ("decode", "mixed"):
            rows, = shape
            args = (params, state, self._abstract((self.slots,), jnp.bool_, ROWS),
                    self._abstract((rows, self.mask_words), jnp.int32, ROWS_BY_WORD), index)
            if kind == "decode":
                return self._decode_step(rows, args)
            return self._mixed_step(rows, (*args, *jax.tree.map(
                lambda a, spec: self._abstract(a.shape, a.dtype, spec),
                self._prefill_inputs(self._row_buckets[0], self.mixed_length),
                PREFILL_INPUT_SPECS)))
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
        ("decode", rows), ("mixed", rows), ("load_blocks", settings), ("save_blocks",
        settings). For sizing and
        inspection (`memory_analysis`, `as_text`)."""
        return dict(self._compiled)

    # --- one compiled program per step and shape (serving and warmup alike) ---------------

    def _prefill_inputs(self, batch: int, length: int) -> tuple:
        """Host inputs of a prefill of `batch` rows, each a padding row until filled in:
        target slots [B] (out of range: dropped), starts [B], tokens [B, T], lengths [B],
        seeds [B], SamplingParams [B], allowed [B, V], Controls [B] and [B, V], each
        position's next prompt token [B, T] (-1: none, or the prompt is not scored), and
        packed token masks [B, ceil(V / 32)] (all ones: every token)."""
        return (np.full(batch, self.slots, np.int32), np.zeros(batch, np.int32),
                np.full((batch, length), self.config.pad_token, np.int32),
                np.zeros(batch, np.int32), np.zeros(batch, np.uint32),
                SamplingParams(np.zeros(batch, np.float32), np.ones(batch, np.float32),
                               np.zeros(batch, np.int32)),
                np.ones((batch, self.config.vocab_size), bool),
                neutral_controls(batch, self.config.vocab_size),
                np.full((batch, length), -1, np.int32),
                np.full((batch, self.mask_words), -1, np.int32))

    def _prefill_arrays(self, rows: Sequence[PrefillRow], batch: int, length: int) -> tuple:
        """`_prefill_inputs` with rows filled in from each `PrefillRow`."""
        arrays = self._prefill_inputs(batch, length)
        (index, starts, tokens, lengths, seeds, sampling, allowed, controls, targets,
         masks) = arrays
        # Padding rows keep a slot out of range: their writes are dropped.
        index[:len(rows)] = [r.slot for r in rows]
        for i, r in enumerate(rows):
            s = r.request.settings
            starts[i] = r.start
            tokens[i, : r.stop - r.start] = r.request.prompt_ids[r.start:r.stop]
            lengths[i] = r.stop - r.start
            seeds[i] = _seed_bits(s.seed)
            sampling.temperature[i], sampling.top_p[i], sampling.top_k[i] = \
                s.temperature, s.top_p, s.top_k
            allowed[i] = allowed_mask(self.config, s, self.grok.tokenizer)
            fill_controls(controls, i, r.request, self.config.eos_token)
            if s.prompt_logprobs:  # each position's next prompt token
                ahead = r.request.prompt_ids[r.start + 1:r.stop + 1]
                targets[i, :len(ahead)] = ahead
            if r.mask is not None:
                masks[i] = r.mask
        return arrays

    def _init_step(self):
        return self._compiled_step(("init",), self._init_fn(), (), "empty decode state")

    def _prefill_step(self, key: tuple, args):
        _, batch, length = key
        return self._compiled_step(key, self._prefill_fn(self._reach(key)), args,
                                   f"prefill (batch {batch}, prompt bucket {length})",
                                   donate=(1,))

    def _blocks_step(self, kind: str, cache: PrefixCache, args):
        what = {"load_blocks": "copy from the prefix cache",
                "save_blocks": "copy into the prefix cache"}[kind]
        fn = _load_blocks if kind == "load_blocks" else _save_blocks
        return self._compiled_step((kind, cache.settings), fn, args, what,
                                   donate=(0,) if kind == "load_blocks" else (1,))

    def _decode_step(self, rows: int, args):
        key = ("decode", rows)
        return self._compiled_step(key, self._decode_fn(rows, self._reach(key)), args,
                                   f"decode step (rows {rows})", donate=(1,))

    def _mixed_step(self, rows: int, args):
        key = ("mixed", rows)
        return self._compiled_step(key, self._mixed_fn(rows, self._reach(key)), args,
                                   f"decode step with a prompt part (rows {rows}, part "
                                   f"{self.mixed_length})", donate=(1,))

    # --- the traced functions -------------------------------------------------------------

    def _init_fn(self):
        return init_state_fn(self.config, self.slots, self.max_seq_len, self.cache_dtype)

    def _prefill_fn(self, reach: tuple[int, ...]):
        def prefill(params, state: DecodeState, index, slots, starts, tokens, lengths, seeds,
                    sampling, allowed, controls, targets, masks):
            """Rows [Bp] continue their slots `slots` (out of range: padding) from
            `starts`; what a slot held past its start (an earlier request's) is forgotten.
            Where a row scores its prompt, `targets` [Bp, T] holds each position's next
            prompt token; with none, the step skips scoring. `masks` [Bp, ceil(V / 32)]
            narrow this draw only (a grammar's first token); `allowed` is the request's."""
            cache = _forget_past(state.cache, slots, starts)
            logits, cache, routing = self.grok.model.apply(
                params, tokens, cache, num_new=lengths, attend_len=Reach(reach, index),
                with_routing=True, rows=slots)
            state, first = _prefilled(state._replace(cache=cache), logits, slots, lengths,
                                      seeds, sampling, allowed, controls, masks)
            return (state, first, self._tally(routing, _real(tokens, lengths)),
                    score_positions(logits, targets))
        return prefill

    def _tally(self, routing, real) -> Tally | None:
        """The step's routing tally, or None (nothing computed) with statistics off."""
        if not self.grok.expert_stats:
            return None
        return tally(routing, real, self.config.num_experts)

    def _decode_fn(self, rows: int, reach: tuple[int, ...]):
        def decode(params, state: DecodeState, active, masks, index):
            """Feeds each of the first `rows` slots its last token; free slots add
            nothing to the cache (num_new 0) and their draws are ignored. `masks`
            [rows, ceil(V / 32)]: packed tokens each row may draw this step."""
            on = active[:rows]
            logits, cache, routing = self.grok.model.apply(
                params, state.tokens[:rows, None], state.cache, num_new=on.astype(jnp.int32),
                attend_len=Reach(reach, index), with_routing=True)
            state, drawn = _decoded(state._replace(cache=cache), logits, on, masks)
            return state, drawn, self._tally(routing, on[:, None])
        return decode

    def _mixed_fn(self, rows: int, reach: tuple[int, ...]):
        def mixed(params, state: DecodeState, active, masks, index, slots, starts, tokens,
                  lengths, seeds, sampling, allowed, controls, targets, prefill_masks):
            """A decode step of the first `rows` slots (as `decode`) and a prefill (as
            `prefill`) in one pass of the model. A prefilled slot is not decoding, so
            the two touch different slots, but for a free row among the first `rows`:
            its decode part writes a meaningless key at the slot's start, which the
            prefill part, written after it, overwrites."""
            on = active[:rows]
            cache = _forget_past(state.cache, slots, starts)
            (decode_logits, prefill_logits), cache, (decode_routing, prefill_routing) = \
                self.grok.model.apply(
                    params, (Segment(state.tokens[:rows, None], on.astype(jnp.int32)),
                             Segment(tokens, lengths, slots)),
                    cache, attend_len=Reach(reach, index), with_routing=True)
            state, drawn = _decoded(state._replace(cache=cache), decode_logits, on, masks)
            state, first = _prefilled(state, prefill_logits, slots, lengths, seeds, sampling,
                                      allowed, controls, prefill_masks)
            return (state, drawn, first, self._tally(decode_routing, on[:, None]),
                    self._tally(prefill_routing, _real(tokens, lengths)),
                    score_positions(prefill_logits, targets))
        return mixed

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
        scores_out = PromptScores(*(replicated,) * 4)
        return {"init": self._state_shardings,
                "prefill": (self._state_shardings, sample_out, tally_out, scores_out),
                "decode": (self._state_shardings, sample_out, tally_out),
                "mixed": (self._state_shardings, sample_out, sample_out, tally_out, tally_out,
                          scores_out),
                "load_blocks": self._state_shardings,
                "save_blocks": self._shardings(POOL_SPECS)}[kind]

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


def _real(tokens, lengths):  # bool[B, T]: a row's first `lengths` tokens are its own
    return jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]


def _forget_past(cache: KVCache, slots, starts) -> KVCache:
    """The cache with slots `slots` [Bp] (out of range: none) cut back to their first
    `starts` positions: what a slot held past a prefill's start (an earlier request's) is
    forgotten."""
    kept = (cache.key_valid.at[slots].get(mode="fill", fill_value=False)
            & (jnp.arange(cache.max_len)[None, :] < starts[:, None]))  # [Bp, S]
    return cache._replace(lengths=cache.lengths.at[slots].set(starts, mode="drop"),
                          key_valid=cache.key_valid.at[slots].set(kept, mode="drop"))


def _prefilled(state: DecodeState, logits, slots, lengths, seeds, sampling, allowed,
               controls, masks) -> tuple[DecodeState, Sample]:
    """Each prefilled row's first draw, from the logits [Bp, T, V] of its last real token,
    and the state of its slot set for decoding: the draw as the token to feed next, its
    request's seed, sampling, allowed tokens and controls (padding rows: nothing)."""
    last_index = jnp.maximum(lengths - 1, 0)[:, None, None]
    last = jnp.take_along_axis(logits, last_index, axis=1)[:, 0]
    none = jnp.zeros_like(lengths)  # tokens generated before the first
    counts = jnp.zeros(allowed.shape, jnp.int32)
    drawable = allowed & unpack_token_mask(masks, allowed.shape[1])
    first = sample(last.astype(jnp.float32), _keys(seeds, none), sampling,
                   bar_stop_tokens(drawable, controls, none), controls, counts)

    def put(full, rows):  # per-slot values [B, ...] <- [Bp, ...]
        return full.at[slots].set(rows, mode="drop")

    return DecodeState(
        state.cache, put(state.tokens, first.tokens), put(state.steps, none),
        put(state.seeds, seeds),
        SamplingParams(*(put(a, b) for a, b in zip(state.sampling, sampling, strict=True))),
        put(state.allowed, allowed),
        Controls(*(put(a, b) for a, b in zip(state.controls, controls, strict=True))),
        put(state.counts, count_tokens(counts, first.tokens, jnp.ones_like(lengths)))), first


def _decoded(state: DecodeState, logits, on, masks) -> tuple[DecodeState, Sample]:
    """The draws of a decode step's first B rows from their logits [B, 1, V], and the
    state advanced by them where `on` [B] (free rows draw, ignored, and keep their
    counts). `masks` [B, ceil(V / 32)]: packed tokens each row may draw this step."""
    rows = on.shape[0]
    steps = state.steps[:rows] + on  # the tokens each row generated before this draw
    sampling = SamplingParams(*(x[:rows] for x in state.sampling))
    controls = Controls(*(x[:rows] for x in state.controls))
    counts = state.counts[:rows]
    allowed = bar_stop_tokens(
        state.allowed[:rows] & unpack_token_mask(masks, state.allowed.shape[1]),
        controls, steps)
    drawn = sample(logits[:, 0].astype(jnp.float32), _keys(state.seeds[:rows], steps),
                   sampling, allowed, controls, counts)
    counts = count_tokens(counts, drawn.tokens, on.astype(jnp.int32))
    return state._replace(tokens=state.tokens.at[:rows].set(drawn.tokens),
                          steps=state.steps.at[:rows].set(steps),
                          counts=state.counts.at[:rows].set(counts)), drawn


def score_positions(logits, targets) -> PromptScores:
    """Per position of logits [B, T, V]: the log-probability of `targets` [B, T] (0 where
    -1), its rank and the most likely tokens, of the float32 log-softmax; all zeros, and
    nothing computed, where no position has a target."""
    batch, length, vocab = logits.shape
    top = min(TOP_ALTERNATIVES, vocab)

    def score(logits, targets):
        # A token's number and the best alternatives' are the same arithmetic, so the
        # argmax's are equal (lm_eval's greedy test compares them).
        chosen, normalizer = target_logits(logits, targets)  # [B, T, 1], [B, T]
        rank = 1 + jnp.sum(logits > chosen, axis=-1, dtype=jnp.int32)
        top_logits, top_ids = jax.lax.top_k(logits, top)
        logprob = chosen[..., 0].astype(jnp.float32) - normalizer
        return PromptScores(jnp.where(targets >= 0, logprob, 0.0), rank,
                            top_ids.astype(jnp.int32),
                            top_logits.astype(jnp.float32) - normalizer[..., None])

    def nothing(logits, targets):
        return PromptScores(jnp.zeros((batch, length), jnp.float32),
                            jnp.zeros((batch, length), jnp.int32),
                            jnp.zeros((batch, length, top), jnp.int32),
                            jnp.zeros((batch, length, top), jnp.float32))

    return jax.lax.cond(jnp.any(targets >= 0), score, nothing, logits, targets)


def _row_of_blocks(blocks: jax.Array) -> jax.Array:  # [L, M, K, b, C] -> [L, K, M * b, C]
    layers, m, k, b, c = blocks.shape
    return blocks.transpose(0, 2, 1, 3, 4).reshape(layers, k, m * b, c)


def _load_blocks(state: DecodeState, pool: BlockPool, slot, ids, cached, valid
                 ) -> DecodeState:
    """Pool blocks `ids` [M] (out of range: zeros) into the first M blocks of slot `slot`,
    which then holds `cached` tokens, `valid` [S] marking its non-pad ones."""
    def put(full, blocks):  # [L, B, K, S, C] <- the blocks, as one row [L, K, M * b, C]
        row = _row_of_blocks(blocks.at[:, ids].get(mode="fill", fill_value=0))
        return jax.lax.dynamic_update_slice(full, row[:, None].astype(full.dtype),
                                            (0, slot, 0, 0, 0))
    cache = state.cache
    return state._replace(cache=KVCache(put(cache.k, pool.k), put(cache.v, pool.v),
                                        cache.lengths.at[slot].set(cached),
                                        cache.key_valid.at[slot].set(valid)))


def _save_blocks(state: DecodeState, pool: BlockPool, slot, ids) -> BlockPool:
    """The first M blocks of slot `slot` into pool blocks `ids` [M] (out of range:
    skipped)."""
    def put(blocks, full):  # [L, N, K, b, C] <- row `slot` of [L, B, K, S, C]
        layers, _, k, b, c = blocks.shape
        m = ids.shape[0]
        row = jax.lax.dynamic_slice(full, (0, slot, 0, 0, 0), (layers, 1, k, m * b, c))[:, 0]
        split = row.reshape(layers, k, m, b, c).transpose(0, 2, 1, 3, 4)
        return blocks.at[:, ids].set(split.astype(blocks.dtype), mode="drop")
    return BlockPool(put(pool.k, state.cache.k), put(pool.v, state.cache.v))


# Prompt tokens per prefill chunk, the server's and grok-plan's default. On the CPU bench
# model any chunk reads every expert's weights, as a decode step does; 16 tokens cost about
# one more step (README, "Prefix caching and chunked prefill"). On an accelerator a chunk of
# 512 is about where a step stops costing its weight reads alone (see `Buckets`).
CPU_PREFILL_CHUNK = 16
PREFILL_CHUNK = 512


def default_prefill_chunk(platform: str) -> int:
    return CPU_PREFILL_CHUNK if platform == "cpu" else PREFILL_CHUNK


def check_steps(prefill_chunk: int | None, deterministic: bool, flags: bool = False) -> None:
    """An engine's step settings (None: whole prompts), checked before it is built; with
    `flags`, the messages name the command-line flags (where 0 means whole prompts)."""
    chunk, off, exact = (("--prefill-chunk", "0", "--deterministic") if flags
                         else ("prefill chunk", "None", "deterministic steps"))
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool)
                                      or not isinstance(prefill_chunk, int)
                                      or prefill_chunk < 1 or prefill_chunk & (prefill_chunk - 1)):
        raise GrokError(f"{chunk} must be a power of two, or {off} for whole prompts; got "
                        f"{prefill_chunk!r:.40}")
    if deterministic and prefill_chunk is None:
        raise GrokError(f"{exact} prefill in chunks (their one prefill shape): give "
                        f"{chunk} a power of two, not {off}")
