"""Records, or checks, the size and SHA-256 of every file of a checkpoint.

    python tools/checkpoint_manifest.py write DIR [--threads N] [--force] [--quiet]
    python tools/checkpoint_manifest.py check DIR [--threads N] [--quiet]

DIR is the folder holding `ckpt-0` (or `ckpt-0` itself). `write` hashes every file of
`ckpt-0` in parallel and saves `ckpt-0.manifest.json` beside it; run it on a copy you trust
(or take the manifest from whoever published the checkpoint). `check` names each file that
differs, is missing or is extra. Exit codes: 0 all match, 1 some file differs, 2 a usage
error (no such folder, no manifest, a damaged manifest). `run.py --verify` makes the
loader check the manifest before reading any tensor.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grok.checkpoint import manifest
from grok.checkpoint.files import printable
from grok.errors import CheckpointError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, no usage dump
        raise _Usage(message)


class _Usage(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="checkpoint_manifest.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("write", "record every file's size and SHA-256"),
                       ("check", "compare every file with the recorded manifest")):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("dir", type=Path, help="folder holding ckpt-0, or ckpt-0 itself")
        sub.add_argument("--threads", type=int, default=16,
                         help="files hashed at once (default: %(default)s)")
        sub.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
        if name == "write":
            sub.add_argument("--force", action="store_true",
                             help="replace an existing manifest")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.threads < 1:
            raise _Usage(f"--threads must be at least 1, got {args.threads}")
    except _Usage as e:
        print(f"error: {printable(str(e))}", file=sys.stderr)
        return 2
    folder = manifest.tensor_folder(args.dir)
    start = time.perf_counter()
    try:
        if args.command == "write":
            target = manifest.write(folder, args.threads, not args.quiet, replace=args.force)
            print(f"wrote {target} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
            return 0
        entries = manifest.read(manifest.manifest_path(folder))
        problems = manifest.compare(folder, entries, args.threads, not args.quiet)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for problem in problems:
        print(printable(f"{folder / problem.name}: {problem.reason}"), file=sys.stderr)
    if problems:
        print(f"{len(problems)} of {len(entries)} files do not match "
              f"{manifest.manifest_path(folder)}", file=sys.stderr)
        return 1
    print(f"all {len(entries)} files match {manifest.manifest_path(folder)} "
          f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
