"""The server with prefix caching and chunked prefill, on the upstream-tiny fixture, driven
over 127.0.0.1 by the `openai` client and httpx: the same text as `Grok.generate` with the
cache off, cached tokens in the usage object, and /metrics counters that grow by exactly
what each request used.

Prompts are token-id lists that share a 24-token preamble (blocks of 4, chunks of 8); see
test_prefix_cache.py for why tokens compare exactly.
"""

import asyncio
import re

import pytest

pytest.importorskip("fastapi")

import httpx
import openai
from conftest import TOKENIZER
from test_prefix_cache import PREAMBLE, PROMPTS
from test_serve import running_server

from grok import Grok
from grok.engine.prefix_cache import PrefixCacheSettings

MODEL = "tiny"
SLOTS, MAX_LEN, BLOCK, CHUNK = 4, 64, 4, 8
NEW = 8


@pytest.fixture(scope="module")
def grok(fixture_dir):
    if not TOKENIZER.is_file():
        pytest.skip(f"tokenizer not found at {TOKENIZER}")
    return Grok.load(fixture_dir, fixture_dir / "config.json", tokenizer_path=TOKENIZER,
                     mesh_shape=(1, 1))


@pytest.fixture(scope="module")
def expected(grok):
    """Each prompt's greedy text with the cache off and whole prefills."""
    grok.enable_prefix_cache(None)
    return [c.text for c in grok.generate(PROMPTS, max_new_tokens=NEW, temperature=0,
                                          ignore_eos=True)]


@pytest.fixture(scope="module")
def url(grok, expected):
    grok.enable_prefix_cache(PrefixCacheSettings(64, BLOCK))
    try:
        with running_server(grok, lambda: grok.engine(SLOTS, MAX_LEN, prefill_chunk=CHUNK),
                            MODEL, MAX_LEN, SLOTS) as url:
            yield url
    finally:
        grok.enable_prefix_cache(None)


def counters(http) -> dict:
    text = http.get("/metrics").text
    out = {}
    for name in ("grok_prefix_cache_queries_total", "grok_prefix_cache_hits_total",
                 "grok_prompt_tokens_computed_total", "grok_prefix_cache_blocks_in_use"):
        out[name] = float(re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M).group(1))
    return out


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
    async def one(client, prompt):
        r = await client.post("/v1/completions", json={
            "model": MODEL, "prompt": prompt, "max_tokens": NEW, "temperature": 0,
            "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            return await asyncio.gather(*(one(client, p) for p in PROMPTS * 2))

    assert asyncio.run(main()) == expected * 2
