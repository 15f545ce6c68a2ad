"""Opening checkpoint files safely, and saying what is wrong with one in a single line.

Checkpoints come from mirrors and torrents, so a file may be anything: a FIFO that would
block a plain `open()` forever, a device, a directory, a dangling link, or bytes crafted to
make an error message huge or to paint the user's terminal. Every reader goes through
`open_regular`, and every complaint about a file through `error`, which bounds and escapes
whatever it quotes.
"""

from __future__ import annotations

import os
import stat

from grok.errors import CheckpointError

# A message is one printable line: long enough for a path, a parameter and a clear reason.
MAX_MESSAGE = 1000
# Text read from a file is quoted at most this many characters long.
EXCERPT = 40
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))


def printable(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` as one printable line of at most `limit` characters: control, format and
    line-breaking characters are escaped, not passed to the terminal."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def excerpt(text: str | bytes, limit: int = EXCERPT) -> str:
    """A quoted, ASCII-escaped excerpt of text that came from a file; bounded, so that a
    64 KiB name or an escape sequence cannot flood or repaint the user's terminal."""
    shown = ascii(text[:limit])
    return shown if len(text) <= limit else f"{shown}... ({len(text)} in all)"


def error(path: str | os.PathLike, message: str, where: str | None = None) -> CheckpointError:
    """The one error type for a bad file: names it (and the parameter, where known)."""
    head = os.fspath(path) if not isinstance(path, bytes) else os.fsdecode(path)
    if where:
        head = f"{head} ({where})"
    return CheckpointError(printable(f"{head}: {message}"))


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike, where: str | None = None) -> int:
    """A read-only descriptor of `path`, which must be (a link to) a regular file.

    Opens with O_NONBLOCK, so that even a FIFO swapped in after the check cannot block,
    and checks the type of what was opened, not of what the name pointed to before.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        if os.path.islink(path):
            try:
                target = excerpt(os.readlink(path), 200)
            except OSError:
                target = "an unreadable target"
            raise error(path, f"expected a tensor file, found a dangling symbolic link to "
                              f"{target}", where) from None
        raise error(path, "no such tensor file", where) from None
    except OSError as e:
        try:  # a socket, say, cannot be opened at all: say what it is
            mode = os.stat(path).st_mode
        except OSError:
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise error(path, f"expected a tensor file, found {kind_of(mode)}", where) from None
        raise error(path, f"cannot open tensor file: {e.strerror or e}", where) from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        os.close(fd)
        raise error(path, f"cannot read tensor file: {e.strerror or e}", where) from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(path, f"expected a tensor file, found {kind_of(mode)}", where)
    return fd


class NamedFile:
    """A file object whose `name` is its path, so that `np.memmap` records the path (the
    loader reopens it by name) while mapping the descriptor `open_regular` opened safely."""

    def __init__(self, f, name: str):
        self._f, self.name = f, name

    def __getattr__(self, attr):
        return getattr(self._f, attr)
