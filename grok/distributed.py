"""Running as several processes (one per host) with JAX's own multi-process runtime.

Every process runs the same program on a mesh that spans all processes' devices
(`jax.devices()` is global once `jax.distributed.initialize` has run); each process reads
only the checkpoint slices its own devices hold, and only process 0 prints. Initialisation
must come before anything touches a JAX backend (even `jax.devices()`), so the command line
calls `initialize` straight after parsing its arguments.

Either name everything on the command line (`--coordinator HOST:PORT --num-processes N
--process-id I`, on every host, with the same coordinator: process 0's address), or pass
`--distributed` alone under a launcher JAX recognises: it then calls
`jax.distributed.initialize()` without arguments, which takes the coordinator from
`JAX_COORDINATOR_ADDRESS` (or the launcher) and the process count and id from Slurm (`srun`:
`SLURM_NTASKS`, `SLURM_PROCID`, ...), Open MPI (`mpirun`: `OMPI_COMM_WORLD_SIZE`,
`OMPI_COMM_WORLD_RANK`), Kubernetes or Cloud TPU. Flags given alongside `--distributed` (or
on their own) win; the rest come from the environment.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys

import jax
import numpy as np

from grok.errors import GrokError

_ADDRESS = re.compile(r"(?:\[[0-9a-fA-F:.]+\]|[^\s:\[\]]+):(\d{1,5})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "multi-process runs (one process per host; see grok/distributed.py)")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address of process 0, where the coordinator listens (the same "
                            "on every process)")
    group.add_argument("--num-processes", type=int, metavar="N",
                       help="number of processes in the run")
    group.add_argument("--process-id", type=int, metavar="I",
                       help="this process's index, 0 .. N-1 (0 prints the output)")
    group.add_argument("--distributed", action="store_true",
                       help="join a multi-process run; settings not given as flags come from "
                            "the environment (JAX_COORDINATOR_ADDRESS, Slurm, Open MPI, ...)")


def _check(args) -> None:
    if args.coordinator is not None:
        match = _ADDRESS.fullmatch(args.coordinator)
        if not match or not 0 < int(match.group(1)) < 65536:
            raise GrokError(f"--coordinator must be HOST:PORT (process 0's address and a free "
                             f"port), got {args.coordinator!r}")
    if args.num_processes is not None and args.num_processes < 1:
        raise GrokError(f"--num-processes must be at least 1, got {args.num_processes}")
    if args.process_id is not None:
        if args.process_id < 0:
            raise GrokError(f"--process-id must be at least 0, got {args.process_id}")
        if args.num_processes is not None and args.process_id >= args.num_processes:
            raise GrokError(f"--process-id {args.process_id} is out of range for "
                             f"--num-processes {args.num_processes} (ids are 0 .. "
                             f"{args.num_processes - 1})")


def requested(args) -> bool:
    """Whether the arguments ask for a multi-process run."""
    return args.distributed or any(
        value is not None for value in (args.coordinator, args.num_processes, args.process_id))


def initialize(args) -> bool:
    """Joins the multi-process run the arguments describe (see the module docstring);
    returns False, doing nothing, when they describe a single process."""
    _check(args)
    if not requested(args):
        return False
    try:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    except (RuntimeError, ValueError) as e:
        where = (f"coordinator {args.coordinator or '(from the environment)'}, process "
                 f"{'?' if args.process_id is None else args.process_id} of "
                 f"{'?' if args.num_processes is None else args.num_processes}")
        raise GrokError(f"could not join the multi-process run ({where}): {e}") from None
    _native_stdout_to_stderr()
    return True


_replaced_stdout = None


def _native_stdout_to_stderr() -> None:
    """Gloo (JAX's CPU collectives) prints connection notes on the C++ stdout whenever it
    connects: file descriptor 1 becomes stderr, and `sys.stdout` moves to a copy of the
    real stdout, which carries this program's output alone."""
    global _replaced_stdout
    if _replaced_stdout is not None or sys.stdout is None:
        return
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    _replaced_stdout = sys.stdout
    sys.stdout = open(real, "w", encoding=sys.stdout.encoding,  # noqa: SIM115 (lives on)
                      errors=sys.stdout.errors, buffering=1)


def exit_on_failure(code: int) -> None:
    """Ends a failed process of a multi-process run at once. A normal exit would wait at
    JAX's shutdown barrier (minutes) for processes that may themselves be waiting for this
    one in a collective; once it is gone, the coordinator stops the others (within its
    heartbeat timeout, 100 s)."""
    if jax.distributed.is_initialized():
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        os._exit(code)


def is_main_process() -> bool:
    """Process 0 (the only one in a single-process run) does the printing."""
    return jax.process_index() == 0


class _Discard(io.TextIOBase):
    def write(self, text: str) -> int:
        return len(text)


def main_only(*streams):
    """The streams on process 0, elsewhere sinks, so that N processes print one copy. A
    stream that was `sys.stdout` before `initialize` moved it is its new self."""
    if is_main_process():
        return tuple(sys.stdout if _replaced_stdout is not None and s is _replaced_stdout
                     else s for s in streams)
    return tuple(_Discard() for _ in streams)


def agree(value: int) -> int:
    """Process 0's `value` on every process (itself in a single-process run): for choices
    each process makes from its own view (free memory, say) that must come out alike."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))
