"""Expert routing: per-token traces, the tallies every step returns, and their outputs.

The trace (`Grok.routing`) is checked against a NumPy recomputation of each layer's router
from the hidden states the layer saw. The tallies are checked against an independent count
from traces of the same sequences. Routing is a discrete choice, so a count can only move
where the 2nd and 3rd router probabilities nearly tie and bf16 noise (another batch shape,
the cached path against the full one) picks the other; the fixture's sequences below have
no such tie (measured: every count equal), and the tests demand exact equality.
"""

import json

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_generate import P0, PA, PB, PE

from grok import Grok, model
from grok.cli import main
from grok.engine.request import GenerationSettings
from grok.engine.scheduler import Scheduler

NEW = 12
PROMPTS = [P0, PB, PA, PE]


@pytest.fixture(scope="module")
def grok(fixture_dir):
    return Grok.load(fixture_dir, fixture_dir / "config.json", mesh_shape=(1, 1))


def traced_forward(grok, tokens):
    """A forward pass that also hands out each layer's MoE input and router weight."""
    def forward(tokens):
        captured = []

        def keep(next_f, args, kwargs, context):
            if isinstance(context.module, model.MoE) and context.method_name == "__call__":
                captured.append(args)
            return next_f(*args, **kwargs)
        with hk.intercept_methods(keep):
            transformer = model.Transformer(grok.config, "sparse", grok.mesh)
            _, _, routing = model.LanguageModel(grok.config, transformer)(
                tokens, with_routing=True)
        return routing, captured

    fn = jax.jit(hk.without_apply_rng(hk.transform(forward)).apply)
    routing, captured = fn(grok.params, jnp.asarray(tokens))
    inputs = [(np.asarray(x, np.float64), np.asarray(w, np.float64))
              for x, w, *_ in captured]
    return routing, inputs


def test_trace_is_the_router_recomputed_in_numpy(grok):
    """Top-2 of softmax(x @ W_router) per layer, in float64, from the hidden states x the
    layer saw: same experts in the same order, gates within 1e-5 (the model's float32
    softmax at HIGHEST precision). `Grok.routing` returns exactly that forward's routing."""
    tokens = np.array([P0 + PA[:7], PB], np.int32)  # both 12 tokens
    trace = grok.routing(tokens)
    L, X = grok.config.num_layers, grok.config.num_selected_experts
    assert trace.experts.shape == trace.gates.shape == (2, 12, L, X)
    routing, inputs = traced_forward(grok, tokens)
    np.testing.assert_array_equal(trace.experts, np.asarray(routing.experts))
    np.testing.assert_array_equal(trace.gates, np.asarray(routing.gates))
    assert len(inputs) == L
    for layer, (x, w) in enumerate(inputs):
        logits = x @ w  # [B, T, E]
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        order = np.argsort(-p, axis=-1)
        top = np.take_along_axis(p, order, -1)
        assert (top[..., 1] - top[..., 2]).min() > 1e-4  # no near-tie: comparison is exact
        np.testing.assert_array_equal(trace.experts[:, :, layer], order[..., :X])
        np.testing.assert_allclose(trace.gates[:, :, layer], top[..., :X], atol=1e-5)


def test_trace_marks_pad_tokens_and_does_not_depend_on_the_batch(grok):
    alone = grok.routing([P0])
    padded = grok.routing([[*P0, 0, 0], PB[:7]])
    np.testing.assert_array_equal(padded.experts[0, :5], alone.experts[0])
    # The router's float32 dot may sum in another order for another batch (XLA:CPU blocks
    # it by shape), which moves a gate by a float32 ulp or two, never more.
    np.testing.assert_allclose(padded.gates[0, :5], alone.gates[0], rtol=1e-6, atol=0)
    assert (padded.experts[0, 5:] == -1).all() and (padded.gates[0, 5:] == 0).all()
    assert (padded.experts[1] >= 0).all()


def expected_counts(grok, completions):
    """Counts from traces of each whole sequence: prompt tokens for prefill, the fed-back
    output tokens (all but the last) for decode."""
    L, E = grok.config.num_layers, grok.config.num_experts
    out = {"prefill": np.zeros((L, E), np.int64), "decode": np.zeros((L, E), np.int64)}
    for c in completions:
        seq = c.prompt_ids + c.output_ids[:-1]
        experts = grok.routing([seq]).experts[0]  # [T, L, X]
        n = len(c.prompt_ids)
        for phase, part in (("prefill", experts[:n]), ("decode", experts[n:])):
            for layer in range(L):
                out[phase][layer] += np.bincount(part[:, layer].ravel(), minlength=E)
    return out


def check_usage(grok, usage, completions):
    want = expected_counts(grok, completions)
    np.testing.assert_array_equal(usage.prefill, want["prefill"])
    np.testing.assert_array_equal(usage.decode, want["decode"])
    X = grok.config.num_selected_experts
    prompt_tokens = sum(len(c.prompt_ids) for c in completions)
    fed_back = sum(len(c.output_ids) - 1 for c in completions)
    assert (usage.prefill_tokens, usage.decode_tokens) == (prompt_tokens, fed_back)
    assert (usage.prefill.sum(-1) == X * prompt_tokens).all()  # counts add up per layer
    assert (usage.decode.sum(-1) == X * fed_back).all()
    assert np.all(usage.prefill_gate_mass <= usage.prefill + 1e-6)  # a gate is at most 1
    assert np.all((usage.decode_entropy > 0) & (usage.decode_entropy <= np.log(8) + 1e-6))


@pytest.mark.parametrize("mesh", [(1, 1), (2, 4)], ids=["1x1", "2x4"])
def test_tallies_equal_an_independent_count(grok, fixture_dir, mesh):
    """A batch of mixed lengths (5, 12, 8, 10 tokens; 12, 7, 3, 9 new ones, so rows finish
    at different steps and free slots sit idle), on 1x1 and on 2x4 (a batch padded for the
    data axis): prefill counts exactly the prompt tokens, decode exactly the fed-back
    tokens of running rows."""
    g = grok if mesh == (1, 1) else Grok.load(fixture_dir, fixture_dir / "config.json",
                                              mesh_shape=mesh)
    engine = g.engine(4, 32)
    sched = Scheduler(engine)
    g.reset_expert_usage()
    for prompt, new in zip(PROMPTS[:3], (12, 7, 3), strict=True):
        sched.submit(engine.make_request(prompt, GenerationSettings(
            max_new_tokens=new, temperature=0)))
    done = []
    steps = 0
    while sched.has_work:
        steps += 1
        if steps == 3:  # one joins a running batch
            sched.submit(engine.make_request(PE, GenerationSettings(
                max_new_tokens=9, temperature=1.0, seed=3, ignore_eos=True)))
        done += [e.completion for e in sched.step() if e.completion is not None]
    assert len(done) == 4
    check_usage(g, g.expert_usage(), done)


def test_reset_and_switch_off(grok, fixture_dir):
    grok.generate(P0, max_new_tokens=3, temperature=0)
    assert grok.expert_usage().prefill_tokens > 0
    grok.reset_expert_usage()
    usage = grok.expert_usage()
    assert usage.prefill_tokens == usage.decode_tokens == 0 and usage.prefill.sum() == 0
    off = Grok(grok.config, grok.params, grok.mesh, expert_stats=False, layers=grok.layers)
    c = off.generate(P0, max_new_tokens=NEW, temperature=0)
    assert off.expert_usage().prefill.sum() == 0
    assert c.output_ids == grok.generate(P0, max_new_tokens=NEW, temperature=0).output_ids


def test_usage_views(grok):
    grok.reset_expert_usage()
    grok.generate([P0, PA], max_new_tokens=4, temperature=0)
    usage = grok.expert_usage()
    share = usage.share("prefill")
    np.testing.assert_allclose(share.sum(-1), 1.0)
    np.testing.assert_allclose(usage.imbalance("prefill"), share.max(-1) * 8)
    np.testing.assert_array_equal(usage.counts(), usage.prefill + usage.decode)
    data = usage.to_json()
    assert data["num_layers"] == 2 and data["num_experts"] == 8
    assert data["prefill"]["counts"] == usage.prefill.tolist()
    with pytest.raises(ValueError, match="phase must be one of"):
        usage.share("training")


# --- the command line -------------------------------------------------------------------


def test_cli_writes_stats_and_picture(tmp_path, capsys):
    """On the demo model: the JSON holds the run's counts, the PNG opens at its size."""
    stats, picture = tmp_path / "usage.json", tmp_path / "usage.png"
    code = main(["--prompt", "12+34=", "--prompt", "5+5=", "--expert-stats", str(stats),
                 "--expert-plot", str(picture)])
    assert code == 0, capsys.readouterr().err
    data = json.loads(stats.read_text())
    layers, experts = data["num_layers"], data["num_experts"]
    assert (layers, experts) == (6, 8)
    assert data["prefill"]["tokens"] == 6 + 4  # "12+34=" and "5+5=", a digit a token
    for phase in ("prefill", "decode"):
        counts = np.array(data[phase]["counts"])
        assert counts.shape == (layers, experts)
        assert (counts.sum(-1) == 2 * data[phase]["tokens"]).all()
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    image = plt.imread(picture)
    assert image.shape[:2] == (340, 1200)  # 12 x (0.3 * 6 layers + 1.6) inches at 100 dpi


def test_cli_without_matplotlib_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    code = main(["--prompt", "1+1=", "--expert-plot", str(tmp_path / "u.png")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "grok1-jax[plot]" in err and "matplotlib" in err
    assert not (tmp_path / "u.png").exists()
