"""Prefix caching and chunked prefill on the upstream-tiny fixture, and the block index.

A request must get the same tokens with the cache on or off, hit or miss, and prefilled
whole or in chunks. Tolerances: tokens (greedy and seeded) are compared exactly, which held
for every prompt here (each prompt's greedy path was checked free of near-ties: a top-2
gap above CLEAR_GAP); log-probabilities within LOGPROB_TOL (test_generate.py): a chunk or
a continued prefill attends over a differently bucketed span and multiplies other row
counts, which may move a bf16 logit by a step.

Shapes are shared to keep compiles few: 4 slots of 64 positions, blocks of 4 tokens.
"""

import numpy as np
import pytest
from test_generate import LOGPROB_TOL

from grok import Grok
from grok.engine.engine import Buckets, Engine
from grok.engine.prefix_cache import BlockIndex, PrefixCacheSettings, block_keys
from grok.engine.request import GenerationSettings
from grok.engine.scheduler import Scheduler
from grok.errors import GrokError

SLOTS, MAX_LEN, BLOCK = 4, 64, 4
RNG = np.random.default_rng(0)
PREAMBLE = RNG.integers(3, 4096, 24).tolist()  # six blocks
# Sharing none, some and all of the preamble's blocks; one prompt (16 tokens) is exactly
# four cached blocks, so only three may be reused: its last token needs its logits.
PROMPTS = [PREAMBLE + RNG.integers(3, 4096, k).tolist() for k in (1, 6, 13)] + [
    PREAMBLE[:16], PREAMBLE[:10] + RNG.integers(3, 4096, 7).tolist(),
    RNG.integers(3, 4096, 30).tolist()]
GREEDY = GenerationSettings(max_new_tokens=8, temperature=0)
SEEDED = GenerationSettings(max_new_tokens=8, temperature=1.0, seed=5)


@pytest.fixture(scope="module")
def grok(fixture_dir):
    return Grok.load(fixture_dir, fixture_dir / "config.json", mesh_shape=(1, 1))


def run(engine, prompts, settings, scheduler=None):
    """Every prompt submitted at once; completions in prompt order, and the scheduler."""
    scheduler = scheduler or Scheduler(engine)
    ids = {scheduler.submit(engine.make_request(p, settings)): i for i, p in enumerate(prompts)}
    out = {}
    while scheduler.has_work:
        for event in scheduler.step():
            if event.completion is not None:
                out[ids[event.request_id]] = event.completion
    return [out[i] for i in range(len(prompts))], scheduler


@pytest.fixture(scope="module")
def baseline(grok):
    """Whole prefills, no cache."""
    grok.enable_prefix_cache(None)
    return {settings: run(grok.engine(SLOTS, MAX_LEN), PROMPTS, settings)[0]
            for settings in (GREEDY, SEEDED)}


def assert_same(got, want):
    for a, b in zip(got, want, strict=True):
        assert a.output_ids == b.output_ids
        np.testing.assert_allclose(a.output_logprobs, b.output_logprobs, atol=LOGPROB_TOL)


@pytest.mark.parametrize("chunk", [None, pytest.param(8, marks=pytest.mark.slow)])
def test_cache_hits_and_misses_give_the_tokens_of_whole_prefills(grok, baseline, chunk):
    """Cold (the first prompt computes the preamble; the others that share it wait a step
    and reuse it) and warm (every prompt's blocks cached), whole and chunked prefills:
    the tokens of the cache-off run, and the cached counts the blocks allow."""
    grok.enable_prefix_cache(PrefixCacheSettings(64, BLOCK))
    try:
        engine = grok.engine(SLOTS, MAX_LEN, prefill_chunk=chunk)
        for settings in (GREEDY, SEEDED):
            grok.enable_prefix_cache(PrefixCacheSettings(64, BLOCK))
            cold, scheduler = run(engine, PROMPTS, settings)
            assert_same(cold, baseline[settings])
            assert [c.cached_tokens for c in cold] == [0, 24, 24, 12, 8, 0]
            warm, scheduler = run(engine, PROMPTS, settings)
            assert_same(warm, baseline[settings])
            # All blocks before each prompt's last token.
            assert [c.cached_tokens for c in warm] == [
                (len(p) - 1) // BLOCK * BLOCK for p in PROMPTS]
            stats = scheduler.stats
            assert stats.cached_tokens + stats.prefill_tokens == sum(map(len, PROMPTS))
            assert stats.queried_tokens == sum(map(len, PROMPTS))
    finally:
        grok.enable_prefix_cache(None)


@pytest.mark.parametrize("chunk", [8, pytest.param(16, marks=pytest.mark.slow)])
def test_chunked_prefill_gives_the_tokens_of_whole_prefills(grok, baseline, chunk):
    """Chunks of 8 and 16 put chunk boundaries inside blocks and at their ends (blocks of
    4; prompts of 16 to 37 tokens)."""
    engine = grok.engine(SLOTS, MAX_LEN, prefill_chunk=chunk)
    for settings in (GREEDY, SEEDED):
        assert_same(run(engine, PROMPTS, settings)[0], baseline[settings])


def arrive(engine, arrivals: dict[int, list[int]], settings):
    """Prompts submitted at the scheduler steps `arrivals` gives ({step: [prompt index]});
    completions by prompt index, and the scheduler."""
    scheduler = Scheduler(engine)
    ids, out = {}, {}
    for step in range(100):
        ids.update({scheduler.submit(engine.make_request(PROMPTS[i], settings)): i
                    for i in arrivals.get(step, [])})
        for event in scheduler.step():
            if event.completion is not None:
                out[ids[event.request_id]] = event.completion
        if not scheduler.has_work:
            return out, scheduler
    raise AssertionError("did not finish")


# Two requests decode while two more are prefilled 8 tokens a step: the 37-token prompt's
# chunks ride alone in the decode steps at steps 1 and 2, then go in one prefill with the
# 25-token prompt's (sent two steps later) at 3 to 5, whose last chunk rides alone at 6.
ARRIVALS = {0: [5, 4], 1: [2], 3: [0]}  # step: prompts (30, 17; 37; 25 tokens)
ORDER = [5, 4, 2, 0]


def test_chunks_in_decode_steps_and_batched_give_the_tokens_of_whole_prefills(grok, baseline):
    """All four requests of ARRIVALS get the tokens of whole prefills, greedy and seeded."""
    engine = grok.engine(SLOTS, MAX_LEN, prefill_chunk=8)
    for settings in (GREEDY, SEEDED):
        out, scheduler = arrive(engine, ARRIVALS, settings)
        assert_same([out[i] for i in ORDER], [baseline[settings][i] for i in ORDER])
        assert scheduler.stats.mixed_steps == 3


def test_mixed_steps_on_a_coarser_row_ladder_give_the_same_tokens(grok, baseline):
    """Mixed steps may pad their decode rows to a coarser ladder than decode steps
    (`Buckets.mixed_row_ratio`, as accelerators do): the two decoding rows of ARRIVALS ride
    with the chunks in a step of all 4 slots, whose padded rows change no one's tokens."""
    engine = Engine(grok, SLOTS, MAX_LEN, prefill_chunk=8,
                    buckets=Buckets(16, 16, None, mixed_row_ratio=4))
    assert [k for k in engine.warmup_keys() if k[0] == "mixed"] == [("mixed", 1),
                                                                     ("mixed", 4)]
    assert [engine.mixed_rows_for(n) for n in (1, 2, 3, 4)] == [1, 4, 4, 4]
    out, scheduler = arrive(engine, ARRIVALS, GREEDY)
    assert_same([out[i] for i in ORDER], [baseline[GREEDY][i] for i in ORDER])
    assert scheduler.stats.mixed_steps == 3
    assert {k for k in engine.programs() if k[0] in ("decode", "mixed")} == {
        ("decode", 2), ("decode", 4), ("mixed", 4)}
    with pytest.raises(GrokError, match="mixed_row_ratio must be at least row_ratio"):
        Buckets(16, 16, None, row_ratio=4, mixed_row_ratio=2)


def test_warmup_covers_chunks_cached_prefixes_and_mixed_steps(grok):
    """Every program that chunks alone in decode steps and batched, continued after cached
    prefixes, compile is one `warmup` compiles (checked by key, so that the test does not
    compile the rest)."""
    grok.enable_prefix_cache(PrefixCacheSettings(64, BLOCK))
    try:
        engine = grok.engine(SLOTS, MAX_LEN, prefill_chunk=8)
        for _ in range(2):  # cold, then warm
            run(engine, PROMPTS, GREEDY)
        scheduler = Scheduler(engine)
        for i in [5, 2, 0, 1, 4]:  # one arrival a step
            scheduler.submit(engine.make_request(PROMPTS[i], GREEDY))
            scheduler.step()
        while scheduler.has_work:
            scheduler.step()
        assert scheduler.stats.mixed_steps > 0
        kinds = {key[0] for key in engine.programs()}
        assert {"mixed", "prefill", "load_blocks", "save_blocks"} <= kinds
        assert set(engine.programs()) <= set(engine.warmup_keys())
    finally:
        grok.enable_prefix_cache(None)


def test_a_long_prompt_does_not_stall_running_requests(grok):
    """While a 37-token prompt is prefilled 8 tokens a step, every running request gets a
    token at every step."""
    engine = grok.engine(SLOTS, MAX_LEN, prefill_chunk=8)
    scheduler = Scheduler(engine)
    short = [scheduler.submit(engine.make_request(p, GREEDY)) for p in (PROMPTS[0][:5],
                                                                        PROMPTS[5][:6])]
    scheduler.step()  # both admitted and prefilled, first tokens drawn
    long = scheduler.submit(engine.make_request(PROMPTS[2],
                                                GenerationSettings(max_new_tokens=4)))
    for step in range(5):  # 37 tokens: chunks of 8, 8, 8, 8, 5
        events = scheduler.step()
        assert sorted(e.request_id for e in events if e.request_id in short) == short
        # Its first token comes with the last chunk, first among the step's events.
        assert [e.request_id for e in events].count(long) == (step == 4)
        assert (events[0].request_id == long) == (step == 4)
    # Each chunk rode in a decode step: no step of its own (the first step's decode
    # followed the two short prompts' prefill).
    assert scheduler.stats.mixed_steps == 5 and scheduler.stats.decode_steps == 6


def test_a_request_cancelled_mid_prefill_frees_its_slot_and_blocks(grok):
    grok.enable_prefix_cache(PrefixCacheSettings(16, BLOCK))
    try:
        engine = grok.engine(SLOTS, MAX_LEN, prefill_chunk=8)
        _, scheduler = run(engine, [PROMPTS[0]], GREEDY)  # caches the preamble's blocks
        index = scheduler.prefix_cache.index
        assert index.held == 0 and index.in_use == 6
        # A request decoding (a 3-token prompt: no full block) keeps prefills to a chunk
        # a step.
        keeper = scheduler.submit(engine.make_request(
            PROMPTS[5][:3], GenerationSettings(max_new_tokens=20, temperature=0)))
        scheduler.step()
        rid = scheduler.submit(engine.make_request(PROMPTS[2], GREEDY))
        scheduler.step()  # 24 tokens copied in, then the first chunk of the other 13
        assert scheduler.running == 2 and index.held == 6
        assert scheduler.cancel(rid)
        assert scheduler.running == 1 and index.held == 0
        assert scheduler.cancel(keeper) and not scheduler.has_work
        assert scheduler.step() == []
        # The slot and the blocks serve the next request as if nothing had happened.
        again, _ = run(engine, [PROMPTS[2]], GREEDY, scheduler)
        assert again[0].cached_tokens == 24
    finally:
        grok.enable_prefix_cache(None)


def test_blocks_a_running_request_holds_are_never_evicted(grok):
    """A pool of 8 blocks: two running requests hold all of them, so a third prompt's
    blocks are not saved (nothing is evicted under them) and the held ones stay cached;
    once they end, the third's take the least recently used."""
    grok.enable_prefix_cache(PrefixCacheSettings(8, BLOCK))
    try:
        engine = grok.engine(SLOTS, MAX_LEN)
        scheduler = Scheduler(engine)
        index = scheduler.prefix_cache.index
        long = GenerationSettings(max_new_tokens=20, temperature=0)
        prefix_a, prefix_b = PROMPTS[5][:16], PROMPTS[2][-16:]  # no block in common
        for prompt in (prefix_a, prefix_b):
            scheduler.submit(engine.make_request(prompt, long))
        scheduler.step()
        assert index.held == 8 and index.in_use == 8
        scheduler.submit(engine.make_request(PROMPTS[0][:20], GREEDY))
        scheduler.step()
        assert index.evicted == 0 and index.held == 8
        keys = block_keys(prefix_a, BLOCK) + block_keys(prefix_b, BLOCK)
        assert len(index.match(keys[:4])) == 4 and len(index.match(keys[4:])) == 4
        while scheduler.has_work:
            scheduler.step()
        assert index.held == 0
        run(engine, [PROMPTS[0][:20]], GREEDY, scheduler)
        assert index.evicted == 5  # its five blocks replaced the idle ones
    finally:
        grok.enable_prefix_cache(None)


@pytest.mark.slow
def test_cached_and_chunked_prefills_on_a_2x4_mesh(fixture_dir):
    """Rows split over data=2 (slots, prefill rows and the pool's blocks), heads over
    model=4: block copies and prefills into chosen slots cross the data shards. Greedy and
    seeded, against whole prefills without the cache on the same mesh."""
    grok = Grok.load(fixture_dir, fixture_dir / "config.json", mesh_shape=(2, 4))
    for settings in (GREEDY, SEEDED):
        grok.enable_prefix_cache(None)
        want = run(grok.engine(SLOTS, MAX_LEN), PROMPTS, settings)[0]
        grok.enable_prefix_cache(PrefixCacheSettings(64, BLOCK))
        engine = grok.engine(SLOTS, MAX_LEN, prefill_chunk=8)
        for _ in range(2):  # cold, then every block cached
            assert_same(run(engine, PROMPTS, settings)[0], want)


# --- the index alone ---------------------------------------------------------------------


def test_block_keys_chain_every_token_before_the_block():
    a = block_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2  # the ninth token is no full block
    assert block_keys([1, 2, 3, 4, 5, 6, 7, 8], 4) == a
    b = block_keys([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert b[0] != a[0] and b[1] != a[1]  # same tokens, other prefix: another block


def test_index_evicts_least_recently_used_later_blocks_first():
    index = BlockIndex(4)
    chain = block_keys(list(range(1, 17)), 4)  # four blocks
    claimed = index.claim(chain)
    assert [i for i, _ in claimed] == [0, 1, 2, 3] and index.held == 4
    other = block_keys(list(range(100, 108)), 4)
    assert index.claim(other) == []  # every block held: nothing evicted
    index.release([b for _, b in claimed])
    assert index.held == 0 and index.in_use == 4
    got = index.claim(other)
    assert len(got) == 2 and index.evicted == 2
    # The chain's last two blocks went; its first two still match.
    assert index.match(chain) == [claimed[0][1], claimed[1][1]]


def test_matched_blocks_are_held_until_released():
    index = BlockIndex(2)
    chain = block_keys(list(range(1, 9)), 4)
    blocks = [b for _, b in index.claim(chain)]
    index.release(blocks)
    index.acquire(index.match(chain))
    assert index.claim(block_keys(list(range(50, 58)), 4)) == []
    index.release(blocks)
    assert len(index.claim(block_keys(list(range(50, 58)), 4))) == 2


@pytest.mark.parametrize("field,value", [("blocks", 0), ("block_size", -1), ("blocks", 1.5),
                                         ("blocks", True)])
def test_settings_are_checked(field, value):
    with pytest.raises(GrokError, match=field):
        PrefixCacheSettings(**{"blocks": 8, field: value})


# --- deterministic steps -------------------------------------------------------------------


def test_deterministic_steps_give_the_same_bits_whatever_else_runs(grok):
    """With one shape per step, a request's log-probabilities are bit for bit those it gets
    alone, whether others run beside it, join mid-way, share its cached blocks or not, and
    whether its prompt came from the cache (blocks of 4, chunks of 8: hits are used in
    whole chunks) or was computed."""
    sampled = [GenerationSettings(max_new_tokens=8, temperature=t, seed=i)
               for i, t in enumerate((0.0, 0.3, 0.7, 1.0, 1.0, 0.7))]
    engine = grok.engine(SLOTS, MAX_LEN, prefill_chunk=8, deterministic=True)
    grok.enable_prefix_cache(None)
    try:
        alone = []
        for prompt, settings in zip(PROMPTS, sampled, strict=True):
            [completion], _ = run(engine, [prompt], settings)
            alone.append(completion)
        grok.enable_prefix_cache(PrefixCacheSettings(64, BLOCK))
        for _ in range(2):  # cold and warm cache
            scheduler = Scheduler(engine)
            names, done = {}, {}
            for step in range(200):  # one more request joins at each step
                if step < len(PROMPTS):
                    names[scheduler.submit(engine.make_request(PROMPTS[step],
                                                               sampled[step]))] = step
                for event in scheduler.step():
                    if event.completion is not None:
                        done[names[event.request_id]] = event.completion
                if len(done) == len(PROMPTS):
                    break
            for i, completion in enumerate(alone):
                assert done[i].output_ids == completion.output_ids
                assert done[i].output_logprobs == completion.output_logprobs  # bits
        assert sum(c.cached_tokens for c in done.values()) > 0
    finally:
        grok.enable_prefix_cache(None)
