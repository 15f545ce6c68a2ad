"""Serving benchmark: `python -m grok.serve` driven by concurrent streaming clients, against
offline `Grok.generate` on the same weights; figures as JSON.

    python benchmarks/serve_bench.py [--config CONFIG.json] [--checkpoint DIR]
        [--tokenizer FILE] [--concurrency 1 4 8 16] [--prompt-len 32] [--new-tokens 64]

Without --checkpoint it writes a random checkpoint of the config (default
benchmarks/configs/cpu-bench.json) in the released format. The server runs in its own
process with --max-batch the largest concurrency (and compiles per shape on first use);
each level runs once to compile, then served and offline runs alternate, the best of
--repeats kept for each, so that both sides of a ratio see the same machine. Every client streams
fixed token-id prompts with `ignore_eos` (and `logprobs: 0`, so that every token arrives as
its own event): output tokens/s over the level's wall time, time to first token and
inter-token latency (p50, p95) as the clients see them. Offline: `Grok.generate` in this
process on the same prompts at the batch of each level (and 1). The three
serving targets are printed as ratios measured in this run:

- served tokens/s at concurrency 8 over offline batch-8 generation (target >= 0.85);
- inter-token latency p50 at concurrency 1 over offline batch-1 decode time per token
  (target <= 1.10);
- a 16-token request sent while a 256-token request decodes: it finishes first, and its
  time over its time alone (target <= 2).

Progress goes to stderr, the figures to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

DEFAULT_CONFIG = REPO / "benchmarks" / "configs" / "cpu-bench.json"
DEFAULT_TOKENIZER = REPO.parent / "shared" / "tokenizer" / "grok-1-tokenizer.model"
MODEL = "bench"
LONG, SHORT = 256, 16  # the mixed-length target's two requests


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(vocab_size: int, count: int, length: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return rng.integers(3, vocab_size, (count, length)).tolist()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# --- the served side ---------------------------------------------------------------------


async def stream_one(client, prompt: list[int], new_tokens: int,
                     times: list[float] | None = None) -> dict:
    """One streaming request: when each token arrived (appended to `times` as they come),
    relative to the send."""
    import httpx

    body = {"model": MODEL, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "logprobs": 0}
    start = time.perf_counter()
    times = [] if times is None else times
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise httpx.HTTPStatusError(await r.aread(), request=r.request, response=r)
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                times.extend([time.perf_counter() - start]
                             * len(chunk["choices"][0]["logprobs"]["tokens"]))
    return {"start": start, "times": times}


async def level(url: str, concurrency: int, work: list[list[int]], new_tokens: int) -> dict:
    """`len(work)` requests, at most `concurrency` at once."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        queue = list(work)
        results = []

        async def worker():
            while queue:
                results.append(await stream_one(client, queue.pop(), new_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    tokens = sum(len(r["times"]) for r in results)
    assert tokens == len(work) * new_tokens, (tokens, len(work) * new_tokens)
    ttft = [r["times"][0] for r in results]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:], strict=False)]
    return {"concurrency": concurrency, "requests": len(work), "tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "ttft_p50_ms": round(percentile(ttft, 50) * 1e3, 2),
            "ttft_p95_ms": round(percentile(ttft, 95) * 1e3, 2),
            "itl_p50_ms": round(percentile(itl, 50) * 1e3, 2),
            "itl_p95_ms": round(percentile(itl, 95) * 1e3, 2)}


async def mixed(url: str, long_prompt: list[int], short_prompt: list[int]) -> dict:
    """The short request alone, then sent once the long one has decoded a few tokens."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        alone = (await stream_one(client, short_prompt, SHORT))["times"][-1]
        long_times: list[float] = []
        long_task = asyncio.ensure_future(stream_one(client, long_prompt, LONG, long_times))
        while len(long_times) < SHORT:  # until the long one is well into its decode
            await asyncio.sleep(0.005)
        sent = time.perf_counter()
        short = await stream_one(client, short_prompt, SHORT)
        short_done = time.perf_counter()
        long = await long_task
        long_done = long["start"] + long["times"][-1]
    together = short["times"][-1]
    return {"short_alone_s": round(alone, 3), "short_with_long_s": round(together, 3),
            "short_finished_first": short_done < long_done,
            "long_tokens_before_short_sent": sum(
                t < sent - long["start"] for t in long["times"]),
            "ratio": round(together / alone, 3)}


def measure(args, checkpoint: Path, config, work: list[list[int]]) -> dict:
    """Starts the server, loads the same weights here for `Grok.generate`, and measures
    each level served and offline back to back (this machine's speed drifts with its
    load, so the two sides of a ratio are taken minutes apart at most)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    batch = max(args.concurrency)
    max_seq_len = min(config.sequence_len, args.prompt_len + max(LONG, args.new_tokens))
    cmd = [sys.executable, "-m", "grok.serve", "--checkpoint", str(checkpoint), "--config",
           str(args.config), "--tokenizer", str(args.tokenizer), "--port", str(port),
           "--max-batch", str(batch), "--max-seq-len", str(max_seq_len), "--max-queue",
           str(4 * batch), "--model-name", MODEL, "--no-warmup", "--log-level", "warning"]
    if args.mesh:
        cmd += ["--mesh", args.mesh]
    log(f"starting the server: {' '.join(cmd)}")
    with tempfile.NamedTemporaryFile("w+", prefix="serve-bench-", suffix=".log") as server_log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=server_log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(url, proc, server_log)
            return _levels(args, checkpoint, config, url, work)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_ready(url: str, proc: subprocess.Popen, server_log) -> None:
    import httpx

    while True:
        if proc.poll() is not None:
            server_log.seek(0)
            raise SystemExit(f"the server exited:\n{server_log.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def _levels(args, checkpoint: Path, config, url: str, work: list[list[int]]) -> dict:
    from grok import Grok

    log("loading the weights for offline generation ...")
    grok = Grok.load(checkpoint, config, mesh_shape=tuple(int(n) for n in args.mesh.split(
        "x")) if args.mesh else None)
    served, offline = {}, {}
    for c in sorted({1, *args.concurrency}):
        jobs = work[: c * args.rounds]
        log(f"concurrency {c}: compiling runs ...")
        asyncio.run(level(url, c, jobs, args.new_tokens))
        generate(grok, work[:c], args.new_tokens)
        for _ in range(args.repeats):
            run = asyncio.run(level(url, c, jobs, args.new_tokens))
            if c not in served or run["wall_s"] < served[c]["wall_s"]:
                served[c] = run
            run = generate(grok, work[:c], args.new_tokens)
            if c not in offline or run["wall_s"] < offline[c]["wall_s"]:
                offline[c] = run
        log(f"  served {served[c]}\n  offline {offline[c]}")
    log("a short request while a long one decodes ...")
    asyncio.run(mixed(url, work[0], work[1]))  # compiles the lengths it meets
    mix = min((asyncio.run(mixed(url, work[0], work[1])) for _ in range(args.repeats)),
              key=lambda m: m["ratio"])
    log(f"  {mix}")
    return {"served": {c: served[c] for c in args.concurrency}, "offline": offline,
            "mixed": mix}


def generate(grok, batch_prompts: list[list[int]], new_tokens: int) -> dict:
    """One `Grok.generate` call: output tokens/s over the whole call (prefill included, as
    a served level's wall time includes it) and decode ms per step."""
    run = grok.run(batch_prompts, max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    for _ in run:
        pass
    wall = time.perf_counter() - start
    s = run.stats
    return {"batch": len(batch_prompts), "wall_s": round(wall, 3),
            "tokens_per_s": round(len(batch_prompts) * new_tokens / wall, 2),
            "decode_ms_per_step": round(s.decode_s / max(s.decode_steps, 1) * 1e3, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--checkpoint", type=Path,
                        help="existing checkpoint (default: write a random one)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                        help="SentencePiece model with at least the config's vocabulary")
    parser.add_argument("--mesh", help="DATAxMODEL (default: 1xALL)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=2,
                        help="requests per client at each level (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="measured runs of each side, the best kept (default: %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    from grok import GrokConfig

    config = GrokConfig.from_json(args.config)
    work = prompts(config.vocab_size, max(args.concurrency) * args.rounds, args.prompt_len)
    with tempfile.TemporaryDirectory(prefix="grok-serve-bench-") as scratch:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from bench import write_random_checkpoint

            checkpoint = Path(scratch)
            write_random_checkpoint(args.config, checkpoint)
        results = measure(args, checkpoint, config, work)

    import jax

    levels, alone = results["served"], results["offline"]
    ratios = {}
    if 8 in levels:
        ratios["served_over_offline_tokens_per_s_at_8"] = round(
            levels[8]["tokens_per_s"] / alone[8]["tokens_per_s"], 3)
    if 1 in levels:
        ratios["itl_p50_at_1_over_offline_decode_step_b1"] = round(
            levels[1]["itl_p50_ms"] / alone[1]["decode_ms_per_step"], 3)
    ratios["short_with_long_over_alone"] = results["mixed"]["ratio"]
    figures = {
        "config": str(args.config), "device": f"{jax.devices()[0].platform} "
        f"x{len(jax.devices())}", "cpus": os.cpu_count(), "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "served": list(levels.values()),
        "offline": list(alone.values()), "mixed": results["mixed"], "ratios": ratios,
        "targets": {"served_over_offline_tokens_per_s_at_8": ">= 0.85",
                    "itl_p50_at_1_over_offline_decode_step_b1": "<= 1.10",
                    "short_with_long_over_alone": "<= 2 and finished first"},
    }
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
