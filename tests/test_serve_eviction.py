"""A prefix cache full of blocks that running requests hold, on a server over 127.0.0.1
(the upstream-tiny fixture, the httpx client): nothing they hold is evicted, however many
prompts want room; once they end, their blocks go first.

A server of its own (in its own module, so that the pool of test_serve_prefix.py's server
is not in play): four blocks of four tokens, which one running request's 16-token prompt
fills. Tokens compare exactly (see test_prefix_cache.py).
"""

import asyncio
import re

import pytest

pytest.importorskip("fastapi")

import httpx
import numpy as np
from test_serve_prefix import BLOCK, MODEL, cached_server, greedy_texts, load_tiny

POOL = 4  # blocks
ATTEMPTS = 5
RNG = np.random.default_rng(11)
# Fresh prompts for each attempt: a holder of 16 tokens (four full blocks: the whole pool),
# a prompt that shares them (and 6 tokens more), and three of 30 (seven blocks each).
HOLDERS = RNG.integers(3, 4096, (ATTEMPTS, 16)).tolist()
HOLDER_NEW = 40  # long enough to run while the others come and go
SHARING = [h + RNG.integers(3, 4096, 6).tolist() for h in HOLDERS]
OTHERS = RNG.integers(3, 4096, (ATTEMPTS + 1, 3, 30)).tolist()


@pytest.fixture(scope="module")
def grok(fixture_dir):
    return load_tiny(fixture_dir)


@pytest.fixture(scope="module")
def expected(grok):
    """What the server must give each prompt, by prompt."""

    def texts(prompts, new):
        return dict(zip(map(tuple, prompts), greedy_texts(grok, prompts, new), strict=True))
    return {**texts(HOLDERS, HOLDER_NEW), **texts(SHARING, 8),
            **texts([p for group in OTHERS for p in group], 2)}


@pytest.fixture(scope="module")
def url(grok, expected):
    with cached_server(grok, POOL) as url:
        yield url


async def gauges(client) -> dict:
    text = (await client.get("/metrics")).text
    return {name: float(re.search(rf"^grok_prefix_cache_{name} ([0-9.e+-]+)$", text,
                                  re.M).group(1))
            for name in ("blocks_in_use", "blocks_held", "evictions_total")}


async def complete(client, prompt, new, expected) -> dict:
    """The response's usage, once its text is checked."""
    r = await client.post("/v1/completions", json={
        "model": MODEL, "prompt": prompt, "max_tokens": new, "temperature": 0,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected[tuple(prompt)]
    return r.json()["usage"]


@pytest.mark.slow
def test_blocks_in_use_are_never_evicted(url, expected):
    """While a holder decodes, holding every block: three prompts that want seven blocks
    each get none and evict nothing, and a prompt sharing the holder's blocks reads all
    four. Once the holder ends, a new prompt evicts its (now idle) blocks. The holder's
    decode races the others' requests, so fresh prompts are tried until it outlasts them."""

    async def attempt(client, i) -> bool:
        holder = asyncio.ensure_future(complete(client, HOLDERS[i], HOLDER_NEW, expected))
        while (await gauges(client))["blocks_held"] < POOL and not holder.done():
            await asyncio.sleep(0.001)
        before = await gauges(client)
        await asyncio.gather(*(complete(client, p, 2, expected) for p in OTHERS[i]))
        sharing = await complete(client, SHARING[i], 8, expected)
        during = await gauges(client)
        outlasted = not holder.done()
        await holder
        if not outlasted:
            return False
        assert sharing["prompt_tokens_details"]["cached_tokens"] == POOL * BLOCK
        assert during["evictions_total"] == before["evictions_total"]
        assert before["blocks_held"] == during["blocks_in_use"] == POOL
        return True

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            for i in range(ATTEMPTS):
                if await attempt(client, i):
                    break
            else:
                raise AssertionError("the holder never outlasted the other requests")
            while (await gauges(client))["blocks_held"] > 0:  # the last slots are freed
                await asyncio.sleep(0.01)
            before = await gauges(client)
            await complete(client, OTHERS[-1][0], 2, expected)
            after = await gauges(client)
            assert after["evictions_total"] - before["evictions_total"] == POOL
            assert after["blocks_in_use"] == POOL and after["blocks_held"] == 0

    asyncio.run(main())
