"""Command line: sample from a checkpoint, streaming text or printing JSON lines."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from grok import compilation, demo, distributed, plot, sharding
from grok.api import Grok
from grok.config import PRESETS, resolve_config
from grok.engine.request import GenerationSettings, make_request
from grok.errors import GrokError
from grok.moe import STRATEGIES
from grok.quant import WEIGHT_MODES
from grok.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO / "checkpoints"
DEFAULT_TOKENIZER = REPO / "tokenizer" / "tokenizer.model"
DEFAULT_PROMPT = "The answer to life the universe and everything is of course"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, no usage dump
        raise UsageError(message)


class UsageError(ValueError):
    pass


def _mesh(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--mesh must be DATAxMODEL, e.g. 1x8, got {text!r}")
    return int(parts[0]), int(parts[1])


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Sample text from a Grok-1 checkpoint.")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-file", type=Path, help="one prompt per line")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                   help=f"folder holding ckpt-0, or ckpt-0 itself (default: "
                        f"{DEFAULT_CHECKPOINT}; while it holds no ckpt-0, the demo model)")
    p.add_argument("--config", default="grok-1",
                   help=f"preset ({', '.join(PRESETS)}) or JSON path (default: %(default)s)")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                   help="SentencePiece model (default: %(default)s)")
    p.add_argument("--mesh", type=_mesh, help="DATAxMODEL devices (default: 1xALL)")
    p.add_argument("--weights", choices=WEIGHT_MODES,
                   help="int8: 8-bit weights on the devices; dequantized: their exact bf16 "
                        "values, converted once (default: dequantized on CPU, else int8)")
    p.add_argument("--moe", choices=list(STRATEGIES), default="sparse",
                   help="sparse: only the chosen experts run; dense: all, as the release")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.01, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 is off")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--verify", action="store_true",
                   help="check every checkpoint file's size and SHA-256 against the manifest "
                        "beside ckpt-0 before loading (tools/checkpoint_manifest.py writes it)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt instead of streaming text")
    p.add_argument("--expert-stats", type=Path, metavar="FILE.json",
                   help="write the run's expert-routing tallies (per layer and expert, "
                        "prefill and decode) as JSON")
    p.add_argument("--expert-plot", type=Path, metavar="FILE.png",
                   help="draw the run's expert usage: layers x experts heat maps and "
                        "per-layer imbalance (needs the 'plot' extra: matplotlib)")
    compilation.add_argument(p)
    distributed.add_arguments(p)
    return p


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise ValueError(f"--prompt-file {str(args.prompt_file)!r} does not exist")
        prompts += [line for line in args.prompt_file.read_text().splitlines() if line]
    return prompts or [DEFAULT_PROMPT]


def _check_paths(args) -> None:
    ckpt = args.checkpoint
    if not (ckpt / "ckpt-0").is_dir() and not (ckpt.name == "ckpt-0" and ckpt.is_dir()):
        raise ValueError(
            f"no checkpoint at {str(ckpt)!r}: put the released ckpt-0/ folder (770 tensor "
            f"files, about 318 GB) in {str(DEFAULT_CHECKPOINT)!r} or pass --checkpoint; "
            f"checkpoints/README.md says how to download it")
    if not args.tokenizer.is_file():
        raise ValueError(
            f"no tokenizer at {str(args.tokenizer)!r}: put the released tokenizer.model there "
            f"or pass --tokenizer; tokenizer/README.md says where to get it")


def _run(args, out, err) -> None:
    if args.demo:
        print(demo.BANNER, file=err)
    # Everything a user can get wrong is checked before minutes go into loading.
    config = resolve_config(args.config)
    _check_paths(args)
    tokenizer = Tokenizer.from_config(args.tokenizer, config)
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop)
    sharding.check_mesh(config, sharding.make_mesh(args.mesh))
    if args.expert_plot is not None:
        plot.require()
    for flag, path in (("--expert-stats", args.expert_stats),
                       ("--expert-plot", args.expert_plot)):
        if path is not None and not path.parent.is_dir():
            raise GrokError(f"{flag}: folder {str(path.parent)!r} does not exist")
    examples = args.demo and not args.prompt and args.prompt_file is None
    prompts = demo.example_prompts() if examples else _prompts(args)
    # The checks `Grok.run` makes, before the load rather than after it.
    for i, prompt in enumerate(prompts):
        make_request(config, tokenizer, prompt, GenerationSettings(**settings),
                     label=f"prompt {i}")

    start = time.perf_counter()
    grok = Grok.load(args.checkpoint, config, tokenizer_path=tokenizer,
                     mesh_shape=args.mesh, weights=args.weights, moe=args.moe,
                     verify=args.verify)
    print(f"loaded in {time.perf_counter() - start:.1f} s on a "
          f"{grok.mesh.shape['data']}x{grok.mesh.shape['model']} mesh", file=err)
    run = grok.run(prompts, log=lambda line: print(line, file=err, flush=True), **settings)
    if args.json or examples:
        for _ in run:
            pass
        if args.json:
            for completion in run.completions:
                out.write(json.dumps(completion.to_json(), ensure_ascii=False) + "\n")
        else:
            demo.write_examples(run.completions, out)
    else:
        _stream_in_order(run, prompts, out)
    usage = grok.expert_usage()
    if args.expert_stats is not None:
        args.expert_stats.write_text(json.dumps(usage.to_json()) + "\n")
    if args.expert_plot is not None:
        plot.usage_figure(usage, f"Expert usage: {len(prompts)} prompt"
                          f"{'s' * (len(prompts) != 1)}", args.expert_plot)
    s = run.stats
    rate = s.decode_tokens / s.decode_s if s.decode_s > 0 else float("nan")
    print(f"compile {run.compile_s:.1f} s, prefill {s.prefill_s:.2f} s "
          f"({s.prefill_tokens} tokens), decode {rate:.1f} tokens/s "
          f"({s.decode_tokens} tokens)", file=err)


def _stream_in_order(events, prompts: list[str], out) -> None:
    """Writes each prompt's text as it arrives, prompts in order: the first streams live,
    later ones wait in a buffer until the ones before them are done."""
    pending: dict[int, list] = {i: [] for i in range(len(prompts))}  # None: row finished
    current, headed = 0, -1
    for index, event in events:
        pending[index] += [event.text, None] if event.finished else [event.text]
        while current < len(prompts) and pending[current]:
            if len(prompts) > 1 and headed < current:
                out.write(f"--- prompt {current}: {prompts[current]}\n")
                headed = current
            item = pending[current].pop(0)
            if item is None:
                out.write("\n")
                current += 1
            else:
                out.write(item)
        out.flush()


def main(argv: list[str] | None = None, out=None, err=None) -> int:
    """Runs the command line; returns the exit code (2 for any input error)."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        args = demo.parse_args(build_parser(), argv)
        distributed.initialize(args)  # before anything touches a JAX backend
        compilation.enable(args.compilation_cache)
        _run(args, *distributed.main_only(out, err))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=err)
        distributed.exit_on_failure(2)
        return 2
    return 0

