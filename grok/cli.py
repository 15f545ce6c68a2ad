"""Command line: sample from a checkpoint, streaming text or printing JSON lines.

Run as `grok-run`, `python -m grok`, `python -m grok.cli` or the repository's `run.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from grok import __version__, compilation, demo, distributed, plot, sharding
from grok.api import Grok, run_shape
from grok.config import PRESETS, resolve_config
from grok.engine.prefix_cache import DEFAULT_BLOCK_SIZE, PrefixCacheSettings
from grok.engine.progress import ProgressLine
from grok.engine.request import GenerationSettings, make_request
from grok.errors import GrokError
from grok.layers import LAYER_MODES
from grok.moe import STRATEGIES
from grok.plan.sizes import RunShape, check_fits
from grok.quant import DEFAULT_INT4_GROUP, WEIGHT_MODES
from grok.structured import Choice, Ebnf, JsonObject, JsonSchema, Regex, Structure
from grok.structured.compiler import GrammarCompiler
from grok.tokenizer import Tokenizer

# Relative to where the command runs, so an installed package finds the user's files.
DEFAULT_CHECKPOINT = Path("checkpoints")
DEFAULT_TOKENIZER = Path("tokenizer") / "tokenizer.model"
DEFAULT_PROMPT = "The answer to life the universe and everything is of course"
# How the usage line names the program, by how it was started.
_PROGRAMS = {"__main__.py": "python -m grok", "cli.py": "python -m grok.cli"}

EPILOG = f"""\
Without --checkpoint and with no checkpoints/ckpt-0 in the current directory, the demo
model that ships with the package runs instead (see grok/demo.py): its own checkpoint,
config and tokenizer, greedy sampling (--temperature 0), --max-new-tokens
{demo.MAX_NEW_TOKENS} and --mesh 1x1, wherever those flags are not given. On CPU, --mesh
needs as many devices as it names: XLA_FLAGS=--xla_force_host_platform_device_count=N
simulates N. Bad input exits with code 2 and one line on stderr."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for every script here: a rejected flag raises UsageError, which the script
    prints as one line with exit code 2, instead of a usage dump."""

    def error(self, message):
        raise UsageError(message)


class UsageError(GrokError):
    """A flag argparse rejects."""


def _mesh(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--mesh must be DATAxMODEL, e.g. 1x8, got {text!r}")
    return int(parts[0]), int(parts[1])


def _logit_bias(text: str) -> tuple[int, float]:
    """--logit-bias ID=BIAS."""
    token, _, bias = text.partition("=")
    try:
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--logit-bias must be ID=BIAS, e.g. 2=-100, got {text[:40]!r}") from None


AUTO = "auto"  # --max-batch: the most slots that fit


def max_batch_arg(text: str) -> int | str:
    """--max-batch: a positive integer, or 'auto'."""
    if text == AUTO:
        return AUTO
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-batch must be a positive integer or "
                                         f"'auto', got {text!r:.40}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--max-batch must be at least 1, got {value}")
    return value


def _program() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "grok-run"
    return _PROGRAMS.get(name, name)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=_program(), description="Sample text from a Grok-1 checkpoint.",
                       epilog=EPILOG)
    p.add_argument("--prompt", action="append",
                   help=f"a prompt (repeat for a batch; default: {DEFAULT_PROMPT!r}, or five "
                        f"addition problems for the demo)")
    p.add_argument("--prompt-file", type=Path, help="one prompt per non-blank line")
    add_model_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=100,
                   help="tokens to generate at most per prompt (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.01,
                   help="0 is greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus filter, as the release (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="0 is off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="default: %(default)s")
    p.add_argument("--stop", action="append", help="stop string (repeatable; default: none)")
    p.add_argument("--stop-token-id", type=int, action="append", dest="stop_token_ids",
                   metavar="ID", help="a token id that ends a row when drawn (repeatable)")
    p.add_argument("--min-tokens", type=int, default=0,
                   help="EOS, stop tokens and stop strings count only after this many "
                        "tokens (default: %(default)s)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtracted once from each generated token's logit, in [-2, 2] "
                        "(OpenAI's; default: %(default)s)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtracted per occurrence of a generated token, in [-2, 2] "
                        "(OpenAI's; default: %(default)s)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 0: logits of prompt and generated tokens divided by it where "
                        "positive, multiplied where not (vLLM's; 1 is off)")
    p.add_argument("--logit-bias", type=_logit_bias, action="append", metavar="ID=BIAS",
                   help="add BIAS (clamped to [-100, 100]) to token ID's logit (repeatable)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE|JSON",
                       help="the output is JSON valid against this schema (a file, or the "
                            "schema's text); needs the 'structured' extra: xgrammar")
    shape.add_argument("--json-object", action="store_true",
                       help="the output is a JSON object")
    shape.add_argument("--regex", help="the output matches this regular expression")
    shape.add_argument("--choice", action="append",
                       help="the output is one of these strings (repeatable)")
    shape.add_argument("--grammar", type=Path, metavar="FILE",
                       help="the output follows this EBNF grammar (start rule: root)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt instead of streaming text")
    p.add_argument("--expert-stats", type=Path, metavar="FILE.json",
                   help="write the run's expert-routing tallies (per layer and expert, "
                        "prefill and decode) as JSON")
    p.add_argument("--expert-plot", type=Path, metavar="FILE.png",
                   help="draw the run's expert usage: layers x experts heat maps and "
                        "per-layer imbalance (needs the 'plot' extra: matplotlib)")
    compilation.add_argument(p)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    distributed.add_arguments(p)
    return p


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Which model to load and how: shared by the command line and the server."""
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                   help=f"folder holding ckpt-0, or ckpt-0 itself (default: "
                        f"{DEFAULT_CHECKPOINT}/ in the current directory; while it holds no "
                        f"ckpt-0, the demo model)")
    p.add_argument("--config", default="grok-1",
                   help=f"preset ({', '.join(PRESETS)}) or JSON path (default: %(default)s)")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                   help="SentencePiece model (default: %(default)s)")
    p.add_argument("--mesh", type=_mesh, help="DATAxMODEL devices (default: 1xALL, one "
                                              "data row per process in a multi-process run)")
    p.add_argument("--weights", choices=WEIGHT_MODES,
                   help="int8: 8-bit weights on the devices; int4: the experts' in 4 bits, "
                        "requantised while loading (half the memory); dequantized: their "
                        "exact bf16 values, converted once (default: dequantized on CPU, "
                        "else int8)")
    p.add_argument("--int4-group", type=int, default=DEFAULT_INT4_GROUP, metavar="ROWS",
                   help="with --weights int4: rows of the contracting axis per 4-bit scale "
                        "(default: %(default)s)")
    p.add_argument("--moe", choices=list(STRATEGIES), default="sparse",
                   help="sparse: only the chosen experts run; dense: all, as the release "
                        "(default: %(default)s)")
    p.add_argument("--layers", choices=LAYER_MODES,
                   help="scan: one compiled layer body run over stacked weights (compile "
                        "time independent of depth); unrolled: every layer compiled (default: "
                        "unrolled on CPU, where XLA copies stacked weights' slices, else scan)")
    p.add_argument("--verify", action="store_true",
                   help="check every checkpoint file's size and SHA-256 against the manifest "
                        "beside ckpt-0 before loading (tools/checkpoint_manifest.py writes it)")
    c = p.add_argument_group("prefix cache")
    c.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the keys and values of full blocks of prompts, and reuse them "
                        "for later prompts that begin with the same tokens (default: on)")
    c.add_argument("--prefix-cache-blocks", type=int, metavar="N",
                   help="blocks the cache holds (default: as many positions as the decode "
                        "slots; a server on accelerators that report their memory takes what the "
                        "weights, slots and steps leave of --memory-fraction)")
    c.add_argument("--prefix-block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   metavar="TOKENS", help="tokens per cached block (default: %(default)s)")


def check_prefix_cache_flags(args) -> None:
    for flag, value in (("--prefix-block-size", args.prefix_block_size),
                        ("--prefix-cache-blocks", args.prefix_cache_blocks)):
        if value is not None and not 1 <= value <= 1 << 24:
            raise GrokError(f"{flag} must be in [1, 2**24], got {value}")


def prefix_cache_settings(args, slots: int, max_seq_len: int,
                          spare_blocks: Callable[[int], int | None] | None = None
                          ) -> PrefixCacheSettings | None:
    """The prefix cache the flags ask for, None with --no-prefix-cache. By default its
    blocks are `spare_blocks(block_size)` (what the devices have left), or as many positions
    as the decode state's `slots` x `max_seq_len` where that is None."""
    if not args.prefix_cache:
        return None
    check_prefix_cache_flags(args)
    block, blocks = args.prefix_block_size, args.prefix_cache_blocks
    if blocks is None:
        spare = None if spare_blocks is None else spare_blocks(block)
        blocks = max(1, slots * max_seq_len // block) if spare is None else spare
        if blocks < 1:
            raise GrokError("no prefix-cache block fits beside the model and its slots: give "
                            "--prefix-cache-blocks N with fewer --max-batch, or "
                            "--no-prefix-cache")
    return PrefixCacheSettings(blocks, block)


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file is not None:
        path = args.prompt_file
        if not path.is_file():
            raise GrokError(f"--prompt-file {str(path)!r} does not exist")
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            raise GrokError(f"--prompt-file {str(path)!r} holds no prompts: expected one "
                            f"prompt per line, found only blank lines or nothing")
        prompts += lines
    return prompts or [DEFAULT_PROMPT]


def _structure(args) -> Structure | None:
    """The output's structure from --json-schema, --json-object, --regex, --choice or
    --grammar."""
    if args.json_schema is not None:
        text = args.json_schema
        if not text.lstrip().startswith(("{", "true", "false")):
            try:
                text = Path(text).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise GrokError(f"--json-schema: {text[:80]!r} is neither a schema nor a "
                                f"readable file ({getattr(e, 'strerror', None) or e})"
                                ) from None
        return JsonSchema(text)
    if args.grammar is not None:
        try:
            return Ebnf(args.grammar.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise GrokError(f"--grammar {str(args.grammar)!r}: "
                            f"{getattr(e, 'strerror', None) or e}") from None
    if args.json_object:
        return JsonObject()
    if args.regex is not None:
        return Regex(args.regex)
    return None if args.choice is None else Choice(args.choice)


def _check_paths(args) -> None:
    """Says where the files go, and suggests a flag only where it was not given."""
    ckpt = args.checkpoint
    if not (ckpt / "ckpt-0").is_dir() and not (ckpt.name == "ckpt-0" and ckpt.is_dir()):
        where = ("expected a folder holding the released ckpt-0/ (770 tensor files, about "
                 "318 GB), or ckpt-0 itself")
        raise GrokError(f"no checkpoint at {str(ckpt)!r}: {where}; checkpoints/README.md "
                        f"says how to download it")
    if not args.tokenizer.is_file():
        given = args.tokenizer != DEFAULT_TOKENIZER
        hint = ("expected the released tokenizer.model (a SentencePiece model)" if given
                else "put the released tokenizer.model there or pass --tokenizer")
        raise GrokError(f"no tokenizer at {str(args.tokenizer)!r}: {hint}; "
                        f"tokenizer/README.md says where to get it")


def model_name(args) -> str:
    """How messages name the model: its preset or its config file's name."""
    if args.demo:
        return "the demo model"
    return args.config if args.config in PRESETS else Path(args.config).stem


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _run(args, out, err) -> None:
    # Everything a user can get wrong is checked before the banner and before minutes go
    # into loading, so that a mistake is one line.
    config = resolve_config(args.config)
    _check_paths(args)
    check_prefix_cache_flags(args)
    tokenizer = Tokenizer.from_config(args.tokenizer, config)
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop,
                    stop_token_ids=args.stop_token_ids, min_tokens=args.min_tokens,
                    presence_penalty=args.presence_penalty,
                    frequency_penalty=args.frequency_penalty,
                    repetition_penalty=args.repetition_penalty,
                    logit_bias=dict(args.logit_bias or ()),
                    structure=_structure(args))
    mesh = sharding.make_mesh(args.mesh)
    sharding.check_mesh(config, mesh)
    if args.expert_plot is not None:
        plot.require()
    for flag, path in (("--expert-stats", args.expert_stats),
                       ("--expert-plot", args.expert_plot)):
        if path is not None and not path.parent.is_dir():
            raise GrokError(f"{flag}: folder {str(path.parent)!r} does not exist")
    examples = args.demo and not args.prompt and args.prompt_file is None
    prompts = demo.example_prompts() if examples else _prompts(args)
    # The checks `Grok.run` makes (the structure compiled), and the memory its engine will
    # take, before the load rather than after it.
    grammars = grammar = None
    if settings["structure"] is not None:
        grammars = GrammarCompiler(tokenizer, config.vocab_size)
        grammar = grammars.compile(settings["structure"])
    requests = [make_request(config, tokenizer, prompt, GenerationSettings(**settings),
                             label=f"prompt {i}", grammar=grammar)
                for i, prompt in enumerate(prompts)]
    max_batch, max_seq_len = run_shape(config, requests)
    cache = prefix_cache_settings(args, max_batch, max_seq_len)
    check_fits(RunShape(config, args.mesh, args.weights, args.layers, args.moe, max_batch,
                        max_seq_len, args.int4_group), mesh, name=model_name(args))
    if args.demo:
        print(demo.BANNER, file=err)

    start = time.perf_counter()
    grok = Grok.load(args.checkpoint, config, tokenizer_path=tokenizer,
                     mesh_shape=args.mesh, weights=args.weights, moe=args.moe,
                     verify=args.verify, layers=args.layers, int4_group=args.int4_group)
    print(f"loaded in {time.perf_counter() - start:.1f} s on a "
          f"{grok.mesh.shape['data']}x{grok.mesh.shape['model']} mesh", file=err)
    grok.enable_prefix_cache(cache)
    if grammars is not None:
        grok.grammars = grammars  # compiled already
    run = grok.run(prompts, **settings)
    # Compiled first, behind one progress line: on the real model each program takes a while.
    before, hits, start = run.engine.compile_count, compilation.cache_hits(), time.perf_counter()
    run.engine.warmup(run.programs(), progress=ProgressLine("compiling", stream=err))
    new, loaded = run.engine.compile_count - before, compilation.cache_hits() - hits
    print(f"{_plural(new - loaded, 'program')} compiled, {loaded} loaded from the compilation "
          f"cache, in {time.perf_counter() - start:.1f} s", file=err)
    run.engine.log = lambda line: print(line, file=err, flush=True)  # any the run still needs
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
          f"({_plural(s.prefill_tokens, 'token')}), decode {rate:.1f} tokens/s "
          f"({_plural(s.decode_tokens, 'token')})", file=err)


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
    except (GrokError, OSError) as e:
        print(f"error: {_one_line(e)}", file=err)
        distributed.exit_on_failure(2)
        return 2
    except SystemExit as e:  # --help and --version print, then end here
        return e.code if isinstance(e.code, int) else 0
    return 0


def _one_line(e: Exception, limit: int = 1000) -> str:
    """The message on one printable line of bounded length."""
    text = str(e).replace("\r", " ").replace("\n", " ") or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())

