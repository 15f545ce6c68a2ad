"""`grok-plan` / `python -m grok.plan`: a run's memory and compile plan, before any weights.

    python -m grok.plan --target h100x8                      # grok-1, the server's defaults
    python -m grok.plan --target h200x4 --max-batch 32 --max-seq-len 4096 --json
    python -m grok.plan --config tiny --mesh 2x4 --programs largest   # the devices JAX sees

GPU targets compile through XLA's CUDA plugin with no GPU present (`pip install -e
".[plan]"`); `local` compiles for the devices this process has. Bad input is one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from grok.errors import GrokError


def build_parser() -> argparse.ArgumentParser:
    from grok.cli import ArgumentParser, _mesh, max_batch_arg
    from grok.config import PRESETS
    from grok.layers import LAYER_MODES
    from grok.moe import STRATEGIES
    from grok.plan.plan import PROGRAM_KINDS
    from grok.quant import DEFAULT_INT4_GROUP, WEIGHT_MODES

    p = ArgumentParser(prog="grok-plan", description=(
        "Compile every program a run needs for its devices, from abstract weights, and "
        "print the memory each device needs and whether it fits."))
    p.add_argument("--config", default="grok-1",
                   help=f"preset ({', '.join(PRESETS)}) or JSON path (default: %(default)s)")
    p.add_argument("--target", default="local",
                   help="local (the devices JAX sees) or GPUxCOUNT: h100x8, h200x4, "
                        "a100-80x8, ... (default: %(default)s)")
    p.add_argument("--target-config", type=Path, metavar="FILE",
                   help="a GpuTargetConfig text proto for any other GPU; the count is "
                        "--mesh's (default 8)")
    p.add_argument("--mesh", type=_mesh, help="DATAxMODEL (default: tensor parallelism over "
                                              "as many devices as the heads allow)")
    p.add_argument("--weights", choices=WEIGHT_MODES,
                   help="default: dequantized on CPU, else int8")
    p.add_argument("--int4-group", type=int, default=DEFAULT_INT4_GROUP, metavar="ROWS",
                   help="with --weights int4: rows per 4-bit scale (default: %(default)s)")
    p.add_argument("--layers", choices=LAYER_MODES, help="default: unrolled on CPU, else scan")
    p.add_argument("--moe", choices=list(STRATEGIES), default="sparse")
    p.add_argument("--max-batch", type=max_batch_arg, default=8,
                   help="decode slots, or 'auto': the most that fit, as the server's "
                        "--max-batch auto takes them (default: %(default)s)")
    p.add_argument("--max-seq-len", type=int, help="positions per slot (default: the context)")
    p.add_argument("--prefill-chunk", type=int, metavar="TOKENS",
                   help="the server's --prefill-chunk, whose steps are compiled (default: the "
                        "server's for the platform; 0: whole prompts)")
    p.add_argument("--deterministic", action="store_true",
                   help="the server's --deterministic steps")
    p.add_argument("--memory-fraction", type=float, default=0.9,
                   help="share of each device's memory a run may use (default: %(default)s)")
    p.add_argument("--steps", type=lambda t: t.split(","), metavar="KINDS",
                   help=f"compile only these kinds, comma-separated: {','.join(PROGRAM_KINDS)}")
    p.add_argument("--programs", choices=("all", "largest"), default="all",
                   help="all: every program warmup compiles; largest: each kind's biggest "
                        "shape only, for a quick sizing (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        plan = _plan(args)
    except GrokError as e:
        from grok.cli import _one_line
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    from grok.plan.plan import describe
    print(json.dumps(plan.to_json()) if args.json else describe(plan))
    return 0


def _plan(args):
    if args.target != "local" or args.target_config is not None:
        # The CUDA plugin starts only next to a GPU unless JAX is told its platform first.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from grok.cli import AUTO
    from grok.config import resolve_config
    from grok.engine.engine import check_steps
    from grok.engine.progress import ProgressLine
    from grok.plan import plan
    from grok.plan.sizes import RunShape

    if args.steps is not None:
        unknown = sorted(set(args.steps) - set(plan.PROGRAM_KINDS))
        if unknown:
            raise GrokError(f"--steps: expected kinds among {','.join(plan.PROGRAM_KINDS)}, "
                            f"found {','.join(unknown)}")
    if args.prefill_chunk is not None:  # None: the platform's default, a chunk
        check_steps(args.prefill_chunk or None, args.deterministic, flags=True)
    config = resolve_config(args.config)
    auto = args.max_batch == AUTO
    shape = RunShape(config, args.mesh, args.weights, args.layers, args.moe,
                     8 if auto else args.max_batch, args.max_seq_len, args.int4_group,
                     args.prefill_chunk, args.deterministic)
    if args.target_config is not None:
        count = args.mesh[0] * args.mesh[1] if args.mesh else 8
        target = plan.file_target(args.target_config, count)
    elif args.target == "local":
        target = plan.local_target()
    else:
        target = plan.gpu_target(args.target)
    return plan.make_plan(shape, target, memory_fraction=args.memory_fraction,
                          kinds=args.steps, largest=args.programs == "largest", auto_slots=auto,
                          progress=ProgressLine("compiling", interval=30.0))


if __name__ == "__main__":
    sys.exit(main())
