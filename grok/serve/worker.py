"""The device thread: the one thread that owns the scheduler and makes every JAX call.

HTTP handlers run on the asyncio loop and never touch the device. They take room from an
`Admission` counter (bounded: `--max-batch` running plus `--max-queue` waiting; beyond it
the handler answers 429), then hand their requests to this thread through its inbox, and
receive tokens on an asyncio queue of their own that this thread feeds with
`loop.call_soon_threadsafe` (one call per request per step). Between scheduler steps the
thread drains its inbox into a `StepPlan` (submits, cancels, stop), shares it with the
other processes of a multi-process run, applies it, and steps. A cancelled request (its
client went away) leaves its slot before the next step.

Like JetStream's orchestrator, this sits between the engine and the server; unlike it,
the queue is bounded and a disconnect frees the slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from grok.engine.request import Event, Request
from grok.errors import GrokError
from grok.serve.metrics import Metrics
from grok.serve.plan import LocalChannel, NewRequest, StepPlan

log = logging.getLogger("grok.serve")


@dataclasses.dataclass(frozen=True)
class Failure:
    """How a request ended when it did not complete: the HTTP status and why."""

    status: int
    message: str


class Ticket:
    """One HTTP request's engine requests (its choices), as its handler sees them: lists of
    (choice index, `Event` or `Failure`) arrive on `queue`, one list per step."""

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int):
        self.loop = loop
        self.count = count
        self.queue: asyncio.Queue[list[tuple[int, Event | Failure]]] = asyncio.Queue()
        self.keys: tuple[int, ...] = ()

    def deliver(self, items: list[tuple[int, Event | Failure]]) -> None:
        """Called on the device thread; the loop may already be closed at shutdown."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, items)


class Admission:
    """Engine requests accepted and not yet ended, against a fixed capacity. Handlers take,
    the device thread gives back as requests end (finished, cancelled or failed), so the
    count is exact whatever the order of events."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._count = 0
        self._lock = threading.Lock()

    def try_take(self, n: int) -> bool:
        with self._lock:
            if self._count + n > self.capacity:
                return False
            self._count += n
            return True

    def give_back(self, n: int) -> None:
        with self._lock:
            self._count -= n
            assert self._count >= 0

    @property
    def in_flight(self) -> int:
        return self._count


@dataclasses.dataclass
class _Submit:
    ticket: Ticket
    requests: Sequence[Request]
    arrival: float


@dataclasses.dataclass
class _Cancel:
    keys: tuple[int, ...]


class _Stop:
    pass


@dataclasses.dataclass
class _Live:
    """Process 0's record of one engine request in flight."""

    ticket: Ticket
    index: int
    arrival: float
    last: float | None = None  # when its latest token arrived


class Worker:
    """Runs `build()` (load, compile, warm up: returns the engine), then the device loop.

    `state`: "loading", "ready", "stopped" or "failed". Process 0 calls `start()` and feeds
    it from handlers; the other processes of a multi-process run call `follow()`.
    """

    def __init__(self, build: Callable[[], Any], *, admission: Admission,
                 metrics: Metrics | None = None, channel=None, idle_s: float = 1.0):
        self._build = build
        self.admission = admission
        self.metrics = metrics
        self.channel = channel or LocalChannel()
        self.idle_s = idle_s  # longest wait for work while idle (a plan goes out after it)
        self.state = "loading"
        self.engine: Any = None
        self.scheduler: Any = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._keys = itertools.count()
        self._key_lock = threading.Lock()
        self._rid: dict[int, int] = {}  # key -> scheduler's request id
        self._key: dict[int, int] = {}  # scheduler's request id -> key
        self._live: dict[int, _Live] = {}  # key -> handler side (process 0 only)
        self._counted = (0, 0, 0, 0)  # prompt tokens computed, queried, hit; evictions
        self._thread: threading.Thread | None = None

    # --- the handlers' side (any thread) ------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="grok-device", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.state == "ready"

    def submit(self, ticket: Ticket, requests: Sequence[Request]) -> None:
        """Queues a ticket's requests (room already taken from `admission`)."""
        with self._key_lock:
            ticket.keys = tuple(next(self._keys) for _ in requests)
        self._inbox.put(_Submit(ticket, requests, time.monotonic()))

    def cancel(self, ticket: Ticket) -> None:
        """Ends a ticket's requests that are still queued or running; no more events come."""
        if ticket.keys:
            self._inbox.put(_Cancel(ticket.keys))

    def stop(self, timeout: float | None = None) -> None:
        """Ends the loop: requests still in flight end with a 503 `Failure`."""
        self._inbox.put(_Stop())
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # --- the device thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.load()
        except BaseException:
            log.exception("loading the model failed")
            self.state = "failed"
            return
        try:
            self._loop(lead=True)
            self.state = "stopped"
        except BaseException:
            log.exception("the device loop failed")
            self.state = "failed"
            self._end_all(Failure(500, "internal error: the device loop failed"), "failed")

    def load(self) -> None:
        from grok.engine.scheduler import Scheduler

        self.engine = self._build()
        self.scheduler = Scheduler(self.engine)
        self.state = "ready"

    def follow(self) -> None:
        """The loop of a process other than 0: apply process 0's plans until it stops."""
        self.load()
        self._loop(lead=False)
        self.state = "stopped"

    def _loop(self, lead: bool) -> None:
        while True:
            if lead:
                plan, originals = self._gather(block=not self.scheduler.has_work)
                plan = self.channel.share(plan)
            else:
                plan, originals = self.channel.share(None), {}
            self._apply(plan, originals)
            if plan.stop:
                return
            if self.scheduler.has_work:
                self._step()
            self._update_gauges()

    def _gather(self, block: bool) -> tuple[StepPlan, dict[int, Request]]:
        """Everything the inbox holds (waiting up to `idle_s` for something, when idle)."""
        commands = []
        try:
            commands.append(self._inbox.get(timeout=self.idle_s) if block
                            else self._inbox.get_nowait())
            while True:
                commands.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        submits, cancels, originals, stop = [], [], {}, False
        for command in commands:
            if isinstance(command, _Submit):
                for index, (key, request) in enumerate(zip(command.ticket.keys,
                                                           command.requests, strict=True)):
                    if stop:  # arrived after the stop: never started
                        self.admission.give_back(1)
                        command.ticket.deliver([(index, Failure(503, "the server is "
                                                                     "shutting down"))])
                        continue
                    self._live[key] = _Live(command.ticket, index, command.arrival)
                    originals[key] = request
                    submits.append(NewRequest(key, request.prompt_ids, request.settings))
            elif isinstance(command, _Cancel):
                cancels.extend(command.keys)
            else:
                stop = True
        return StepPlan(tuple(submits), tuple(cancels), stop), originals

    def _apply(self, plan: StepPlan, originals: dict[int, Request]) -> None:
        for new in plan.submits:
            request = originals.get(new.key) or new.request(self._compile_structure)
            try:
                rid = self.scheduler.submit(request)
            except GrokError as e:  # the same on every process: all skip it
                self._end(new.key, "failed", Failure(400, str(e)))
                continue
            self._rid[new.key], self._key[rid] = rid, new.key
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(len(request.prompt_ids))
        for key in plan.cancels:
            rid = self._rid.pop(key, None)
            if rid is not None:
                del self._key[rid]
                self.scheduler.cancel(rid)
                self._end(key, "cancelled", None)
        if plan.stop:
            for rid in list(self._key):
                self.scheduler.cancel(rid)
            self._end_all(Failure(503, "the server is shutting down"), "cancelled")

    def _compile_structure(self, structure):
        """A follower's compile of a structure process 0 accepted: waited for here, and
        a failure is this process's fault (it stops the loop), not the request's."""
        compiler = self.engine.grok.grammars
        compiler.timeout_s = None  # it compiled in time on process 0: no limit here
        try:
            return compiler.compile(structure)
        except GrokError as e:
            raise RuntimeError(f"process 0 compiled a structure this process cannot: {e}"
                               ) from None

    def _step(self) -> None:
        try:
            events = self.scheduler.step()
        except Exception:
            # A bug or a failing device, not a request's fault: the requests in flight end
            # with a 500, the slots are freed, and the loop carries on for new requests.
            log.exception("a scheduler step failed; ending the requests in flight")
            for rid in list(self._key):
                try:
                    self.scheduler.cancel(rid)
                except Exception:
                    log.exception("cancelling request %d after the failure failed", rid)
            self._end_all(Failure(500, "internal error while generating"), "failed")
            return
        now = time.monotonic()
        batches: dict[int, tuple[Ticket, list]] = {}
        for event in events:
            key = self._key.get(event.request_id)
            if key is None:
                continue
            live = self._live.get(key)
            if live is not None:
                self._observe(live, event, now)
                batches.setdefault(id(live.ticket), (live.ticket, []))[1].append(
                    (live.index, event))
            if event.completion is not None:
                del self._key[event.request_id]
                del self._rid[key]
                self._end(key, event.completion.finish_reason, None)
        for ticket, items in batches.values():
            ticket.deliver(items)

    def _observe(self, live: _Live, event: Event, now: float) -> None:
        m = self.metrics
        if m is None:
            return
        if event.token is not None:  # None: a prompt scored, nothing drawn
            m.generation_tokens.inc()
            if live.last is None:
                m.ttft.observe(now - live.arrival)
            else:
                m.itl.observe(now - live.last)
            live.last = now
        if event.completion is not None:
            m.e2e.observe(now - live.arrival)

    def _end(self, key: int, reason: str, failure: Failure | None) -> None:
        """A request is over: its room goes back, and a failure goes to its handler."""
        live = self._live.pop(key, None)
        if live is None:
            return  # another process's request, or already ended
        self.admission.give_back(1)
        if self.metrics is not None:
            self.metrics.finished.labels(reason).inc()
        if failure is not None:
            live.ticket.deliver([(live.index, failure)])

    def _end_all(self, failure: Failure, reason: str) -> None:
        self._rid.clear()
        self._key.clear()
        for key in list(self._live):
            self._end(key, reason, failure)

    def _update_gauges(self) -> None:
        m, s = self.metrics, self.scheduler
        if m is None:
            return
        m.running.set(s.running)
        m.waiting.set(s.waiting)
        m.slots_in_use.set(s.running)
        cache = s.prefix_cache
        evicted = 0 if cache is None else cache.index.evicted
        counted = (s.stats.prefill_tokens, s.stats.queried_tokens, s.stats.cached_tokens,
                   evicted)
        for counter, now, before in zip((m.prompt_tokens_computed, m.prefix_queries,
                                         m.prefix_hits, m.prefix_evictions), counted,
                                        self._counted, strict=True):
            if now > before:
                counter.inc(now - before)
        self._counted = counted
        if cache is not None:
            m.prefix_blocks.set(cache.settings.blocks)
            m.prefix_blocks_in_use.set(cache.index.in_use)
            m.prefix_blocks_held.set(cache.index.held)
