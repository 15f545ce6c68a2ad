"""A prefix cache full of blocks that running requests hold, on a server over 127.0.0.1
(the upstream-tiny fixture, the httpx client): nothing they hold is evicted, however many
prompts want room; once they end, their blocks go first.

A server of its own (in its own module, so that the pool of test_serve_prefix.py's server
is not in play): four blocks of four tokens, which one running request's 16-token prompt
fills.
"""

import asyncio
import contextlib
import re

import pytest

pytest.importorskip("fastapi")

import httpx
import numpy as np
from test_generate import clear_steps, gaps_of
from test_serve_prefix import BLOCK, MODEL, cached_server, greedy_runs, load_tiny

POOL = 4  # blocks
ATTEMPTS = 5
SHARING_NEW = 2
RNG = np.random.default_rng(11)
# Fresh prompts for each attempt: a holder of 16 tokens (four full blocks: the whole pool),
# a prompt that shares them (and 6 tokens more), and three of 30 (seven blocks each).
CANDIDATES = RNG.integers(3, 4096, (8 * ATTEMPTS, 16)).tolist()
MAX_LEN = 256  # the fixture's context: room for a holder that outlasts the others
HOLDER_NEW = MAX_LEN - 16  # cancelled once the others are done
OTHERS = RNG.integers(3, 4096, (ATTEMPTS + 1, 3, 30)).tolist()


@pytest.fixture(scope="module")
def grok(fixture_dir):
    return load_tiny(fixture_dir)


@pytest.fixture(scope="module")
def sharing(grok):
    """(holder, sharing prompt, its greedy text with the cache off) for each attempt: of
    the candidates, those whose sharing prompt's greedy path has no near-tie (see
    test_generate.py), so that its text is compared exactly. Only its text is: the
    holder's and the others' paths are long or unchecked, and what they test is which
    blocks are held and evicted."""
    suffixes = RNG.integers(3, 4096, (len(CANDIDATES), 6)).tolist()
    prompts = [h + s for h, s in zip(CANDIDATES, suffixes, strict=True)]
    runs = greedy_runs(grok, prompts, SHARING_NEW)
    chosen = [(h, p, c.text) for h, p, c in zip(CANDIDATES, prompts, runs, strict=True)
              if clear_steps(gaps_of(c)) == SHARING_NEW]
    assert len(chosen) >= ATTEMPTS
    return chosen[:ATTEMPTS]


@pytest.fixture(scope="module")
def url(grok, sharing):
    with cached_server(grok, POOL, MAX_LEN) as url:
        yield url


async def gauges(client) -> dict:
    text = (await client.get("/metrics")).text
    return {name: float(re.search(rf"^grok_prefix_cache_{name} ([0-9.e+-]+)$", text,
                                  re.M).group(1))
            for name in ("blocks_in_use", "blocks_held", "evictions_total")}


async def complete(client, prompt, new) -> dict:
    r = await client.post("/v1/completions", json={
        "model": MODEL, "prompt": prompt, "max_tokens": new, "temperature": 0,
        "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.slow
def test_blocks_in_use_are_never_evicted(url, sharing):
    """While a holder decodes, holding every block: three prompts that want seven blocks
    each get none and evict nothing, and a prompt sharing the holder's blocks reads all
    four and gets the text of a cache-off run. Once the holder is cancelled, a new prompt
    evicts its (now idle) blocks. The holder's decode races the others' requests (it
    decodes for most of the context), so fresh prompts are tried until it outlasts them."""

    async def attempt(client, i) -> bool:
        holder_prompt, sharing_prompt, text = sharing[i]
        holder = asyncio.ensure_future(complete(client, holder_prompt, HOLDER_NEW))
        while (await gauges(client))["blocks_held"] < POOL and not holder.done():
            await asyncio.sleep(0.001)
        before = await gauges(client)
        await asyncio.gather(*(complete(client, p, 2) for p in OTHERS[i]))
        shared = await complete(client, sharing_prompt, SHARING_NEW)
        during = await gauges(client)
        outlasted = not holder.done()
        holder.cancel()  # the server frees its slot and blocks
        with contextlib.suppress(asyncio.CancelledError):
            await holder
        assert shared["choices"][0]["text"] == text
        if not outlasted:
            return False
        assert shared["usage"]["prompt_tokens_details"]["cached_tokens"] == POOL * BLOCK
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
            await complete(client, OTHERS[-1][0], 2)
            after = await gauges(client)
            assert after["evictions_total"] - before["evictions_total"] == POOL
            assert after["blocks_in_use"] == POOL and after["blocks_held"] == 0

    asyncio.run(main())
