"""Continuous batching: requests wait in a queue, take free slots between decode steps, and
give their slot back the moment they finish or are cancelled.

Each step admits waiting requests into free slots (copying in the blocks of their prompt
that the model's prefix cache holds), prefills, then advances every running request by a
token. With a prefill chunk, while requests decode, every prompt in progress advances by a
chunk per step, all in one batch: a long prompt costs the running requests a chunk's
arithmetic per step, not its whole prefill, and a burst of short prompts a stall in
proportion to the burst, not one step per prompt. A lone chunk (the steady state: requests
arriving one at a time) rides inside the decode step (`Engine.prefill_and_generate`, as
Sarathi-Serve does), which then reads the weights once for both. With no one decoding,
waiting prompts are prefilled at once, batched. A request whose next uncached block another
request is about to compute waits for it (SGLang's in-batch prefix sharing), so that
prompts sent together with a shared preamble compute it once.

The scheduler is plain Python around the engine's compiled steps and is not
thread-safe: one thread owns it and every JAX call (the server's device thread, or the
caller of `Grok.generate`). Its decisions depend only on the order of `submit`, `cancel`
and `step` calls and on the drawn tokens, so processes of a multi-process run that make the
same calls stay in step.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import numpy as np

from grok.engine.engine import Engine, PrefillRow
from grok.engine.prefix_cache import block_keys
from grok.engine.request import Event, Request
from grok.engine.rows import Row


class QueueFull(Exception):
    """More requests wait than the queue holds: try again later."""


@dataclasses.dataclass(frozen=True)
class Stats:
    """Work done since the scheduler was made."""

    prefill_s: float = 0.0  # prefills into slots, until the first draws are on the host
    prefill_tokens: int = 0  # prompt tokens computed
    cached_tokens: int = 0  # prompt tokens copied in from the prefix cache instead
    queried_tokens: int = 0  # prompt tokens of requests admitted with the prefix cache on
    decode_s: float = 0.0  # decode steps, those carrying a prompt's chunk included
    decode_tokens: int = 0  # tokens drawn by decode steps (not counting first tokens)
    decode_steps: int = 0
    mixed_steps: int = 0  # decode steps that carried a prompt's chunk


@dataclasses.dataclass
class _Slot:
    """A running request: prefilled up to `prefilled`, then decoded."""

    rid: int
    row: Row
    prefilled: int  # prompt tokens its slot's cache holds
    keys: list[bytes]  # chained keys of its prompt's full blocks (prefix cache on)
    blocks: list[int]  # pool blocks it holds, released when it ends
    matched: int  # leading blocks that came from the pool

    @property
    def prompt_len(self) -> int:
        return len(self.row.request.prompt_ids)

    @property
    def decoding(self) -> bool:
        return self.prefilled == self.prompt_len


class Scheduler:
    """Slots, a waiting queue and the decode state of one engine."""

    def __init__(self, engine: Engine, max_queue: int | None = None, shrink_rows: bool = True):
        """`shrink_rows`: decode only up to the last slot in use (a smaller compiled batch
        as rows finish; what a server wants), or always all slots (fewer programs to
        compile; what a one-off batch wants)."""
        self.engine = engine
        self.max_queue = max_queue
        self.shrink_rows = shrink_rows
        self.prefix_cache = engine.grok.prefix_cache
        self._state = engine.init_state()
        self._waiting: collections.deque[tuple[int, Request]] = collections.deque()
        self._slots: list[_Slot | None] = [None] * engine.slots
        self._prefilling: list[int] = []  # slots not yet decoding, in admission order
        self._active = np.zeros(engine.slots, bool)  # slots decoding
        self._active_on_device = None  # uploaded copy of _active, None when stale
        self._next_id = 0
        self.stats = Stats()

    # --- what callers see ----------------------------------------------------------------

    @property
    def max_batch(self) -> int:
        return self.engine.slots

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests holding a slot (prefilling or decoding)."""
        return sum(s is not None for s in self._slots)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting) or any(s is not None for s in self._slots)

    def submit(self, request: Request) -> int:
        """Queues a checked request (see `Engine.make_request`); returns its id."""
        if self.max_queue is not None and len(self._waiting) >= self.max_queue:
            raise QueueFull(f"{len(self._waiting)} requests are waiting, the most the queue "
                            f"holds")
        rid = self._next_id
        self._next_id += 1
        self._waiting.append((rid, request))
        return rid

    def cancel(self, request_id: int) -> bool:
        """Drops a waiting request or frees a running one's slot (and the cached blocks it
        holds); no events follow. Returns whether the request was still there."""
        for i, (rid, _) in enumerate(self._waiting):
            if rid == request_id:
                del self._waiting[i]
                return True
        for slot, held in enumerate(self._slots):
            if held is not None and held.rid == request_id:
                self._free(slot)
                return True
        return False

    def step(self) -> list[Event]:
        """Admits waiting requests into free slots, prefills, then advances every decoding
        request by a token. With a prefill chunk and requests decoding, every prompt in
        progress advances by a chunk (one prefill of their next chunks, or that chunk
        inside the decode step when it is the only one). Returns the events of this step:
        first tokens in prefill order, then the decode step's in slot order."""
        events: list[Event] = []
        self._admit()
        if self._prefilling and self._active.any() and self.engine.prefill_chunk is not None:
            parts = self._next_prefill()
            if len(parts) == 1 and self.engine.mixes:
                self._decode(events, parts[0])
                return events
            self._prefill(events, parts)
        else:
            while self._prefilling:  # with no one to delay (or no chunk): every prompt
                self._prefill(events, self._next_prefill())
        if self._active.any():
            self._decode(events)
        return events

    # --- inside ----------------------------------------------------------------------------

    def _clock(self) -> float:
        """Seconds of work, not counting compiles (which `Engine.compile_seconds` counts)."""
        return time.perf_counter() - self.engine.compile_seconds

    def _free(self, slot: int) -> None:
        held = self._slots[slot]
        if self.prefix_cache is not None:
            self.prefix_cache.index.release(held.blocks)
        self._slots[slot] = None
        if slot in self._prefilling:
            self._prefilling.remove(slot)
        self._active[slot] = False
        self._active_on_device = None

    def _accept(self, slot: int, token, logprob, top_ids, top_logprobs) -> Event:
        held = self._slots[slot]
        top = [(int(t), float(lp)) for t, lp in zip(top_ids, top_logprobs, strict=True)]
        text = held.row.accept(int(token), float(logprob), top)
        completion = None
        if held.row.finished:
            completion = held.row.completion()
            self._free(slot)
        first = len(held.row.output_ids) == 1
        return Event(held.rid, int(token), float(logprob), tuple(top), text, completion,
                     held.row.prompt_scores if first else None)

    def _end_prompt_only(self, slot: int) -> Event:
        """The one event of a request of max_new_tokens 0, once its prompt is in."""
        held = self._slots[slot]
        held.row.finish_prompt_only()
        completion = held.row.completion()
        self._free(slot)
        return Event(held.rid, None, None, (), "", completion, held.row.prompt_scores)

    def _admit(self) -> None:
        """Waiting requests into free slots, in order, with their cached blocks copied in;
        one whose next block another prefilling request computes waits for it."""
        free = [s for s in range(self.engine.slots) if self._slots[s] is None]
        cache = self.prefix_cache
        block = cache.block_size if cache is not None else 0
        usable = cache is not None and self.engine.max_seq_len >= block
        coming = {key for slot in self._prefilling
                  for key in self._slots[slot].keys[self._slots[slot].matched:]}
        deferred: list[tuple[int, Request]] = []
        tokenizer = self.engine.grok.tokenizer
        while free and self._waiting:
            rid, request = self._waiting.popleft()
            n = len(request.prompt_ids)
            keys = block_keys(request.prompt_ids, block) if usable else []
            # At most the blocks before the last token: it is always computed, for its
            # logits. A request scoring its prompt computes every token.
            reads = usable and not request.settings.prompt_logprobs
            matched = cache.index.match(keys[:(n - 1) // block]) if reads else []
            if self.engine.deterministic:  # prefills start at multiples of the chunk
                while len(matched) * block % self.engine.prefill_chunk:
                    matched.pop()
            if len(matched) < (n - 1) // max(block, 1) and reads \
                    and keys[len(matched)] in coming:
                deferred.append((rid, request))
                continue
            slot = free.pop(0)
            decoder = None if tokenizer is None else tokenizer.stream_decoder()
            row = Row(request, self.engine.config.eos_token, decoder, len(matched) * block)
            self._slots[slot] = _Slot(rid, row, len(matched) * block, keys, list(matched),
                                      len(matched))
            self._prefilling.append(slot)
            coming.update(keys[len(matched):])
            if usable:
                cache.index.acquire(matched)
                self.stats = dataclasses.replace(
                    self.stats, cached_tokens=self.stats.cached_tokens + row.cached_tokens,
                    queried_tokens=self.stats.queried_tokens + n)
            if matched:
                self._state = self.engine.load_blocks(self._state, cache, slot, matched,
                                                      request.prompt_ids)
        self._waiting.extendleft(reversed(deferred))

    def _next_part(self, slot: int) -> PrefillRow:
        """The next chunk of a prefilling request's prompt (the rest of it, without a
        prefill chunk)."""
        held, chunk = self._slots[slot], self.engine.prefill_chunk
        stop = held.prompt_len if chunk is None else min(held.prompt_len,
                                                         held.prefilled + chunk)
        return PrefillRow(held.row.request, slot, held.prefilled, stop, _mask(held.row))

    def _next_prefill(self) -> list[PrefillRow]:
        """The next prefill's rows, from the first prefilling request on: with a prefill
        chunk, each request's next chunk (in deterministic steps, the first request's
        only), as many as one prefill takes; without, whole prompts of the first one's
        bucket (or the rest of its prompt alone, after a cached prefix)."""
        engine = self.engine
        if engine.deterministic:
            return [self._next_part(self._prefilling[0])]
        if engine.prefill_chunk is not None:
            rows: list[PrefillRow] = []
            for slot in self._prefilling:
                part = self._next_part(slot)
                longest = max(r.stop - r.start for r in [*rows, part])
                if rows and len(rows) >= engine.max_prefill_batch(
                        engine.prompt_bucket(longest)):
                    break
                rows.append(part)
            return rows
        first = self._slots[self._prefilling[0]]
        if first.prefilled > 0:
            return [self._next_part(self._prefilling[0])]
        length = engine.prompt_bucket(first.prompt_len)
        rows = []
        for slot in self._prefilling:
            held = self._slots[slot]
            if held.prefilled > 0 or engine.prompt_bucket(held.prompt_len) != length:
                continue
            if len(rows) == engine.max_prefill_batch(length):
                break
            rows.append(PrefillRow(held.row.request, slot, 0, held.prompt_len,
                                   _mask(held.row)))
        return rows

    def _prefill(self, events: list[Event], rows: list[PrefillRow]) -> None:
        """One prefill; finished prompts start decoding with their first token."""
        start = self._clock()
        self._state, first, scores = self.engine.prefill(rows, self._state)
        self._prefilled(rows, first, scores, events)
        self.stats = dataclasses.replace(
            self.stats, prefill_s=self.stats.prefill_s + self._clock() - start)

    def _prefilled(self, rows: list[PrefillRow], first, scores, events: list[Event]) -> None:
        """Books prefilled parts: prompts finished start decoding with their first token
        (or end, asking for none)."""
        computed = sum(r.stop - r.start for r in rows)
        self.stats = dataclasses.replace(
            self.stats, prefill_tokens=self.stats.prefill_tokens + computed)
        for i, r in enumerate(rows):
            held = self._slots[r.slot]
            held.prefilled = r.stop
            if held.row.prompt_scores is not None:
                held.row.score_prompt(r.start, *(x[i] for x in scores))
            if not r.final:
                continue
            self._prefilling.remove(r.slot)
            self._save_blocks(r.slot)
            if r.request.settings.max_new_tokens == 0:
                events.append(self._end_prompt_only(r.slot))
                continue
            self._active[r.slot] = True
            self._active_on_device = None
            events.append(self._accept(r.slot, first.tokens[i], first.logprobs[i],
                                       first.top_ids[i], first.top_logprobs[i]))

    def _save_blocks(self, slot: int) -> None:
        """A prefilled prompt's full blocks that the pool lacks go into it (as many as
        blocks no running request holds allow); the request holds them until it ends."""
        held, cache = self._slots[slot], self.prefix_cache
        if cache is None or len(held.keys) == held.matched:
            return
        claimed = cache.index.claim(held.keys[held.matched:])
        if claimed:
            held.blocks += [block for _, block in claimed]
            cache.pool = self.engine.save_blocks(
                self._state, cache, slot, {held.matched + i: block for i, block in claimed})

    def _decode(self, events: list[Event], part: PrefillRow | None = None) -> None:
        """A token for every decoding request; with `part`, that prompt part is prefilled
        in the same step (its first token, if any, comes first among the events)."""
        start = self._clock()
        if self._active_on_device is None:
            self._active_on_device = self.engine.put_active(self._active)
        in_use = np.flatnonzero(self._active)
        rows = self.engine.rows_for(int(in_use[-1]) + 1) if self.shrink_rows \
            else self.engine.slots
        filled = max(self._slots[s].row.filled for s in in_use)
        masks = {int(s): self._slots[s].row.matcher.mask for s in in_use
                 if self._slots[s].row.matcher is not None}
        if part is None:
            self._state, drawn = self.engine.generate(self._state, self._active_on_device,
                                                      rows, filled, masks)
        else:
            self._state, drawn, first, scores = self.engine.prefill_and_generate(
                part, self._state, self._active_on_device, rows, filled, masks)
            self._prefilled([part], first, scores, events)
        for slot in in_use:
            events.append(self._accept(slot, drawn.tokens[slot], drawn.logprobs[slot],
                                       drawn.top_ids[slot], drawn.top_logprobs[slot]))
        s = self.stats
        self.stats = dataclasses.replace(
            s, decode_s=s.decode_s + self._clock() - start,
            decode_tokens=s.decode_tokens + len(in_use), decode_steps=s.decode_steps + 1,
            mixed_steps=s.mixed_steps + (part is not None))


def _mask(row: Row):
    """The packed tokens a row's next draw may take (its grammar's), or None for all."""
    return None if row.matcher is None else row.matcher.mask
