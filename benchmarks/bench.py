"""Inference benchmark: load, compile, prefill and decode figures for one config, as JSON.

    python benchmarks/bench.py [--config CONFIG.json] [--checkpoint DIR] [--mesh 1x1]

Without --checkpoint it writes a random checkpoint of the config in the released format
(in a child process, so that its memory does not count towards this one's peak). Decode is
measured with the sparse MoE and, on the same loaded weights, with the dense all-experts
formulation the release uses. Progress goes to stderr, the figures to stdout.
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
from grok.quant import map_params, quantize, release_groups  # noqa: E402

DEFAULT_CONFIG = REPO.parent / "shared" / "benchmarks" / "cpu-bench.json"
DECODE_STEPS = 32
PROMPT_LEN = 64


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


def time_decode(grok: Grok, batch: int, repeats: int = 3) -> float:
    """Milliseconds per decode step (one new token for each of `batch` rows)."""
    cfg = grok.config
    no_eos = [t for t in range(cfg.vocab_size) if t != cfg.eos_token]
    prompts = random_prompts(cfg, batch, PROMPT_LEN, seed=batch)
    best = float("inf")
    for _ in range(repeats):
        run = grok.run(prompts, max_new_tokens=DECODE_STEPS + 1, temperature=0,
                       allowed_tokens=no_eos)
        for _ in run:
            pass
        best = min(best, run.stats.decode_s / run.stats.decode_steps)
    return best * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--checkpoint", type=Path,
                        help="existing checkpoint (default: write a random one)")
    parser.add_argument("--mesh", default=None, help="DATAxMODEL (default 1xALL)")
    parser.add_argument("--weights", choices=("int8", "dequantized"), default=None)
    args = parser.parse_args(argv)
    config = GrokConfig.from_json(args.config)
    mesh = tuple(int(n) for n in args.mesh.split("x")) if args.mesh else None

    with tempfile.TemporaryDirectory(prefix="grok-bench-") as scratch:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = Path(scratch)
            log(f"writing a random checkpoint of {args.config} to {checkpoint} ...")
            child = multiprocessing.get_context("spawn").Process(
                target=_write, args=(str(args.config), str(checkpoint)))
            child.start()
            child.join()
            if child.exitcode != 0:
                raise SystemExit(f"writing the checkpoint failed ({child.exitcode})")

        log("loading ...")
        start = time.perf_counter()
        grok = Grok.load(checkpoint, config, mesh_shape=mesh, weights=args.weights)
        jax.block_until_ready(grok.params)
        load_s = time.perf_counter() - start

        log("prefill ...")
        prefill = {n: time_prefill(grok, n) for n in (PROMPT_LEN, config.sequence_len - 1)}
        log("decode (sparse) ...")
        sparse = {b: time_decode(grok, b) for b in (1, 8)}
        compile_s = grok.compile_seconds
        log("decode (dense) ...")
        dense_grok = Grok(config, grok.params, grok.mesh, moe_strategy="dense")
        dense = {b: time_decode(dense_grok, b) for b in (1, 8)}

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
        "prefill_64_s": round(prefill[PROMPT_LEN], 4),
        # The longest prompt that leaves room for one new token; its bucket is the full
        # context, so the step costs the same as a full-length prompt.
        f"prefill_{config.sequence_len - 1}_s": round(prefill[config.sequence_len - 1], 4),
        "decode_ms_per_token_b1": round(sparse[1], 2),
        "decode_ms_per_step_b8": round(sparse[8], 2),
        "decode_tokens_per_s_b8": round(8e3 / sparse[8], 1),
        "dense_decode_ms_per_token_b1": round(dense[1], 2),
        "dense_decode_ms_per_step_b8": round(dense[8], 2),
        "sparse_speedup_b1": round(dense[1] / sparse[1], 2),
        "active_weight_bytes_per_token": active,
        "memory_bandwidth_gbs": round(bandwidth, 1),
        "active_read_ms": round(read_ms, 2),
        "decode_b1_over_read_time": round(sparse[1] / read_ms, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
    }
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
