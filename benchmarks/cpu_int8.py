"""Can CPU hold 8-bit weights and still multiply at float32 speed? Forms of one product.

    python benchmarks/cpu_int8.py [--k 6144] [--n 8192] [--rounds 5]

CPU holds every weight as float32 today: XLA:CPU runs a product with an int8 or bf16
operand many times slower. Each form below computes `x @ dequantize(w)` with the release's
numbers (each value round_bf16(int8 * scale), products in float32) from int8 values and
bf16 scales in memory, except the float32 baseline, which reads the dequantised weight.
Every form is checked against the baseline's result, then all are timed alternating, in
rounds, at batch 1 and 8; the figures are medians of the rounds (ms), printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def dequantized(q, s):  # q int8 [K, N], s bf16 [1, N] -> the release's values, in float32
    return (q.astype(jnp.float32) * s.astype(jnp.float32)).astype(jnp.bfloat16) \
        .astype(jnp.float32)


def forms(k: int) -> dict:
    def baseline(x, w32, q, s):
        return x @ w32

    def one_shot(x, w32, q, s):
        return x @ dequantized(q, s)

    def rows(chunk):  # scan over chunks of the contracting axis, accumulating
        def f(x, w32, q, s):
            def body(acc, i):
                block = jax.lax.dynamic_slice_in_dim(q, i * chunk, chunk, 0)
                xs = jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, 1)
                return acc + xs @ dequantized(block, s), None
            start = jnp.zeros((x.shape[0], q.shape[1]), jnp.float32)
            return jax.lax.scan(body, start, jnp.arange(k // chunk))[0]
        return f

    def columns(chunk):  # scan over chunks of the output axis, each written once
        def f(x, w32, q, s):
            def body(_, i):
                block = jax.lax.dynamic_slice_in_dim(q, i * chunk, chunk, 1)
                scale = jax.lax.dynamic_slice_in_dim(s, i * chunk, chunk, 1)
                return None, x @ dequantized(block, scale)
            _, out = jax.lax.scan(body, None, jnp.arange(q.shape[1] // chunk))
            return jnp.moveaxis(out, 0, 1).reshape(x.shape[0], -1)
        return f

    table = {"float32 weight (today)": baseline, "int8, one product": one_shot}
    for chunk in (64, 128, 256, 512, 1024):
        table[f"int8, rows in chunks of {chunk}"] = rows(chunk)
    for chunk in (256, 1024):
        table[f"int8, columns in chunks of {chunk}"] = columns(chunk)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=6144)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.integers(-127, 128, (args.k, args.n), dtype=np.int8))
    s = jnp.asarray(rng.uniform(1e-3, 1e-2, (1, args.n)).astype(jnp.bfloat16))
    w32 = dequantized(q, s)
    table = {name: jax.jit(fn) for name, fn in forms(args.k).items()}
    results = {}
    for batch in (1, 8):
        x = jnp.asarray(rng.standard_normal((batch, args.k)).astype(np.float32))
        want = np.asarray(table["float32 weight (today)"](x, w32, q, s))
        for name, fn in table.items():  # compiled and checked before anything is timed
            got = np.asarray(fn(x, w32, q, s))
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * np.abs(want).max(),
                                       err_msg=name)
        times: dict[str, list[float]] = {name: [] for name in table}
        for _ in range(args.rounds):
            for name, fn in table.items():
                best = float("inf")
                for _ in range(5):
                    start = time.perf_counter()
                    fn(x, w32, q, s).block_until_ready()
                    best = min(best, time.perf_counter() - start)
                times[name].append(best * 1e3)
        results[f"batch {batch}"] = {name: round(float(np.median(t)), 2)
                                     for name, t in times.items()}
        print(f"batch {batch}: {results[f'batch {batch}']}", file=sys.stderr, flush=True)
    print(json.dumps({"k": args.k, "n": args.n, "ms": results}, indent=1))


if __name__ == "__main__":
    main()
