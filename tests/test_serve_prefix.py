"""The server with prefix caching and chunked prefill, on the upstream-tiny fixture, driven
over 127.0.0.1 by the `openai` client and httpx: the same text as `Grok.generate` with the
cache off, cached tokens in the usage object, and /metrics counters that grow by exactly
what each request used.

Prompts are token-id lists that share a 24-token preamble (blocks of 4, chunks of 8); see
test_prefix_cache.py for why tokens compare exactly.
"""

import asyncio
import contextlib
import json
import re
import time

import pytest

pytest.importorskip("fastapi")

import httpx
import numpy as np
import openai
from conftest import TOKENIZER
from test_prefix_cache import PREAMBLE, PROMPTS
from test_serve import running_server

from grok import Grok
from grok.engine.prefix_cache import PrefixCacheSettings

MODEL = "tiny"
SLOTS, MAX_LEN, BLOCK, CHUNK = 4, 64, 4, 8
NEW = 8


def load_tiny(fixture_dir) -> Grok:
    """The fixture with the released tokenizer (skips without it), on one device."""
    if not TOKENIZER.is_file():
        pytest.skip(f"tokenizer not found at {TOKENIZER}")
    return Grok.load(fixture_dir, fixture_dir / "config.json", tokenizer_path=TOKENIZER,
                     mesh_shape=(1, 1))


@contextlib.contextmanager
def cached_server(grok, blocks: int, max_len: int = MAX_LEN):
    """A server of `grok` prefilling in chunks, with a prefix cache of `blocks` blocks
    (off again afterwards); yields its URL."""
    grok.enable_prefix_cache(PrefixCacheSettings(blocks, BLOCK))
    try:
        with running_server(grok, lambda: grok.engine(SLOTS, max_len, prefill_chunk=CHUNK),
                            MODEL, max_len, SLOTS) as url:
            yield url
    finally:
        grok.enable_prefix_cache(None)


def greedy_runs(grok, prompts, new: int) -> list:
    """Each prompt's greedy completion with the cache off and whole prefills: what the
    server must give."""
    grok.enable_prefix_cache(None)
    return grok.generate(prompts, max_new_tokens=new, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def grok(fixture_dir):
    return load_tiny(fixture_dir)


@pytest.fixture(scope="module")
def expected(grok):
    return [c.text for c in greedy_runs(grok, PROMPTS, NEW)]


@pytest.fixture(scope="module")
def url(grok, expected):
    with cached_server(grok, 64) as url:
        yield url


def counters(http) -> dict:
    text = http.get("/metrics").text
    out = {}
    for name in ("grok_prefix_cache_queries_total", "grok_prefix_cache_hits_total",
                 "grok_prompt_tokens_computed_total", "grok_prefix_cache_blocks_in_use",
                 "grok_prefix_cache_blocks_held"):
        out[name] = float(re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M).group(1))
    return out


async def texts(url, prompts) -> list[str]:
    """Every prompt's greedy text, all sent at once."""
    async def one(client, prompt):
        r = await client.post("/v1/completions", json={
            "model": MODEL, "prompt": prompt, "max_tokens": NEW, "temperature": 0,
            "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        return await asyncio.gather(*(one(client, p) for p in prompts))


def test_cached_and_chunked_requests_give_the_text_of_generate(url, expected):
    """One at a time (each after the first reuses the preamble), through the openai
    client; the usage object and /metrics count what each request reused and computed."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    http = httpx.Client(base_url=url, timeout=120)
    for i, prompt in enumerate(PROMPTS):
        before = counters(http)
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=NEW,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert got.choices[0].text == expected[i]
        cached = got.usage.prompt_tokens_details.cached_tokens
        common = next((j for j, (a, b) in enumerate(zip(prompt, PREAMBLE, strict=False))
                       if a != b), min(len(prompt), len(PREAMBLE)))
        shares = common // BLOCK * BLOCK
        assert cached == (0 if i == 0 else min(shares, (len(prompt) - 1) // BLOCK * BLOCK))
        after = counters(http)
        assert after["grok_prefix_cache_queries_total"] - \
            before["grok_prefix_cache_queries_total"] == len(prompt)
        assert after["grok_prefix_cache_hits_total"] - \
            before["grok_prefix_cache_hits_total"] == cached
        assert after["grok_prompt_tokens_computed_total"] - \
            before["grok_prompt_tokens_computed_total"] == len(prompt) - cached
    assert counters(http)["grok_prefix_cache_blocks_in_use"] > 0


def test_concurrent_cached_requests_give_the_text_of_generate(url, expected):
    """All prompts at once, twice over (16 streams for 4 slots: some wait, some join
    between another's chunks, and every one may reuse blocks)."""
    assert asyncio.run(texts(url, PROMPTS * 2)) == expected * 2


def test_a_request_cancelled_mid_chunk_frees_what_it_held(url, expected):
    """Three requests decode while a 48-token prompt is prefilled 8 tokens a step, riding in
    their decode steps; its client leaves part-way. The others get their text, the prompt
    tokens computed show its prefill stopped short, every block and slot it held is free
    afterwards, and the server serves a full house. The client's leaving races the steps,
    so a few fresh prompts are tried until one is cancelled mid-prefill."""
    rng = np.random.default_rng(3)
    decoding = [3, 4, 0]  # 16, 17 and 25 tokens: room for 32 new ones each

    async def stream(client, prompt, started):
        async with client.stream("POST", "/v1/completions", json={
                "model": MODEL, "prompt": prompt, "max_tokens": 32, "temperature": 0,
                "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            text = ""
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
                    started.set()
            return text

    async def computed(client):
        text = (await client.get("/metrics")).text
        return float(re.search(r"^grok_prompt_tokens_computed_total ([0-9.e+-]+)$", text,
                               re.M).group(1))

    async def attempt(client) -> float:
        """Prompt tokens the cancelled request computed."""
        events = [asyncio.Event() for _ in decoding]
        streams = [asyncio.ensure_future(stream(client, PROMPTS[i], e))
                   for i, e in zip(decoding, events, strict=True)]
        await asyncio.gather(*(e.wait() for e in events))  # all three decode
        before = await computed(client)
        long = asyncio.ensure_future(client.post("/v1/completions", json={
            "model": MODEL, "prompt": rng.integers(3, 4096, 48).tolist(), "max_tokens": 1}))
        while await computed(client) < before + CHUNK and not long.done():
            await asyncio.sleep(0.001)
        long.cancel()
        texts = await asyncio.gather(*streams)
        for i, text in zip(decoding, texts, strict=True):
            assert text.startswith(expected[i])  # greedy: 32 tokens extend the first 8
        return await computed(client) - before

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            for _ in range(5):
                if await attempt(client) < 48:
                    return True
            return False

    assert asyncio.run(main()), "the client never left before its prompt was prefilled"
    http = httpx.Client(base_url=url, timeout=120)
    while "grok_requests_running 0.0" not in http.get("/metrics").text:
        time.sleep(0.05)
    assert counters(http)["grok_prefix_cache_blocks_held"] == 0
    # Every slot is free again: as many requests as slots, at once, all run.
    assert asyncio.run(texts(url, PROMPTS[:SLOTS])) == expected[:SLOTS]
