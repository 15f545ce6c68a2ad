"""A progress line for long compiles: programs done of total, time spent, time left.

On a terminal it is one line rewritten in place; elsewhere (a log file, a pipe) a line is
written at most every `interval` seconds, and at the end, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def progress_text(what: str, done: int, total: int, seconds: float) -> str:
    """'compiling: 12/40 programs, 3 min 12 s, about 7 min 28 s left'."""
    text = f"{what}: {done}/{total} programs, {_duration(seconds)}"
    if 0 < done < total:
        text += f", about {_duration(seconds / done * (total - done))} left"
    return text


class ProgressLine:
    """Callable as `progress(done, total, seconds)`, as `Engine.warmup` calls it."""

    def __init__(self, what: str = "compiling", write: Callable[[str], None] | None = None,
                 stream=None, interval: float = 10.0):
        """`write` takes whole lines (a logger's method); otherwise `stream` (default
        stderr) gets the line, rewritten in place where it is a terminal."""
        self.what = what
        self.write = write
        self.stream = sys.stderr if stream is None and write is None else stream
        self.interval = interval
        self.last = float("-inf")
        self.in_place = (self.stream is not None and hasattr(self.stream, "isatty")
                         and self.stream.isatty())

    def __call__(self, done: int, total: int, seconds: float) -> None:
        text = progress_text(self.what, done, total, seconds)
        end = done >= total
        if self.in_place:
            self.stream.write("\r" + text + ("\n" if end else ""))
            self.stream.flush()
            return
        now = time.monotonic()
        if not end and done > 0 and now - self.last < self.interval:
            return
        self.last = now
        if self.write is not None:
            self.write(text)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()
