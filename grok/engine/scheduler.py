"""Continuous batching: requests wait in a queue, take free slots between decode steps, and
give their slot back the moment they finish or are cancelled.

The scheduler is plain Python around the engine's three compiled steps and is not
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

from grok.engine.engine import Engine
from grok.engine.request import Event, Request
from grok.engine.rows import Row


class QueueFull(Exception):
    """More requests wait than the queue holds: try again later."""


@dataclasses.dataclass(frozen=True)
class Stats:
    """Work done since the scheduler was made."""

    prefill_s: float = 0.0  # prefills into slots, until the first draws are on the host
    prefill_tokens: int = 0
    decode_s: float = 0.0
    decode_tokens: int = 0  # tokens drawn by decode steps (not counting first tokens)
    decode_steps: int = 0


class Scheduler:
    """Slots, a waiting queue and the decode state of one engine."""

    def __init__(self, engine: Engine, max_queue: int | None = None, shrink_rows: bool = True):
        """`shrink_rows`: decode only up to the last slot in use (a smaller compiled batch
        as rows finish; what a server wants), or always all slots (fewer programs to
        compile; what a one-off batch wants)."""
        self.engine = engine
        self.max_queue = max_queue
        self.shrink_rows = shrink_rows
        self._state = engine.init_state()
        self._waiting: collections.deque[tuple[int, Request]] = collections.deque()
        self._rows: list[Row | None] = [None] * engine.slots  # per slot
        self._ids: list[int | None] = [None] * engine.slots
        self._active = np.zeros(engine.slots, bool)
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
        return int(self._active.sum())

    @property
    def has_work(self) -> bool:
        return bool(self._waiting) or bool(self._active.any())

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
        """Drops a waiting request or frees a running one's slot; no events follow.
        Returns whether the request was still there."""
        for i, (rid, _) in enumerate(self._waiting):
            if rid == request_id:
                del self._waiting[i]
                return True
        if request_id in self._ids:
            self._free(self._ids.index(request_id))
            return True
        return False

    def step(self) -> list[Event]:
        """Admits waiting requests into free slots, then advances every running one by a
        token. Returns the events of this step, in slot order after admission order."""
        events: list[Event] = []
        self._admit(events)
        if self._active.any():
            self._decode(events)
        return events

    # --- inside ----------------------------------------------------------------------------

    def _clock(self) -> float:
        """Seconds of work, not counting compiles (which `Engine.compile_seconds` counts)."""
        return time.perf_counter() - self.engine.compile_seconds

    def _free(self, slot: int) -> None:
        self._rows[slot] = self._ids[slot] = None
        self._active[slot] = False
        self._active_on_device = None

    def _accept(self, slot: int, token, logprob, top_ids, top_logprobs) -> Event:
        row, rid = self._rows[slot], self._ids[slot]
        top = [(int(t), float(lp)) for t, lp in zip(top_ids, top_logprobs, strict=True)]
        text = row.accept(int(token), float(logprob), top)
        completion = None
        if row.finished:
            completion = row.completion()
            self._free(slot)
        return Event(rid, int(token), float(logprob), tuple(top), text, completion)

    def _admit(self, events: list[Event]) -> None:
        free = [s for s in range(self.engine.slots) if self._rows[s] is None]
        taken = [self._waiting.popleft() for _ in range(min(len(free), len(self._waiting)))]
        groups = [[taken[i] for i in group] for group in self.engine.prefill_groups(
            [len(request.prompt_ids) for _, request in taken])]
        tokenizer = self.engine.grok.tokenizer
        eos = self.engine.config.eos_token
        for group in groups:
            start = self._clock()
            slots = free[: len(group)]
            free = free[len(group):]
            self._state, first = self.engine.prefill([request for _, request in group],
                                                     self._state, slots)
            self.stats = dataclasses.replace(
                self.stats, prefill_s=self.stats.prefill_s + self._clock() - start,
                prefill_tokens=self.stats.prefill_tokens
                + sum(len(r.prompt_ids) for _, r in group))
            for i, ((rid, request), slot) in enumerate(zip(group, slots, strict=True)):
                decoder = None if tokenizer is None else tokenizer.stream_decoder()
                self._rows[slot], self._ids[slot] = Row(request, eos, decoder), rid
                self._active[slot] = True
                self._active_on_device = None
                events.append(self._accept(slot, first.tokens[i], first.logprobs[i],
                                           first.top_ids[i], first.top_logprobs[i]))

    def _decode(self, events: list[Event]) -> None:
        start = self._clock()
        if self._active_on_device is None:
            self._active_on_device = self.engine.put_active(self._active)
        in_use = np.flatnonzero(self._active)
        rows = self.engine.rows_for(int(in_use[-1]) + 1) if self.shrink_rows \
            else self.engine.slots
        filled = max(self._rows[s].filled for s in in_use)
        self._state, drawn = self.engine.generate(self._state, self._active_on_device,
                                                  rows, filled)
        for slot in in_use:
            events.append(self._accept(slot, drawn.tokens[slot], drawn.logprobs[slot],
                                       drawn.top_ids[slot], drawn.top_logprobs[slot]))
        s = self.stats
        self.stats = dataclasses.replace(
            s, decode_s=s.decode_s + self._clock() - start,
            decode_tokens=s.decode_tokens + len(in_use), decode_steps=s.decode_steps + 1)
