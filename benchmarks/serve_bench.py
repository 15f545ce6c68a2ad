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

`--scenario shared-prefix` and `--scenario long-arrival` (default config
benchmarks/configs/cpu-bench-4k.json, a 4096-token context) measure prefix caching and
chunked prefill instead, each against a server with the feature off, in the same run:

- shared prefix: 16 requests sharing a 1024-token preamble with different 32-token endings,
  at concurrency 4, whole prompts: time to first token p50 and total time with the cache
  over without it (targets <= 0.25 and <= 0.5);
- long arrival: 4 streams decoding; a 2048-token prompt arrives. The streams' largest
  inter-token gap while it is prefilled over their median gap before it arrived, with
  chunked prefill (target <= 3) and with whole prompts.

Progress goes to stderr, the figures to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
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
LONG_CONFIG = REPO / "benchmarks" / "configs" / "cpu-bench-4k.json"
PREAMBLE, ENDING, SHARED_REQUESTS, SHARED_CONCURRENCY, SHARED_NEW = 1024, 32, 16, 4, 16
# The streams' length outlasts the long prompt's prefill in chunks of 32 or more.
ARRIVAL_PROMPT, ARRIVAL_STREAMS = 2048, 4
SETTLE_TOKENS = 8  # long arrival: tokens every stream has before the "before" gaps count
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


class Server:
    """`python -m grok.serve` in its own process, on a free port of 127.0.0.1."""

    def __init__(self, args, checkpoint: Path, max_batch: int, max_seq_len: int,
                 flags: list[str] = (), repo: Path = REPO):
        self.repo = repo
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "grok.serve", "--checkpoint", str(checkpoint),
                    "--config", str(args.config), "--tokenizer", str(args.tokenizer),
                    "--port", str(self.port), "--max-batch", str(max_batch), "--max-seq-len",
                    str(max_seq_len), "--max-queue", str(4 * max_batch), "--model-name", MODEL,
                    "--no-warmup", "--log-level", "warning", *flags]
        if args.mesh:
            self.cmd += ["--mesh", args.mesh]

    def __enter__(self) -> str:
        log(f"starting the server: {' '.join(self.cmd)}")
        self.log = tempfile.NamedTemporaryFile("w+", prefix="serve-bench-", suffix=".log")
        env = {**os.environ, "PYTHONPATH": str(self.repo)}  # that checkout's grok
        self.proc = subprocess.Popen(self.cmd, cwd=self.repo, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env)
        _wait_ready(self.url, self.proc, self.log)
        return self.url

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def shared_prefix(url: str, work: list[list[int]], new_tokens: int) -> dict:
    """The shared-prefix workload: requests at concurrency 4, time to first token and
    total time."""
    result = await level(url, SHARED_CONCURRENCY, work, new_tokens)
    return {k: result[k] for k in ("wall_s", "ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms")}


def measure_shared_prefix(args, checkpoint: Path, config) -> dict:
    rng = np.random.default_rng(1)
    preamble = rng.integers(3, config.vocab_size, PREAMBLE).tolist()

    def workload(seed: int) -> list[list[int]]:  # new endings each run: no full-prompt hits
        r = np.random.default_rng(seed)
        return [preamble + r.integers(3, config.vocab_size, ENDING).tolist()
                for _ in range(SHARED_REQUESTS)]

    max_seq_len = PREAMBLE + ENDING + SHARED_NEW
    out = {}
    # Whole prompts on both sides: this measures the cache (chunking is long-arrival's).
    for name, flags in (("cache_on", ["--prefill-chunk", "0"]),
                        ("cache_off", ["--prefill-chunk", "0", "--no-prefix-cache"])):
        with Server(args, checkpoint, SHARED_CONCURRENCY, max_seq_len, flags) as url:
            log(f"shared prefix, {name}: compiling run ...")
            asyncio.run(shared_prefix(url, workload(100), SHARED_NEW))
            runs = []
            for repeat in range(args.repeats):
                # A fresh preamble per measured run, so the cache starts cold each time.
                preamble[:] = np.random.default_rng(200 + repeat).integers(
                    3, config.vocab_size, PREAMBLE).tolist()
                runs.append(asyncio.run(shared_prefix(url, workload(300 + repeat),
                                                      SHARED_NEW)))
            out[name] = min(runs, key=lambda r: r["wall_s"])
            log(f"  {out[name]}")
    on, off = out["cache_on"], out["cache_off"]
    out["ratios"] = {"ttft_p50_on_over_off": round(on["ttft_p50_ms"] / off["ttft_p50_ms"], 3),
                     "wall_on_over_off": round(on["wall_s"] / off["wall_s"], 3)}
    out["targets"] = {"ttft_p50_on_over_off": "<= 0.25", "wall_on_over_off": "<= 0.5"}
    return out


async def long_arrival(url: str, streams: list[list[int]], long_prompt: list[int],
                       new_tokens: int) -> dict:
    """`streams` decode; once each has a few tokens, the long prompt is sent. The streams'
    gaps between tokens while it is prefilled (from its send to its first token) against
    their median gap before it was sent, once all of them were decoding (the steps that
    admitted them, prefills or chunks, are not decode steps)."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        times = [[] for _ in streams]
        tasks = [asyncio.ensure_future(stream_one(client, p, new_tokens, t))
                 for p, t in zip(streams, times, strict=True)]
        while min(len(t) for t in times) < SETTLE_TOKENS:
            await asyncio.sleep(0.002)
        settled = time.perf_counter()
        while min(len(t) for t in times) < 2 * SETTLE_TOKENS:
            await asyncio.sleep(0.002)
        sent = time.perf_counter()
        long_times: list[float] = []
        long = await stream_one(client, long_prompt, 1, long_times)
        first = long["start"] + long_times[0]
        results = await asyncio.gather(*tasks)
    if min(r["start"] + r["times"][-1] for r in results) < first:
        raise SystemExit("a stream ended before the long prompt's first token: make the "
                         "streams longer")
    before, during = [], []
    for r in results:
        stamps = [r["start"] + t for t in r["times"]]
        for a, b in itertools.pairwise(stamps):
            if settled <= a and b <= sent:
                before.append(b - a)
            elif a < first and b > sent:
                during.append(b - a)
    median = float(np.median(before))
    return {"prefill_s": round(first - sent, 3), "median_gap_ms": round(median * 1e3, 2),
            "largest_gap_ms": round(max(during) * 1e3, 2),
            "ratio": round(max(during) / median, 2)}


def measure_long_arrival(args, checkpoint: Path, config) -> dict:
    rng = np.random.default_rng(2)
    streams = rng.integers(3, config.vocab_size, (ARRIVAL_STREAMS, args.prompt_len)).tolist()
    max_seq_len = ARRIVAL_PROMPT + 1
    out = {}
    for chunk in [*args.arrival_chunks, 0]:
        name = f"chunk {chunk}" if chunk else "whole"
        flags = ["--no-prefix-cache", "--prefill-chunk", str(chunk)]
        # The streams outlast the long prompt's prefill: a step per chunk, and some more.
        new_tokens = 2 * SETTLE_TOKENS + (ARRIVAL_PROMPT // chunk if chunk else 0) + 32
        with Server(args, checkpoint, ARRIVAL_STREAMS + 1,
                    max(max_seq_len, args.prompt_len + new_tokens), flags) as url:
            log(f"long arrival, {name}: compiling run ...")
            long_prompt = rng.integers(3, config.vocab_size, ARRIVAL_PROMPT).tolist()
            asyncio.run(long_arrival(url, streams, long_prompt, new_tokens))
            runs = [asyncio.run(long_arrival(url, streams, rng.integers(
                3, config.vocab_size, ARRIVAL_PROMPT).tolist(), new_tokens))
                for _ in range(args.repeats)]
            out[name] = max(runs, key=lambda r: r["ratio"])  # the worst run
            log(f"  {out[name]}")
    out["targets"] = {"ratio with the default chunk": "<= 3"}
    return out


def measure(args, checkpoint: Path, config, work: list[list[int]]) -> dict:
    """Starts the server (and, with --baseline-repo, the same server from that checkout),
    loads the same weights here for `Grok.generate`, and measures each level served and
    offline back to back (this machine's speed drifts with its load, so the two sides of a
    ratio are taken minutes apart at most)."""
    batch = max(args.concurrency)
    max_seq_len = min(config.sequence_len, args.prompt_len + max(LONG, args.new_tokens))
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(Server(args, checkpoint, batch, max_seq_len))
        baseline = None
        if args.baseline_repo is not None:
            baseline = stack.enter_context(Server(args, checkpoint, batch, max_seq_len,
                                                  repo=args.baseline_repo))
        return _levels(args, checkpoint, config, url, work, baseline)


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


def _levels(args, checkpoint: Path, config, url: str, work: list[list[int]],
            baseline: str | None = None) -> dict:
    from grok import Grok

    log("loading the weights for offline generation ...")
    grok = Grok.load(checkpoint, config, mesh_shape=tuple(int(n) for n in args.mesh.split(
        "x")) if args.mesh else None)
    served, offline, before = {}, {}, {}
    for c in sorted({1, *args.concurrency}):
        jobs = work[: c * args.rounds]
        log(f"concurrency {c}: compiling runs ...")
        asyncio.run(level(url, c, jobs, args.new_tokens))
        if baseline is not None:
            asyncio.run(level(baseline, c, jobs, args.new_tokens))
        generate(grok, work[:c], args.new_tokens)
        for _ in range(args.repeats):
            run = asyncio.run(level(url, c, jobs, args.new_tokens))
            if c not in served or run["wall_s"] < served[c]["wall_s"]:
                served[c] = run
            if baseline is not None:
                run = asyncio.run(level(baseline, c, jobs, args.new_tokens))
                if c not in before or run["wall_s"] < before[c]["wall_s"]:
                    before[c] = run
            run = generate(grok, work[:c], args.new_tokens)
            if c not in offline or run["wall_s"] < offline[c]["wall_s"]:
                offline[c] = run
        log(f"  served {served[c]}\n  offline {offline[c]}"
            + (f"\n  baseline {before[c]}" if baseline is not None else ""))
    log("a short request while a long one decodes ...")
    asyncio.run(mixed(url, work[0], work[1]))  # compiles the lengths it meets
    mix = min((asyncio.run(mixed(url, work[0], work[1])) for _ in range(args.repeats)),
              key=lambda m: m["ratio"])
    log(f"  {mix}")
    return {"served": {c: served[c] for c in args.concurrency}, "offline": offline,
            "mixed": mix, "baseline": {c: before[c] for c in args.concurrency if c in before}}


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
    parser.add_argument("--scenario", choices=["levels", "shared-prefix", "long-arrival"],
                        default="levels")
    parser.add_argument("--config", type=Path,
                        help=f"default: {DEFAULT_CONFIG.name}, or {LONG_CONFIG.name} for "
                             "the prefix and arrival scenarios")
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
    parser.add_argument("--arrival-chunks", type=int, nargs="+", default=[16, 32, 64],
                        help="long-arrival: the --prefill-chunk values to measure (and whole "
                             "prompts)")
    parser.add_argument("--baseline-repo", type=Path,
                        help="also serve from this checkout (another version of the project) "
                             "and report each level's served tokens/s against it, measured "
                             "alternately in this run")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    if args.config is None:
        args.config = DEFAULT_CONFIG if args.scenario == "levels" else LONG_CONFIG

    from grok import GrokConfig

    config = GrokConfig.from_json(args.config)
    if args.scenario != "levels":
        import jax

        with tempfile.TemporaryDirectory(prefix="grok-serve-bench-") as scratch:
            checkpoint = args.checkpoint
            if checkpoint is None:
                from bench import write_random_checkpoint

                checkpoint = Path(scratch)
                write_random_checkpoint(args.config, checkpoint)
            measure_scenario = (measure_shared_prefix if args.scenario == "shared-prefix"
                                else measure_long_arrival)
            figures = {"scenario": args.scenario, "config": str(args.config),
                       "device": f"{jax.devices()[0].platform} x{len(jax.devices())}",
                       "cpus": os.cpu_count(), **measure_scenario(args, checkpoint, config)}
        print(json.dumps(figures, indent=1))
        return 0
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
    for c, run in results["baseline"].items():
        ratios[f"tokens_per_s_at_{c}_over_baseline"] = round(
            levels[c]["tokens_per_s"] / run["tokens_per_s"], 3)
    figures = {
        "config": str(args.config), "device": f"{jax.devices()[0].platform} "
        f"x{len(jax.devices())}", "cpus": os.cpu_count(), "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "served": list(levels.values()),
        "offline": list(alone.values()), "mixed": results["mixed"],
        "baseline": list(results["baseline"].values()), "ratios": ratios,
        "targets": {"served_over_offline_tokens_per_s_at_8": ">= 0.85",
                    "itl_p50_at_1_over_offline_decode_step_b1": "<= 1.10",
                    "short_with_long_over_alone": "<= 2 and finished first"},
    }
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
