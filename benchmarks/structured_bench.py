"""What structured output costs a server, and whether a real client's parse succeeds;
figures as JSON.

    python benchmarks/structured_bench.py [--config CONFIG.json] [--checkpoint DIR]
        [--tokenizer FILE] [--concurrency 8] [--new-tokens 64] [--repeats 2]

Without --checkpoint it writes a random checkpoint of the config (default
benchmarks/configs/cpu-bench.json), so the model's free output is noise. One server
(`python -m grok.serve`, --max-batch the concurrency, a chat template that passes the
user's text through) takes, in turn, two loads of `concurrency` streaming requests with
fixed token-id prompts: free (greedy, ignore_eos) and constrained to a JSON schema
(`response_format`, greedy). Each kind runs once to compile, then the kinds alternate for
--repeats runs, so that both sides of the ratio see the same machine; each kind's figures
are those of its run with the median ITL p50. Inter-token latency is the gap between
consecutive tokens of a stream, as its client sees them (a constrained stream may end
early, when its JSON is complete). Then the
`openai` client's `chat.completions.parse` with a Pydantic model, once per seed: how many
replies parse and validate, and how many free replies are JSON at all.

Target: constrained ITL p50 over free ITL p50 at concurrency 8 <= 1.15.
Progress goes to stderr, the figures to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serve_bench import (  # noqa: E402 (after the path)
    DEFAULT_CONFIG,
    DEFAULT_TOKENIZER,
    MODEL,
    Server,
    log,
    percentile,
    prompts,
)

# Long enough that most streams run to max_tokens on a random model.
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 16},
             "minItems": 4, "maxItems": 4},
    "score": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["title", "tags", "score"]}
PARSE_SEEDS = 16
PARSE_TOKENS = 128  # a Card's JSON takes up to about 60 tokens; bytes of odd characters more


async def stream(client, body: dict) -> list[float]:
    """When each token of one streamed completion arrived, from the send."""
    start, times = time.perf_counter(), []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"the server answered {r.status_code}: {await r.aread()!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                times += [time.perf_counter() - start] * len(
                    chunk["choices"][0]["logprobs"]["tokens"])
    return times


async def load(url: str, work: list[list[int]], new_tokens: int, constrained: bool) -> dict:
    """Every prompt of `work` at once."""
    import httpx

    extra = {"response_format": {"type": "json_schema", "json_schema": {
        "name": "card", "schema": SCHEMA}}} if constrained else {"ignore_eos": True}
    async with httpx.AsyncClient(base_url=url, timeout=3600,
                                 limits=httpx.Limits(max_connections=len(work) + 4)) as client:
        start = time.perf_counter()
        runs = await asyncio.gather(*(stream(client, {
            "model": MODEL, "prompt": p, "max_tokens": new_tokens, "temperature": 0,
            "stream": True, "logprobs": 0, **extra}) for p in work))
        wall = time.perf_counter() - start
    itl = [b - a for times in runs for a, b in itertools.pairwise(times)]
    tokens = sum(len(t) for t in runs)
    return {"requests": len(work), "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2),
            "itl_p50_ms": round(percentile(itl, 50) * 1e3, 2),
            "itl_p95_ms": round(percentile(itl, 95) * 1e3, 2)}


def parse_check(url: str, concurrency: int) -> dict:
    """The openai client's structured outputs against the server, and its free replies."""
    import openai
    import pydantic

    class Card(pydantic.BaseModel):
        title: str = pydantic.Field(max_length=16)
        tags: list[Annotated[str, pydantic.Field(max_length=8)]] = pydantic.Field(
            min_length=2, max_length=2)
        score: int = pydantic.Field(ge=0, le=100)

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0,
                           timeout=3600)
    messages = [{"role": "user", "content": "Describe a book as JSON"}]  # ids < 32768

    def shaped(seed: int):
        try:
            return client.chat.completions.parse(
                model=MODEL, messages=messages, response_format=Card, max_tokens=PARSE_TOKENS,
                temperature=1.0, seed=seed).choices[0].message
        except openai.LengthFinishReasonError:  # cut short: counted as not parsed
            return None

    def free(seed: int) -> bool:
        text = client.chat.completions.create(model=MODEL, messages=messages,
                                              max_tokens=PARSE_TOKENS, temperature=1.0,
                                              seed=seed).choices[0].message.content
        try:
            json.loads(text)
            return True
        except ValueError:
            return False

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:  # batched by the server
        replies = list(pool.map(shaped, range(PARSE_SEEDS)))
        free_json = sum(pool.map(free, range(PARSE_SEEDS)))
    return {"requests": PARSE_SEEDS,
            "parsed_and_valid": sum(r is not None and isinstance(r.parsed, Card)
                                    for r in replies),
            "free_replies_that_are_json": free_json,
            "example": next((r.content for r in replies if r is not None), None)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--checkpoint", type=Path,
                        help="existing checkpoint (default: write a random one)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--mesh", help="DATAxMODEL (default: 1xALL)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import jax

    from grok import GrokConfig

    config = GrokConfig.from_json(args.config)
    work = prompts(config.vocab_size, args.concurrency, args.prompt_len)
    with tempfile.TemporaryDirectory(prefix="grok-structured-bench-") as scratch:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from bench import write_random_checkpoint

            checkpoint = Path(scratch) / "model"
            write_random_checkpoint(args.config, checkpoint)
        template = Path(scratch) / "template.jinja"
        template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
        flags = ["--chat-template", str(template)]
        max_seq_len = max(args.prompt_len + args.new_tokens, 16 + PARSE_TOKENS)
        with Server(args, checkpoint, args.concurrency, max_seq_len, flags) as url:
            runs: dict[str, list[dict]] = {"free": [], "constrained": []}
            for repeat in range(args.repeats + 1):  # the first compiles
                for kind in runs:
                    run = asyncio.run(load(url, work, args.new_tokens, kind == "constrained"))
                    log(f"{kind} ({'compiling' if repeat == 0 else 'measured'}): {run}")
                    if repeat:
                        runs[kind].append(run)
            best = {kind: sorted(r, key=lambda run: run["itl_p50_ms"])[(len(r) - 1) // 2]
                    for kind, r in runs.items()}
            log("openai parse ...")
            parse = parse_check(url, args.concurrency)
    figures = {
        "config": str(args.config), "device": f"{jax.devices()[0].platform} "
        f"x{len(jax.devices())}", "cpus": os.cpu_count(), "concurrency": args.concurrency,
        "new_tokens": args.new_tokens, "free": best["free"],
        "constrained": best["constrained"], "openai_parse": parse,
        "ratios": {"itl_p50_constrained_over_free": round(
            best["constrained"]["itl_p50_ms"] / best["free"]["itl_p50_ms"], 3)},
        "targets": {"itl_p50_constrained_over_free": "<= 1.15"}}
    print(json.dumps(figures, indent=1))
    return 0 if np.isfinite(figures["ratios"]["itl_p50_constrained_over_free"]) else 1


if __name__ == "__main__":
    sys.exit(main())
