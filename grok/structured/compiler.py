"""Specs compiled into grammars off the device thread, in processes that can be killed, and
cached per spec.

Most grammars compile in tens of milliseconds, but some take seconds or gigabytes (a
bounded repetition of "any character" is a large automaton), and xgrammar's compiler cannot
be stopped from inside. So each compile runs in a worker process
(`grok.structured.compile_worker`) under a time limit and a memory limit: past the time
limit the process is killed and the request gets a clear error, and the next compile
starts a fresh process. The grammar comes back serialized and is rebuilt here against the
same vocabulary. Results, failures included, are cached per spec (least recently used
go first), so a repeated schema costs nothing and a repeated bad one fails at once;
concurrent requests for one spec share its compile.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
import weakref
from typing import Any

from grok.errors import GrokError
from grok.structured.spec import JsonObject, JsonSchema, Structure, to_json
from grok.tokenizer import Tokenizer

COMPILE_TIMEOUT_S = 10.0  # one compile, once its process is up
START_TIMEOUT_S = 300.0  # a worker process's start (xgrammar imports PyTorch)
COMPILE_MEMORY = 4 << 30  # bytes a compile may take beyond the worker's own
WORKERS = 2  # compiles at once
CACHE_ENTRIES = 256

INSTALL_HINT = "structured output needs xgrammar: pip install 'grok1-jax[structured]'"


@dataclasses.dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled spec, for one vocabulary: each request that uses it gets its own
    `matcher()`."""

    spec: Structure
    compiled: list  # xgrammar.CompiledGrammar, one per form (grok.structured.grammar.build)
    vocab: Any  # grok.structured.grammar.Vocabulary

    def matcher(self):
        from grok.structured.grammar import Matcher

        return Matcher(self.compiled, self.vocab,
                       json=isinstance(self.spec, (JsonSchema, JsonObject)))


class _Worker:
    """One compile process: a spec in on stdin, a line back on stdout."""

    def __init__(self, setup: dict):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "grok.structured.compile_worker", json.dumps(setup)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._buffer = bytearray()
        reply = self._reply(START_TIMEOUT_S, "starting the grammar compiler")
        if not reply.get("ready"):
            self.kill()
            raise RuntimeError(f"the grammar compiler process did not start: {reply}")

    def compile(self, spec: Structure, timeout_s: float | None) -> list[str]:
        """The serialized grammars; GrokError if it does not compile or takes too long."""
        self.process.stdin.write(json.dumps(to_json(spec)).encode() + b"\n")
        self.process.stdin.flush()
        reply = self._reply(timeout_s, f"compiling the {spec.kind}")
        if "error" in reply:
            raise GrokError(f"{spec.kind}: {reply['error']}")
        return reply["grammars"]

    def _reply(self, limit_s: float | None, doing: str) -> dict:
        """The next line from the process, within `limit_s` (None: no limit)."""
        deadline = None if limit_s is None else time.monotonic() + limit_s
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            left = None if deadline is None else deadline - time.monotonic()
            if (left is not None and left <= 0) or not select.select([fd], [], [], left)[0]:
                self.kill()
                raise GrokError(f"{doing} took longer than {limit_s:g} s: simplify it")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                code = self.process.wait()
                raise GrokError(f"{doing} failed: the compiler process ended (exit code "
                                f"{code}), perhaps out of memory")
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return json.loads(line)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class GrammarCompiler:
    """Compiles specs for one tokenizer at one model vocabulary size (see the module's
    docstring). `submit` returns a future and never blocks; `compile` waits."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, *,
                 timeout_s: float | None = COMPILE_TIMEOUT_S, workers: int = WORKERS,
                 cache_entries: int = CACHE_ENTRIES, memory_bytes: int = COMPILE_MEMORY):
        try:
            from grok.structured.grammar import Vocabulary
        except ImportError:
            raise GrokError(INSTALL_HINT) from None
        self.vocab = Vocabulary(tokenizer, vocab_size)
        self.timeout_s = timeout_s
        self._setup = {"tokenizer": tokenizer.path, "pad": tokenizer.pad_id,
                       "eos": tokenizer.eos_id, "vocab_size": vocab_size,
                       "memory_bytes": memory_bytes}
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "grok-grammar")
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._workers: weakref.WeakSet[_Worker] = weakref.WeakSet()
        self._cache: collections.OrderedDict[Structure, concurrent.futures.Future] = \
            collections.OrderedDict()
        self._entries = cache_entries
        self._lock = threading.Lock()
        weakref.finalize(self, _stop, self._pool, self._workers)

    def submit(self, spec: Structure) -> concurrent.futures.Future[Grammar]:
        """The spec's grammar, compiling in the background unless cached."""
        with self._lock:
            future = self._cache.get(spec)
            if future is None:
                future = self._cache[spec] = self._pool.submit(self._compile, spec)
                while len(self._cache) > self._entries:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(spec)
            return future

    def compile(self, spec: Structure) -> Grammar:
        return self.submit(spec).result()

    def close(self) -> None:
        """Ends the worker processes (later compiles start new ones)."""
        _stop(None, self._workers)

    def _compile(self, spec: Structure) -> Grammar:
        import xgrammar as xgr

        try:
            worker = self._idle.get_nowait()
        except queue.Empty:
            worker = _Worker(self._setup)
            self._workers.add(worker)
        try:
            texts = worker.compile(spec, self.timeout_s)
        except BaseException as e:
            if not isinstance(e, GrokError):  # the spec's own error leaves it healthy
                worker.kill()
            raise
        finally:
            if worker.process.poll() is None:
                self._idle.put(worker)
        grammar = Grammar(spec, [xgr.CompiledGrammar.deserialize_json(text, self.vocab.info)
                                 for text in texts], self.vocab)
        if grammar.matcher().stuck:
            raise GrokError(f"{spec.kind}: no token of the model's vocabulary can begin it")
        return grammar


def _stop(pool, workers) -> None:
    for worker in list(workers):
        worker.kill()
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)
