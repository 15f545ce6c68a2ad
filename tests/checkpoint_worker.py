"""Parses tensor files in a child process with an address-space cap, for the attack and fuzz
tests: a hang or a blowup then fails one test, instead of stalling pytest or exhausting
the machine. Also the fuzz cases themselves (seeded mutations), so that the test can name
and rebuild a case that a worker reports.

    python checkpoint_worker.py files MEM_MB PATH...
    python checkpoint_worker.py fuzz MEM_MB CONFIG_JSON

Each prints one JSON line per file or case, as soon as it is done: its outcome ("ok":
accepted; "refused": a CheckpointError with a well-formed message; "fail": anything else),
a detail and the seconds it took.
"""

from __future__ import annotations

import json
import os
import pickletools
import random
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

# Opcodes whose argument is a fixed-width integer (a length, a value or a memo index).
_INT_FIELDS = {0x80: 1, 0x95: 8, 0x8C: 1, ord("X"): 4, 0x8D: 8, ord("C"): 1, ord("B"): 4,
               0x8E: 8, ord("K"): 1, ord("M"): 2, ord("J"): 4, 0x8A: 1, ord("h"): 1,
               ord("q"): 1, ord("j"): 4, ord("r"): 4}
# Messages must not leak the parser's own classes or object addresses.
_INTERNAL = ("_Bytes(", "_Global(", "Stub", "object at 0x", "<class ")
_AUDITED = ("pickle.find_class", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
            "subprocess.Popen", "exec")


def _hostile_fragments(marker: str) -> list[bytes]:
    """Opcode sequences an attacker would splice in: code execution, memo bombs, deep
    nesting, huge integers and lengths."""
    command = f"touch {marker}".encode()
    return [
        b"\x8c\x05posix\x8c\x06system\x93X" + struct.pack("<I", len(command)) + command
        + b"\x85R",
        b"cos\nsystem\nX" + struct.pack("<I", len(command)) + command + b"\x85R",
        b"c__builtin__\neval\n",
        b"K\x00\x85q\x00" + b"".join(b"h%c\x86q%c" % (i, i + 1) for i in range(40)),
        b"K\x01" + b"\x85" * 3000,
        b"(" * 200 + b"t" * 200,
        b"\x8a\xff" + b"\xff" * 255,
        b"\x8a\xff" + b"\x7f" * 255 + b"q\x00(" + b"h\x00" * 2000 + b"t",
        b"g" + b"9" * 5000 + b"\n",
        b"p" + b"1" * 30 + b"\n",
        b"X\xff\xff\x00\x00",
        b"\x8e" + struct.pack("<Q", 1 << 62),
        b"\x95" + struct.pack("<Q", (1 << 64) - 1),
        b"}(\x8c\x06weight\x8c\x06weightu",
        b"\x88", b"\x89", b"N", b".", b"\x94", b"0", b"2", b"R", b"b", b"\x81", b"u",
    ]


def _interesting(width: int, old: int, rng: random.Random) -> int:
    top = (1 << (8 * width)) - 1
    return rng.choice([0, 1, 2, 0x7F, 0x80, 0xFF, top, top - 1, top >> 1, (top >> 1) + 1,
                       max(0, old - 1), min(top, old + 1), min(top, old * 2),
                       rng.randrange(top + 1)])


class Mutator:
    """Seeded, reproducible mutations of a few seed files: case `i` is always the same."""

    def __init__(self, seeds: dict[str, bytes], marker: str, seed: int = 0):
        self.names = sorted(seeds)
        self.seeds = seeds
        self.seed = seed
        self.fragments = _hostile_fragments(marker)
        self.ops, self.header, self.frames = {}, {}, {}
        for name, data in seeds.items():
            ops = [(op.code.encode("latin-1")[0], pos) for op, _, pos in pickletools.genops(data)]
            self.ops[name] = ops
            self.frames[name] = [(pos, int.from_bytes(data[pos + 1:pos + 9], "little"))
                                 for code, pos in ops if code == 0x95]
            # Bytes outside array payloads: where a mutation changes the stream's meaning.
            ends = [pos for _, pos in ops[1:]] + [len(data)]
            self.header[name] = [p for (code, pos), end in zip(ops, ends, strict=True)
                                 for p in range(pos, end if end - pos < 40 else pos + 9)]

    def _refit_frames(self, name: str, data: bytearray, pos: int, delta: int) -> None:
        """Keeps the frame around `pos` consistent with `delta` bytes more or fewer, so that
        the mutation reaches the parser's deeper checks, not just the frame's length."""
        for start, length in self.frames[name]:
            if start + 9 <= pos <= start + 9 + length and length + delta >= 0:
                data[start + 1:start + 9] = (length + delta).to_bytes(8, "little")

    def case(self, index: int) -> tuple[str, bytes, str]:
        """(seed file name, mutated bytes, what was done)."""
        rng = random.Random(self.seed * 1_000_003 + index)
        name = self.names[index % len(self.names)]
        data = bytearray(self.seeds[name])
        ops, header = self.ops[name], self.header[name]
        changed_at = 0

        def spot() -> int:
            return rng.choice(header) if rng.random() < 0.85 else rng.randrange(len(data))

        kind = rng.choice(["flip", "flip", "insert", "delete", "splice", "splice", "length",
                           "duplicate"])
        if kind == "flip":
            spots = [(spot(), rng.randrange(8)) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
            for pos, bit in spots:
                data[pos] ^= 1 << bit
            what = "flip bits " + ", ".join(f"{bit} of byte {pos}" for pos, bit in spots)
        elif kind == "insert":
            pos, junk = spot(), bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            data[pos:pos] = junk
            what, changed_at = f"insert {junk.hex()} at byte {pos}", pos
        elif kind == "delete":
            pos, n = spot(), rng.randint(1, 8)
            del data[pos:pos + n]
            what, changed_at = f"delete {n} bytes at byte {pos}", pos
        elif kind == "splice":
            donor_name = rng.choice(self.names)
            if rng.random() < 0.5:
                fragment = rng.choice(self.fragments)
                source = "a hostile fragment"
            else:
                donor, donor_ops = self.seeds[donor_name], self.ops[donor_name]
                first = rng.randrange(len(donor_ops))
                last = min(len(donor_ops) - 1, first + rng.randint(1, 4))
                start = donor_ops[first][1]
                end = donor_ops[last][1] if last > first else len(donor)
                fragment = donor[start:min(end, start + 64)]
                source = f"{donor_name} bytes {start}..{start + len(fragment)}"
            at = rng.randrange(len(ops))
            pos = ops[at][1]
            replace = rng.random() < 0.5 and at + 1 < len(ops)
            end = ops[at + 1][1] if replace else pos
            data[pos:end] = fragment
            what = f"{'replace opcode at' if replace else 'insert at'} byte {pos}: {source}"
            changed_at = pos
        elif kind == "length":
            fields = [(code, pos) for code, pos in ops if code in _INT_FIELDS]
            code, pos = rng.choice(fields)
            width = _INT_FIELDS[code]
            old = int.from_bytes(data[pos + 1:pos + 1 + width], "little")
            new = _interesting(width, old, rng)
            data[pos + 1:pos + 1 + width] = new.to_bytes(width, "little")
            what = f"rewrite the {width}-byte field of opcode 0x{code:02x} at byte {pos}: {new}"
        else:
            first = rng.randrange(len(ops))
            start = ops[first][1]
            end = ops[min(len(ops) - 1, first + rng.randint(1, 6))][1]
            span = bytes(data[start:min(end, start + 64)])
            at = rng.choice(ops)[1]
            data[at:at] = span
            what, changed_at = f"copy bytes {start}..{start + len(span)} to byte {at}", at
        delta = len(data) - len(self.seeds[name])
        if delta and rng.random() < 0.7:
            self._refit_frames(name, data, changed_at, delta)
            what += " (frame length refitted)"
        return name, bytes(data), f"{kind}: {what}"


def message_problems(message: str, path: str) -> list[str]:
    """How a CheckpointError's message breaks the rules: it names the file, is one
    printable line of bounded length, and shows no internals."""
    from grok.checkpoint.files import MAX_MESSAGE
    problems = []
    if path not in message:
        problems.append("does not name the file")
    if not message.isprintable():
        problems.append("is not one printable line")
    if len(message) > MAX_MESSAGE:
        problems.append(f"is {len(message)} characters long")
    problems += [f"shows {s!r}" for s in _INTERNAL if s in message]
    return problems


class _Checker:
    """Runs one file through the reader and classifies what happened."""

    def __init__(self):
        import numpy as np

        from grok.checkpoint import pickle_format
        from grok.errors import CheckpointError
        self.np, self.pickle_format, self.error_type = np, pickle_format, CheckpointError
        self.events: list[str] = []
        sys.addaudithook(self._audit)
        self.baseline_kb = 0

    def _audit(self, event: str, args) -> None:
        if event in _AUDITED:
            self.events.append(event)

    def check(self, path: str) -> tuple[str, str]:
        try:
            header = self.pickle_format.read_header(path)
            value = self.pickle_format.open_tensor(path, header)
            parts = [value.weight, value.scales] if hasattr(value, "scales") else [value]
            total = sum(int(self.np.array(part).view(self.np.uint8).sum()) for part in parts)
            outcome, detail = "ok", f"{[tuple(p.shape) for p in parts]} checksum {total}"
        except self.error_type as e:
            message = str(e)
            problems = message_problems(message, path)
            cause = e.__cause__
            if isinstance(cause, (MemoryError, RecursionError)):
                problems.append(f"hides a {type(cause).__name__}")
            outcome = "fail" if problems else "refused"
            detail = f"{message} ({'; '.join(problems)})" if problems else message
        except BaseException as e:  # anything else escaping is the failure being looked for
            outcome, detail = "fail", f"{type(e).__name__} escaped: {str(e)[:300]!r}"
        if self.events:
            outcome, detail = "fail", f"audited {self.events}: {detail}"
            self.events.clear()
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.baseline_kb
        if self.baseline_kb and grown > 200_000:
            outcome, detail = "fail", f"memory grew by {grown} KB: {detail}"
        return outcome, detail


def _emit(case, outcome: str, detail: str, seconds: float) -> None:
    sys.stdout.write(json.dumps({"case": case, "outcome": outcome, "detail": detail,
                                 "seconds": round(seconds, 4)}) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> None:
    mode, mem_mb = argv[0], int(argv[1])
    limit = mem_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    checker = _Checker()
    if mode == "files":
        for path in argv[2:]:
            start = time.perf_counter()
            outcome, detail = checker.check(path)
            _emit(path, outcome, detail, time.perf_counter() - start)
        return
    config = json.loads(argv[2])
    seeds = {name: Path(config["seed_dir"], name).read_bytes()
             for name in config["seeds"]}
    mutator = Mutator(seeds, config["marker"], config["seed"])
    work, cut_name = config["work_dir"], config["truncate"]
    os.makedirs(work, exist_ok=True)
    checker.check(os.path.join(config["seed_dir"], cut_name))  # warm up before measuring
    checker.baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for index in range(config["first"], config["first"] + config["count"]):
        if index < config["mutations"]:
            name, data, _ = mutator.case(index)
        else:  # the truncation cases: every prefix of one small file
            name, data = cut_name, seeds[cut_name][:index - config["mutations"]]
        # A new file per case: truncating and rewriting one is slow on ext4.
        path = os.path.join(work, f"case{index}-{name}")
        with open(path, "wb") as f:
            f.write(data)
        start = time.perf_counter()
        outcome, detail = checker.check(path)
        _emit(index, outcome, detail, time.perf_counter() - start)
        os.unlink(path)


def launch(args: list[str], mem_mb: int, stderr=subprocess.PIPE) -> subprocess.Popen:
    """Starts a worker with one thread per library (the CPU is shared)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1", JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, __file__, args[0], str(mem_mb), *args[1:]],
                            stdout=subprocess.PIPE, stderr=stderr, env=env, text=True)


def run_files(paths: list[str], mem_mb: int = 2048, timeout: float = 60.0) -> dict:
    """Outcome of each file, parsed in a capped worker; a worker that runs past `timeout`
    is killed and the file it was on reported as hung."""
    worker = launch(["files", *map(str, paths)], mem_mb)
    try:
        out, err = worker.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        worker.kill()
        out, err = worker.communicate()
        done = [json.loads(line)["case"] for line in out.splitlines()]
        hung = next(str(p) for p in paths if str(p) not in done)
        raise AssertionError(f"reading {hung} hung (killed after {timeout} s)") from None
    results = {r["case"]: r for r in map(json.loads, out.splitlines())}
    if worker.returncode != 0 or len(results) != len(paths):
        raise AssertionError(f"worker exited with {worker.returncode} after "
                             f"{len(results)} of {len(paths)} files: {err[-2000:]}")
    return results


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1:])
