"""Inference benchmark: load, compile, prefill and decode figures for one config, as JSON.

    python benchmarks/bench.py [--config CONFIG.json] [--checkpoint DIR] [--mesh 1x1]
                               [--weights int8] [--prompt-len 64] [--decode-steps 32]
                               [--compile-only]

Without --checkpoint it writes a random checkpoint of the config in the released format
(in a child process, so that its memory does not count towards this one's peak). Decode is
measured with the sparse MoE and, on the same loaded weights, with the dense all-experts
formulation the release uses. Compile time is measured per batch size (a fresh set of
compiled steps each), since it is part of what a user waits for. Progress goes to stderr,
the figures to stdout; a mistake in the arguments is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grok import Grok, GrokConfig, model  # noqa: E402
from grok.checkpoint import write_checkpoint  # noqa: E402
from grok.cli import ArgumentParser  # noqa: E402
from grok.errors import GrokError  # noqa: E402
from grok.layers import LAYER_MODES  # noqa: E402
from grok.params import release_groups  # noqa: E402
from grok.quant import DEFAULT_INT4_GROUP, WEIGHT_MODES, map_params, quantize  # noqa: E402

# 4 layers, d=1024, 16/8 heads, 8 experts of 5464, vocab 32768: the figures in README.md.
DEFAULT_CONFIG = REPO / "benchmarks" / "configs" / "cpu-bench.json"
DECODE_STEPS = 32
PROMPT_LEN = 64
COMPILE_BATCHES = (1, 2, 3, 4, 8)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def random_params(config: GrokConfig, seed: int = 0) -> dict:
    """Random weights with the release's storage (8-bit where it quantises), one tensor at a
    time so that no full float copy of the model is ever held."""
    rng = np.random.default_rng(seed)

    def make(path, sds):
        if path.endswith("scale"):
            return np.ones(sds.shape, np.float32)
        w = rng.standard_normal(sds.shape, dtype=np.float32)
        w /= np.sqrt(sds.shape[-2]) if len(sds.shape) >= 2 else 1.0
        groups = release_groups(path, sds.shape)
        return w if groups is None else quantize(w, groups)
    return map_params(make, model.abstract_params(config, quantized=False))


def _write(config_path: str, directory: str) -> None:
    write_checkpoint(directory, random_params(GrokConfig.from_json(config_path)))


def write_random_checkpoint(config_path: Path, directory: Path) -> None:
    """A random checkpoint of the config in the released format, written by a child
    process, so that the parameters' host memory is gone before anything is measured."""
    log(f"writing a random checkpoint of {config_path} to {directory} ...")
    child = multiprocessing.get_context("spawn").Process(
        target=_write, args=(str(config_path), str(directory)))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"writing the checkpoint failed ({child.exitcode})")


def memory_bandwidth_gbs(total_bytes: int = 1 << 30, count: int = 32) -> float:
    """Read bandwidth as decoding sees it: vector-matrix products over `count` distinct
    float32 matrices of 1 GiB in all, far more than any cache holds (a single matrix of a
    few tens of MB stays in L3 between runs and reads several times faster). Median of 5."""
    rows = 1024
    cols = total_bytes // 4 // count // rows
    matrices = [jnp.full((rows, cols), i, jnp.float32) for i in range(count)]
    vector = jnp.ones((1, rows), jnp.float32)
    read_all = jax.jit(lambda v, ms: sum(v @ m for m in ms))
    read_all(vector, matrices).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        read_all(vector, matrices).block_until_ready()
        times.append(time.perf_counter() - start)
    return count * rows * cols * 4 / float(np.median(times)) / 1e9


def active_bytes_per_token(grok: Grok) -> int:
    """Bytes of weights one decode step at batch 1 must read: everything but the experts,
    plus the chosen experts' share (X of E), plus the embedding once for the output."""
    cfg = grok.config
    share = cfg.num_selected_experts / cfg.num_experts
    total = 0.0
    for module, bundle in grok.params.items():
        for value in bundle.values():
            nbytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(value))
            total += nbytes * (share if "/moe/" in module + "/" else 1.0)
    return int(total)


def random_prompts(config: GrokConfig, batch: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(3, config.vocab_size, (batch, length)).tolist()


def time_prefill(grok: Grok, length: int, repeats: int = 3) -> float:
    prompt = random_prompts(grok.config, 1, length, seed=length)
    best = float("inf")
    for _ in range(repeats):
        run = grok.run(prompt, max_new_tokens=1, temperature=0)
        for _ in run:
            pass
        best = min(best, run.stats.prefill_s)
    return best


def time_decode(grok: Grok, batch: int, prompt_len: int, steps: int,
                repeats: int = 3) -> float:
    """Milliseconds per decode step (one new token for each of `batch` rows)."""
    cfg = grok.config
    no_eos = [t for t in range(cfg.vocab_size) if t != cfg.eos_token]
    prompts = random_prompts(cfg, batch, prompt_len, seed=batch)
    best = float("inf")
    for _ in range(repeats):
        run = grok.run(prompts, max_new_tokens=steps + 1, temperature=0,
                       allowed_tokens=no_eos)
        for _ in run:
            pass
        best = min(best, run.stats.decode_s / run.stats.decode_steps)
    return best * 1e3


def time_compile(grok: Grok, batch: int, prompt_len: int) -> float:
    """Seconds to compile the engine's steps for `batch` prompts, with nothing
    compiled before (a new model object on the same weights)."""
    fresh = Grok(grok.config, grok.params, grok.mesh, moe_strategy="sparse", layers=grok.layers)
    fresh.generate(random_prompts(grok.config, batch, prompt_len, seed=batch),
                   max_new_tokens=2, temperature=0)
    assert fresh.compile_count == 3, fresh.compile_count  # state, prefill, decode
    return fresh.compile_seconds


def compare_layers(grok: Grok, checkpoint: Path, args) -> dict:
    """Decode at batch 1 and 8 with the other layer mode (its own load of the weights),
    alternating with `grok`'s, best of three each: the two in the same minutes of a shared
    machine."""
    other_mode = "scan" if grok.layers == "unrolled" else "unrolled"
    log(f"decode ({other_mode} layers, alternating) ...")
    other = Grok.load(checkpoint, grok.config, mesh_shape=tuple(grok.mesh.shape.values()),
                      weights=args.weights, layers=other_mode, int4_group=args.int4_group)
    best: dict[tuple[str, int], float] = {}
    for _ in range(3):
        for loaded in (grok, other):
            for b in (1, 8):
                ms = time_decode(loaded, b, args.prompt_len, args.decode_steps, repeats=1)
                best[loaded.layers, b] = min(best.get((loaded.layers, b), ms), ms)
    out = {}
    for b in (1, 8):
        out[f"decode_ms_b{b}_{grok.layers}"] = round(best[grok.layers, b], 2)
        out[f"decode_ms_b{b}_{other_mode}"] = round(best[other_mode, b], 2)
        out[f"decode_b{b}_scan_over_unrolled"] = round(
            best["scan", b] / best["unrolled", b], 3)
    return out


def _mesh(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise GrokError(f"--mesh must be DATAxMODEL, e.g. 1x1, got {text!r}")
    return int(parts[0]), int(parts[1])


def main(argv=None) -> int:
    try:
        return run(argv)
    except GrokError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def run(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="model config JSON (default: %(default)s)")
    parser.add_argument("--checkpoint", type=Path,
                        help="existing checkpoint (default: write a random one)")
    parser.add_argument("--mesh", default=None, help="DATAxMODEL (default 1xALL)")
    parser.add_argument("--weights", choices=WEIGHT_MODES, default=None,
                        help="default: dequantized on CPU, else int8")
    parser.add_argument("--int4-group", type=_positive, default=DEFAULT_INT4_GROUP,
                        metavar="ROWS", help="with --weights int4: rows per 4-bit scale "
                                             "(default: %(default)s; the CPU bench config's "
                                             "experts take 8)")
    parser.add_argument("--prompt-len", type=_positive, default=PROMPT_LEN,
                        help="prompt tokens for the decode figures (default: %(default)s)")
    parser.add_argument("--decode-steps", type=_positive, default=DECODE_STEPS,
                        help="decode steps timed (default: %(default)s)")
    parser.add_argument("--layers", choices=LAYER_MODES, default=None,
                        help="default: unrolled on CPU, else scan")
    parser.add_argument("--compare-layers", action="store_true",
                        help="also time decode with the other layer mode, on its own copy of "
                             "the weights, alternating with this one")
    parser.add_argument("--compile-only", action="store_true",
                        help="only the compile times per batch size")
    args = parser.parse_args(argv)
    try:
        config = GrokConfig.from_json(args.config)
    except ValueError as e:
        raise GrokError(str(e)) from None
    mesh = _mesh(args.mesh)
    needed = args.prompt_len + args.decode_steps + 1
    if needed > config.sequence_len:
        raise GrokError(
            f"--prompt-len {args.prompt_len} and --decode-steps {args.decode_steps} need "
            f"{needed} positions, but {args.config} has sequence_len={config.sequence_len}; "
            f"pass smaller ones")
    if args.checkpoint is not None and not args.checkpoint.exists():
        raise GrokError(f"--checkpoint {str(args.checkpoint)!r} does not exist")

    with tempfile.TemporaryDirectory(prefix="grok-bench-") as scratch:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = Path(scratch)
            write_random_checkpoint(args.config, checkpoint)

        log("loading ...")
        start = time.perf_counter()
        try:
            grok = Grok.load(checkpoint, config, mesh_shape=mesh, weights=args.weights,
                             layers=args.layers, int4_group=args.int4_group)
        except ValueError as e:  # a mesh or checkpoint that does not fit
            raise GrokError(str(e)) from None
        jax.block_until_ready(grok.params)
        load_s = time.perf_counter() - start

        log("compile per batch size ...")
        time_compile(grok, 1, args.prompt_len)  # the first compile also pays one-time costs
        compile_by_batch = {b: round(time_compile(grok, b, args.prompt_len), 2)
                            for b in COMPILE_BATCHES}
        if args.compile_only:
            print(json.dumps({"config": str(args.config),
                              "compile_s_by_batch": compile_by_batch}, indent=1))
            return 0
        log("prefill ...")
        prefill = {n: time_prefill(grok, n)
                   for n in (args.prompt_len, config.sequence_len - 1)}
        log("decode (sparse) ...")
        sparse = {b: time_decode(grok, b, args.prompt_len, args.decode_steps) for b in (1, 8)}
        compile_s = grok.compile_seconds
        log("decode (sparse, expert statistics off) ...")
        quiet = Grok(config, grok.params, grok.mesh, expert_stats=False, layers=grok.layers)
        stats_off = {b: time_decode(quiet, b, args.prompt_len, args.decode_steps)
                     for b in (1, 8)}
        # Once more with them on, right after, so that drift on a shared machine does not
        # pass for their cost: the better of the two measurements counts.
        sparse = {b: min(sparse[b], time_decode(grok, b, args.prompt_len, args.decode_steps))
                  for b in (1, 8)}
        log("decode (dense) ...")
        dense_grok = Grok(config, grok.params, grok.mesh, moe_strategy="dense",
                          layers=grok.layers)
        dense = {b: time_decode(dense_grok, b, args.prompt_len, args.decode_steps)
                 for b in (1, 8)}
        layers = compare_layers(grok, checkpoint, args) if args.compare_layers else {}

    log("memory bandwidth ...")
    bandwidth = memory_bandwidth_gbs()
    active = active_bytes_per_token(grok)
    read_ms = active / (bandwidth * 1e9) * 1e3
    figures = {
        "config": str(args.config),
        "device": f"{jax.devices()[0].platform} x{len(jax.devices())}",
        "mesh": dict(grok.mesh.shape),
        "weights": "int8" if any("int8" in str(leaf.dtype) for leaf in
                                 jax.tree_util.tree_leaves(grok.params)) else "dequantized",
        "load_s": round(load_s, 2),
        "compile_s": round(compile_s, 2),
        # Prefill and one decode step, compiled afresh for each batch size (3 runs as 4).
        "compile_s_by_batch": compile_by_batch,
        f"prefill_{args.prompt_len}_s": round(prefill[args.prompt_len], 4),
        # The longest prompt that leaves room for one new token; its bucket is the full
        # context, so the step costs the same as a full-length prompt.
        f"prefill_{config.sequence_len - 1}_s": round(prefill[config.sequence_len - 1], 4),
        "decode_ms_per_token_b1": round(sparse[1], 2),
        "decode_ms_per_step_b8": round(sparse[8], 2),
        "decode_tokens_per_s_b8": round(8e3 / sparse[8], 1),
        "dense_decode_ms_per_token_b1": round(dense[1], 2),
        "dense_decode_ms_per_step_b8": round(dense[8], 2),
        "sparse_speedup_b1": round(dense[1] / sparse[1], 2),
        # Expert-routing tallies (on by default) against the same steps without them.
        "decode_ms_per_token_b1_stats_off": round(stats_off[1], 2),
        "decode_ms_per_step_b8_stats_off": round(stats_off[8], 2),
        "expert_stats_cost_b1_pct": round(100 * (sparse[1] / stats_off[1] - 1), 1),
        "expert_stats_cost_b8_pct": round(100 * (sparse[8] / stats_off[8] - 1), 1),
        "active_weight_bytes_per_token": active,
        "memory_bandwidth_gbs": round(bandwidth, 1),
        "active_read_ms": round(read_ms, 2),
        "decode_b1_over_read_time": round(sparse[1] / read_ms, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "layers": grok.layers,
        **layers,
    }
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
