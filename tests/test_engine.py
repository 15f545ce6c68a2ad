"""The continuous-batching engine and its scheduler on the upstream-tiny fixture.

A request must get the same tokens whether it runs alone, in a batch, or joins a running
batch mid-way, in any order of arrival; slots are reused after a finish or a cancel; more
requests than slots wait and all complete. Greedy comparisons run up to the solo run's
first near-tie (top-2 gap <= 0.125, see test_generate.py's tolerances); seeded sampling is
compared exactly (measured identical: a draw could only flip where two Gumbel-perturbed
logits lie within one bf16 step).

Shapes are shared across tests to keep compiles few: 4 slots of 32 positions, prompts of
5..12 tokens (one prompt bucket), 12 new tokens.
"""

import itertools

import numpy as np
import pytest
from test_generate import NEW, P0, PA, PB, PE, assert_same_greedy

from grok import Grok
from grok.engine.engine import Buckets, Engine
from grok.engine.request import GenerationSettings
from grok.engine.rows import Row
from grok.engine.scheduler import QueueFull, Scheduler
from grok.errors import GrokError

SLOTS, MAX_LEN = 4, 32
PROMPTS = {"P0": P0, "PA": PA, "PB": PB, "PE": PE}


@pytest.fixture(scope="module")
def grok(fixture_dir):
    return Grok.load(fixture_dir, fixture_dir / "config.json", mesh_shape=(1, 1))


@pytest.fixture(scope="module")
def engine(grok):
    return grok.engine(SLOTS, MAX_LEN)


def settings(**kw):
    return GenerationSettings(**{"max_new_tokens": NEW, "temperature": 0, **kw})


def run(engine, arrivals, steps_limit=200):
    """Drives a scheduler: `arrivals` is [(step, name, settings)]; each request is
    submitted before the scheduler's step number `step`. Returns {name: completion} and
    the number of requests running at each step."""
    sched = Scheduler(engine)
    names, done, running = {}, {}, []
    pending = sorted(arrivals, key=lambda a: a[0])
    for step in range(steps_limit):
        while pending and pending[0][0] <= step:
            _, name, s = pending.pop(0)
            names[sched.submit(engine.make_request(PROMPTS[name], s))] = name
        if not sched.has_work and not pending:
            return done, running
        for event in sched.step():
            if event.completion is not None:
                done[names[event.request_id]] = event.completion
        running.append(sched.running)
    raise AssertionError("did not finish")


@pytest.fixture(scope="module")
def solo(engine):
    """Each prompt alone on the engine, greedy and seeded."""
    out = {}
    for name in PROMPTS:
        out[name] = run(engine, [(0, name, settings())])[0][name]
        out[name, "seeded"] = run(engine, [(0, name, settings(temperature=1.0, seed=7))]
                                  )[0][name]
    return out


def test_solo_engine_equals_generate(grok, solo):
    """The engine alone gives what `Grok.generate` gives (which runs on it too), and
    seeded sampling does sample."""
    for name in ("P0", "PA", "PB"):
        want = grok.generate(PROMPTS[name], max_new_tokens=NEW, temperature=0)
        assert solo[name].output_ids == want.output_ids
    assert solo["P0", "seeded"].output_ids != solo["P0"].output_ids


@pytest.mark.parametrize("order", list(itertools.permutations(["P0", "PA", "PB"]))[:4])
@pytest.mark.parametrize("gaps", [(0, 0), (2, 3), (5, 1)], ids=["together", "2-3", "5-1"])
def test_joining_mid_way_changes_nothing(engine, solo, order, gaps):
    """Three requests arriving together or while others decode (several orders and
    offsets), each greedy or seeded: every one gets its solo tokens."""
    first, second = gaps
    times = [0, first, first + second]
    greedy = [(t, name, settings()) for t, name in zip(times, order, strict=True)]
    done, running = run(engine, greedy)
    compared = sum(assert_same_greedy(done[name], solo[name]) for name in order)
    assert compared >= 30
    if gaps != (0, 0):
        assert max(running) >= 2  # they did share steps

    seeded = [(t, name, settings(temperature=1.0, seed=7))
              for t, name in zip(times, order, strict=True)]
    done, _ = run(engine, seeded)
    for name in order:
        assert done[name].output_ids == solo[name, "seeded"].output_ids, name


def test_more_requests_than_slots_wait_and_all_complete(engine, solo):
    """Ten requests on four slots: six wait; slots are reused as rows finish (early EOS
    rows free theirs at once), and everyone gets their solo tokens."""
    names = ["P0", "PA", "PB", "PE", "PA", "P0", "PB", "PE", "P0", "PA"]
    sched = Scheduler(engine)
    ids = {}
    for i, name in enumerate(names):
        s = settings(max_new_tokens=NEW - i % 3)  # different lengths: staggered finishes
        ids[sched.submit(engine.make_request(PROMPTS[name], s))] = (i, name)
    assert sched.waiting == 10 and sched.running == 0
    done, peak = {}, 0
    while sched.has_work:
        for event in sched.step():
            if event.completion is not None:
                done[ids[event.request_id]] = event.completion
        peak = max(peak, sched.running)
        assert sched.running <= SLOTS
    assert peak == SLOTS and len(done) == 10
    for (i, name), c in done.items():
        assert len(c.output_ids) == NEW - i % 3 or c.finish_reason == "eos"
        k = min(len(c.output_ids), len(solo[name].output_ids))
        assert c.output_ids[:k] == solo[name].output_ids[:k] or \
            assert_same_greedy(c, solo[name]) >= 5


def test_cancel_frees_the_slot_at_once(engine, solo):
    """A cancelled running request produces no more events and its slot goes to the next
    waiting request in the very next step; a cancelled waiting request never starts."""
    sched = Scheduler(engine)
    ids = {name: sched.submit(engine.make_request(PROMPTS[name], settings()))
           for name in ["PA", "PB", "P0", "PE"]}
    late = sched.submit(engine.make_request(PA, settings()))
    gone = sched.submit(engine.make_request(PB, settings()))
    events = sched.step()
    assert sched.running == 4 and sched.waiting == 2
    assert sched.cancel(gone) and sched.waiting == 1
    assert sched.cancel(ids["PB"]) and sched.running == 3
    assert not sched.cancel(ids["PB"])  # already gone
    events += sched.step()  # "late" takes PB's slot now
    assert sched.running == 4 and sched.waiting == 0
    while sched.has_work:
        events += sched.step()
    tokens = {rid: [e.token for e in events if e.request_id == rid] for rid in
              (*ids.values(), late, gone)}
    # PB's one step gave two tokens (its prefill's and a decode step's), then nothing.
    assert len(tokens[ids["PB"]]) == 2 and tokens[gone] == []
    finished = {e.request_id: e.completion for e in events if e.completion is not None}
    assert ids["PB"] not in finished
    assert assert_same_greedy(finished[late], solo["PA"]) == NEW


def test_queue_bound(engine):
    sched = Scheduler(engine, max_queue=2)
    for _ in range(2):
        sched.submit(engine.make_request(P0, settings()))
    with pytest.raises(QueueFull):
        sched.submit(engine.make_request(P0, settings()))


def test_rows_at_different_positions_match_full_forward(grok, engine):
    """Rows that joined at different times sit at different cache positions; each row's
    log-prob of its own tokens equals a full forward pass of its whole sequence
    (within 4/32: log-softmax of logits that may differ by one bf16 step of 1/32)."""
    done, _ = run(engine, [(0, "PB", settings()), (3, "P0", settings()),
                           (7, "PA", settings())])
    for name, c in done.items():
        logits = grok.logits([PROMPTS[name] + c.output_ids[:-1]])[0, len(PROMPTS[name]) - 1:]
        z = logits - logits.max(-1, keepdims=True)
        want = z - np.log(np.exp(z).sum(-1, keepdims=True))
        got = np.asarray(c.output_logprobs)
        np.testing.assert_allclose(got, want[np.arange(len(got)), c.output_ids],
                                   atol=4 / 32, rtol=0)


def test_request_checks(engine):
    with pytest.raises(GrokError, match=r"needs 36 positions, more than max_seq_len=32"):
        engine.make_request([5] * 24, settings())
    with pytest.raises(GrokError, match="must hold integers"):
        engine.make_request([1.5, 2], settings())
    for bad, message in ((dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
                         (dict(seed="x"), "seed must be an integer"),
                         (dict(stop=[""]), "stop strings must be non-empty"),
                         (dict(ignore_eos=1), "ignore_eos must be true or false"),
                         (dict(temperature=float("nan")), "temperature must be")):
        with pytest.raises(GrokError, match=message):
            settings(**bad)


# --- the per-row logic, without JAX ---------------------------------------------------


PIECES = {2: "", 10: "Hel", 11: "lo", 12: " wor", 13: "ld", 14: "!"}


class _Pieces:
    """A stand-in stream decoder: token t decodes to PIECES[t]."""

    def push(self, token):
        return PIECES[token]

    def flush(self):
        return ""


def _row(**kw):
    from grok.engine.request import Request
    return Row(Request((1, 2, 3), GenerationSettings(**kw)), eos_token=2, decoder=_Pieces())


def test_row_holds_back_a_possible_stop_string():
    row = _row(stop=("lo w",), max_new_tokens=10)
    assert row.accept(10, -1.0, []) == "He"  # "l" may begin "lo w"
    assert row.accept(11, -1.0, []) == "l"  # "Hello": the tail "lo" may begin it
    assert row.accept(12, -1.0, []) == ""  # "lo wor" holds the stop string: cut
    assert (row.text, row.finish_reason) == ("Hel", "stop")
    assert row.completion().output_ids == [10, 11, 12]


def test_row_releases_held_text_when_no_stop_follows():
    row = _row(stop=("lox",), max_new_tokens=3)
    assert [row.accept(t, 0.0, []) for t in (10, 11, 12)] == ["He", "l", "lo wor"]
    assert row.finish_reason == "length"


def test_row_eos_and_ignore_eos():
    row = _row(max_new_tokens=5)
    assert row.accept(10, 0.0, []) == "Hel"
    assert row.accept(2, 0.0, []) == ""
    assert row.finish_reason == "eos" and row.text == "Hel"
    row = _row(max_new_tokens=3, ignore_eos=True)
    for t in (2, 2):
        row.accept(t, 0.0, [])
        assert not row.finished
    row.accept(14, 0.0, [])
    assert row.finish_reason == "length" and row.output_ids == [2, 2, 14]


@pytest.mark.slow
def test_warmup_compiles_every_step_a_request_can_need(grok):
    """After `warmup`, requests of every prompt bucket and row count compile nothing."""
    engine = grok.engine(2, 32)
    engine.warmup()
    count = engine.compile_count
    assert count == 1 + 2 * (2 + 1)  # init; per row bucket, prefill x 2 lengths and decode
    sched = Scheduler(engine)
    for prompt, new in ((P0, 4), (PB + PA, 8), (PA, 20), ((PB + PA + P0)[:30], 2)):
        sched.submit(engine.make_request(prompt, settings(max_new_tokens=new)))
    while sched.has_work:
        sched.step()
    assert engine.compile_count == count


def test_accelerator_bucket_policy(grok, solo):
    """The policy accelerators use (floors on prompt and attention buckets, a token budget
    for batched prefills), here with small numbers: fewer programs, and the scheduler
    splits a bucket's prompts into prefills the budget allows, with the same tokens."""
    engine = Engine(grok, 4, 64, buckets=Buckets(min_prompt=16, min_attend=32,
                                                 prefill_tokens=32))
    assert engine.prompt_buckets() == [16, 32, 64] and engine.attend_buckets() == [32, 64]
    assert [engine.max_prefill_batch(n) for n in (16, 32, 64)] == [2, 1, 1]
    assert engine.warmup_keys() == [
        ("init",), ("prefill", 1, 16), ("prefill", 1, 32), ("prefill", 1, 64), ("decode", 1),
        ("prefill", 2, 16), ("decode", 2), ("decode", 4)]
    done, running = run(engine, [(0, name, settings()) for name in ("P0", "PA", "PB")])
    assert running[0] == 3  # three prompts of bucket 16 admitted at once, in two prefills
    prefills = sorted(k for k in engine.programs() if k[0] == "prefill")
    assert prefills == [("prefill", 1, 16), ("prefill", 2, 16)]
    for name in ("P0", "PA", "PB"):
        assert_same_greedy(done[name], solo[name])
    with pytest.raises(GrokError, match="must be a power of two"):
        Buckets(min_prompt=100, min_attend=32, prefill_tokens=None)
