"""What makes a request's numbers depend on what else is in flight, and what deterministic
steps cost; figures as JSON.

    python benchmarks/determinism.py [--config CONFIG.json] [--repeats 3]

Bits: one seeded request (temperature 1) decodes 40 tokens alone, and again while three
others, sent after its prefill, decode beside it; how many of its 40 log-probabilities
differ in any bit, with decode steps shrunk to the rows in use (the default) or over all
slots, the attended span bucketed or the whole cache, and with deterministic steps. On the
`tiny` preset with random weights in the release's format (4 slots of 64 positions).

Cost: on CPU the step time of default and deterministic engines for the given config
(default benchmarks/configs/cpu-bench.json, random weights; 16 slots of 288 positions,
chunks of 64): a decode step with 1 and with 8 requests running, and one 256-token prompt
to its first token; runs alternate, medians of `--repeats`.

Progress goes to stderr, the figures to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

DEFAULT_CONFIG = REPO / "benchmarks" / "configs" / "cpu-bench.json"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def drive(engine, prompts, settings, shrink_rows=True, join_after=1):
    """The first prompt alone for `join_after` steps, then the rest join; its completion and
    the step times."""
    from grok.engine.scheduler import Scheduler

    scheduler = Scheduler(engine, shrink_rows=shrink_rows)
    first = scheduler.submit(engine.make_request(prompts[0], settings[0]))
    done, times, step = None, [], 0
    while scheduler.has_work:
        if step == join_after:
            for prompt, s in zip(prompts[1:], settings[1:], strict=True):
                scheduler.submit(engine.make_request(prompt, s))
        start = time.perf_counter()
        for event in scheduler.step():
            if event.request_id == first and event.completion is not None:
                done = event.completion
        times.append(time.perf_counter() - start)
        step += 1
    return done, times


def bits() -> dict:
    from bench import write_random_checkpoint

    from grok import Grok
    from grok.config import TINY
    from grok.engine.engine import Buckets, Engine
    from grok.engine.request import GenerationSettings

    # The release's format (int8 weights, used as their bf16 values), as a real model is.
    with tempfile.TemporaryDirectory(prefix="grok-determinism-") as scratch:
        config = Path(scratch) / "tiny.json"
        TINY.to_json(config)
        write_random_checkpoint(config, Path(scratch) / "ckpt")
        grok = Grok.load(Path(scratch) / "ckpt", TINY, mesh_shape=(1, 1))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, TINY.vocab_size, 12).tolist(),
               *rng.integers(3, TINY.vocab_size, (3, 20)).tolist()]
    settings = [GenerationSettings(max_new_tokens=40, temperature=1.0, seed=3)] + [
        GenerationSettings(max_new_tokens=42, temperature=1.0, seed=i) for i in range(3)]
    out = {}
    variants = [("rows in use, attention bucketed (default)", None, True, False),
                ("all slots, attention bucketed", None, False, False),
                ("rows in use, whole cache attended", Buckets(16, 64, None), True, False),
                ("all slots, whole cache attended", Buckets(16, 64, None), False, False),
                ("deterministic steps", None, True, True)]
    for name, buckets, shrink, deterministic in variants:
        engine = Engine(grok, 4, 64, buckets=buckets, prefill_chunk=16,
                        deterministic=deterministic)
        alone, _ = drive(engine, prompts[:1], settings[:1], shrink)
        beside, _ = drive(engine, prompts, settings, shrink)
        differ = sum(a != b for a, b in zip(alone.output_logprobs, beside.output_logprobs,
                                            strict=True))
        out[name] = {"logprobs_with_other_bits": differ, "of": len(alone.output_logprobs),
                     "largest_difference": float(max(abs(a - b) for a, b in zip(
                         alone.output_logprobs, beside.output_logprobs, strict=True))),
                     "tokens_equal": alone.output_ids == beside.output_ids}
        log(f"  {name}: {out[name]}")
    return out


def cost(config: Path, repeats: int) -> dict:
    from bench import write_random_checkpoint

    from grok import Grok
    from grok.engine.request import GenerationSettings
    from grok.engine.scheduler import Scheduler

    with tempfile.TemporaryDirectory(prefix="grok-determinism-") as scratch:
        write_random_checkpoint(config, Path(scratch))
        grok = Grok.load(scratch, config, mesh_shape=(1, 1))
    vocab = grok.config.vocab_size
    rng = np.random.default_rng(1)
    engines = {"default": grok.engine(16, 288, prefill_chunk=64),
               "deterministic": grok.engine(16, 288, prefill_chunk=64, deterministic=True)}
    decode = GenerationSettings(max_new_tokens=24, temperature=0, ignore_eos=True)
    figures: dict[str, dict[str, list[float]]] = {}
    for repeat in range(repeats + 1):  # the first compiles
        for name, engine in engines.items():
            for n in (1, 8):
                prompts = rng.integers(3, vocab, (n, 32)).tolist()
                _, times = drive(engine, prompts, [decode] * n, join_after=0)
                if repeat:
                    figures.setdefault(f"decode step ms, {n} running", {}).setdefault(
                        name, []).append(float(np.median(times[2:])) * 1e3)
            scheduler = Scheduler(engine)
            scheduler.submit(engine.make_request(rng.integers(3, vocab, 256).tolist(),
                                                 GenerationSettings(max_new_tokens=1)))
            start = time.perf_counter()
            while scheduler.has_work:
                scheduler.step()
            if repeat:
                figures.setdefault("256-token prompt to first token ms", {}).setdefault(
                    name, []).append((time.perf_counter() - start) * 1e3)
        log(f"  repeat {repeat} done")
    out = {}
    for what, by_engine in figures.items():
        row = {name: round(float(np.median(v)), 1) for name, v in by_engine.items()}
        row["ratio"] = round(row["deterministic"] / row["default"], 2)
        out[what] = row
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    import jax

    log("bits (tiny preset) ...")
    figures = {"device": f"{jax.devices()[0].platform} x{len(jax.devices())}",
               "cpus": os.cpu_count(), "bits": bits()}
    log(f"cost ({args.config.name}) ...")
    figures["cost"] = cost(args.config, args.repeats)
    print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
