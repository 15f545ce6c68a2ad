"""Size and SHA-256 of every file of a checkpoint, written once and checked before a load.

The released format has no checksums: a download that kept its sizes but not its bytes
loads as wrong weights without a word. A manifest, `ckpt-0.manifest.json` beside the
`ckpt-0` folder (generally `<folder>.manifest.json` beside the tensor folder), records each
file of the folder; `check` names every file that differs, is missing or is extra. Files
are hashed in parallel threads (hashlib releases the GIL), with a progress line on stderr.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from grok.checkpoint.files import error, excerpt, kind_of, open_regular, printable
from grok.errors import CheckpointError

FORMAT = "grok-checkpoint-manifest/1"
SUFFIX = ".manifest.json"
_CHUNK = 1 << 20
_MAX_THREADS = 16
# A manifest of 770 files is about 100 KB; a larger one is not a manifest.
_MAX_MANIFEST_BYTES = 16 << 20
# Below this, hashing is quick enough that a progress bar would only flicker.
_PROGRESS_BYTES = 1 << 30
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One file of the folder: its name (no directories), size in bytes and SHA-256."""

    name: str
    size: int
    sha256: str

    def __post_init__(self):
        ok_name = (isinstance(self.name, str) and self.name not in ("", ".", "..")
                   and "/" not in self.name and "\0" not in self.name
                   and (os.sep == "/" or os.sep not in self.name))
        if not ok_name:
            raise ValueError(f"bad file name {excerpt(str(self.name))} in a manifest")
        if type(self.size) is not int or self.size < 0:
            raise ValueError(f"{self.name}: bad size {excerpt(str(self.size))} in a manifest")
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"{self.name}: bad SHA-256 {excerpt(str(self.sha256))} in a "
                             "manifest; expected 64 lowercase hex digits")


@dataclasses.dataclass(frozen=True)
class Problem:
    """A file that does not match the manifest, and how."""

    name: str
    reason: str

    def __str__(self) -> str:
        return printable(f"{self.name}: {self.reason}")


def tensor_folder(path: str | os.PathLike) -> Path:
    """The folder of tensor files a user means: `path/ckpt-0` where it exists, else `path`
    (as the loader's `--checkpoint` takes either)."""
    path = Path(path)
    return path / "ckpt-0" if (path / "ckpt-0").is_dir() else path


def manifest_path(folder: str | os.PathLike) -> Path:
    """Where the manifest of a tensor folder lives: beside it, named after it."""
    folder = Path(os.path.abspath(folder))
    return folder.parent / f"{folder.name}{SUFFIX}"


class _Meter:
    """A stderr progress line for hashing: files, bytes, rate; at most ten updates a second."""

    def __init__(self, total_files: int, total_bytes: int, enabled: bool, label: str):
        self.total_files, self.total_bytes, self.enabled = total_files, total_bytes, enabled
        self.label = label
        self.files = self.bytes = 0
        self.start = time.monotonic()
        self.last = 0.0
        self.lock = threading.Lock()

    def add(self, nbytes: int, file_done: bool = False) -> None:
        with self.lock:
            self.bytes += nbytes
            self.files += file_done
            now = time.monotonic()
            if self.enabled and (now - self.last > 0.1 or self.files == self.total_files):
                self.last = now
                share = self.bytes / self.total_bytes if self.total_bytes else 1.0
                bar = "#" * int(share * 30)
                rate = self.bytes / 1e6 / max(now - self.start, 1e-9)
                sys.stderr.write(f"\r{self.label} [{bar:<30}] {self.files}/{self.total_files} "
                                 f"files, {self.bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} "
                                 f"GB, {rate:.0f} MB/s")
                sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _hash(path: Path, meter: _Meter) -> tuple[int, str]:
    """(size, SHA-256) of a regular file, read in chunks; never blocks on a special file."""
    fd = open_regular(path)
    digest, size = hashlib.sha256(), 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    try:
        while n := os.readv(fd, [buffer]):
            digest.update(view[:n])
            size += n
            meter.add(n)
    except OSError as e:
        raise error(path, f"cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    meter.add(0, file_done=True)
    return size, digest.hexdigest()


def _listing(folder: Path) -> dict[str, os.stat_result]:
    """The folder's entries by name, with what they are (links followed)."""
    if not folder.is_dir():
        raise error(folder, "expected a checkpoint folder, found "
                    + ("nothing" if not os.path.lexists(folder) else "a file"))
    found = {}
    for entry in os.scandir(folder):
        try:
            found[entry.name] = os.stat(entry.path)
        except OSError:  # a dangling link: reported as what it is when read
            found[entry.name] = os.lstat(entry.path)
    return found


def _hash_all(folder: Path, names: list[str], sizes: dict[str, int], threads: int,
              progress: bool | None, label: str) -> dict[str, tuple[int, str] | CheckpointError]:
    total = sum(sizes.get(n, 0) for n in names)
    shown = progress if progress is not None else total >= _PROGRESS_BYTES
    meter = _Meter(len(names), total, shown, label)

    def one(name: str):
        try:
            return _hash(folder / name, meter)
        except CheckpointError as e:
            return e

    try:
        with ThreadPoolExecutor(max(1, min(threads, len(names) or 1))) as pool:
            return dict(zip(names, pool.map(one, names), strict=True))
    finally:
        meter.close()


def compute(folder: str | os.PathLike, threads: int = _MAX_THREADS,
            progress: bool = False) -> list[Entry]:
    """Entries for every file of `folder`, in name order; anything but regular files (a
    subfolder, a FIFO, a dangling link) is an error, as a checkpoint holds none."""
    folder = Path(folder)
    listing = _listing(folder)
    for name, st in sorted(listing.items()):
        if not stat.S_ISREG(st.st_mode):
            raise error(folder / name, f"expected a regular file, found {kind_of(st.st_mode)}")
    names = sorted(listing)
    results = _hash_all(folder, names, {n: listing[n].st_size for n in names}, threads,
                        progress, "hashing")
    entries = []
    for name in names:
        result = results[name]
        if isinstance(result, CheckpointError):
            raise result
        entries.append(Entry(name, *result))
    return entries


def write(folder: str | os.PathLike, threads: int = _MAX_THREADS, progress: bool = False,
          replace: bool = False) -> Path:
    """Writes the manifest of `folder` beside it (atomically); returns its path."""
    target = manifest_path(folder)
    if target.exists() and not replace:
        raise error(target, "a manifest is already there; replace it only on purpose")
    entries = compute(folder, threads, progress)
    text = json.dumps({"format": FORMAT, "folder": Path(folder).resolve().name,
                       "files": [dataclasses.asdict(e) for e in entries]}, indent=1)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return target


def read(path: str | os.PathLike) -> list[Entry]:
    """A manifest's entries, validated; a damaged manifest is a `CheckpointError`."""
    path = Path(path)
    if not os.path.lexists(path):
        raise error(path, "no manifest here; write one with `tools/checkpoint_manifest.py "
                    "write` from a copy you trust")
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(_MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise error(path, f"cannot read manifest: {e.strerror or e}") from None
    if len(data) > _MAX_MANIFEST_BYTES:
        raise error(path, f"manifest is larger than {_MAX_MANIFEST_BYTES} bytes")
    try:
        document = json.loads(data.decode("utf-8"))
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError(f"expected a JSON object with \"format\": \"{FORMAT}\"")
        files = document.get("files")
        if not isinstance(files, list) or not all(isinstance(e, dict) for e in files):
            raise ValueError("expected \"files\": a list of {name, size, sha256} objects")
        entries = [Entry(**e) for e in files]
    except (ValueError, TypeError, RecursionError) as e:
        raise error(path, f"not a valid manifest: {printable(str(e), 200)}") from None
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise error(path, "not a valid manifest: a file is listed twice")
    return entries


def compare(folder: str | os.PathLike, entries: list[Entry], threads: int = _MAX_THREADS,
            progress: bool = False) -> list[Problem]:
    """Every way `folder` differs from `entries`: files missing, extra, of another kind or
    size, or with other contents. Sizes are compared first; only same-sized files are
    hashed, in parallel."""
    folder = Path(folder)
    listing = _listing(folder)
    problems, to_hash = [], []
    expected = {e.name: e for e in entries}
    for name in sorted(set(listing) | set(expected)):
        st, entry = listing.get(name), expected.get(name)
        if entry is None:
            problems.append(Problem(name, "extra file, not in the manifest"))
        elif st is None:
            problems.append(Problem(name, "missing"))
        elif not stat.S_ISREG(st.st_mode):
            problems.append(Problem(name, f"expected a regular file, found "
                                          f"{kind_of(st.st_mode)}"))
        elif st.st_size != entry.size:
            problems.append(Problem(name, f"size differs: expected {entry.size} bytes, found "
                                          f"{st.st_size}"))
        else:
            to_hash.append(name)
    results = _hash_all(folder, to_hash, {n: listing[n].st_size for n in to_hash}, threads,
                        progress, "verifying")
    for name in to_hash:
        result, entry = results[name], expected[name]
        if isinstance(result, CheckpointError):
            problems.append(Problem(name, f"unreadable: {result}"))
        elif result != (entry.size, entry.sha256):
            problems.append(Problem(name, f"SHA-256 differs: expected {entry.sha256[:16]}..., "
                                          f"found {result[1][:16]}..."))
    return sorted(problems, key=lambda p: p.name)


def verify(folder: str | os.PathLike, threads: int = _MAX_THREADS,
           progress: bool | None = None) -> None:
    """Raises one `CheckpointError` naming the files of `folder` that do not match its
    manifest (the first few, and how many in all). `progress`: None shows the progress
    bar only for checkpoints of a gigabyte or more."""
    path = manifest_path(folder)
    problems = compare(folder, read(path), threads, progress)
    if problems:
        shown = "; ".join(str(p) for p in problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise error(folder, f"{len(problems)} file(s) differ from the manifest {path.name}: "
                    f"{shown}{more}")
