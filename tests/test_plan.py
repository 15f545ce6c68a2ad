"""The plan's figures: the bytes a load and the engine really allocate, per device, known
before either happens; and the one-line refusal of a run that cannot fit."""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import pytest

from grok import Grok, sharding
from grok.config import GROK_1, TINY
from grok.errors import GrokError
from grok.plan import sizes


def real_bytes_per_device(tree) -> int:
    per_device = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    return max(per_device.values())


@pytest.mark.parametrize("mesh_shape, weights, layers", [
    ((2, 4), "int8", "scan"), ((1, 8), None, "unrolled"), ((2, 2), "dequantized", "scan")])
def test_planned_bytes_are_what_load_and_engine_allocate(fixture_dir, mesh_shape, weights,
                                                         layers):
    shape = sizes.RunShape(TINY, mesh_shape, weights, layers, max_batch=6, max_seq_len=96)
    mesh = sharding.make_mesh(mesh_shape)
    planned = sizes.footprint(shape, mesh)
    grok = Grok.load(fixture_dir, "tiny", mesh_shape=mesh_shape, weights=weights,
                     layers=layers)
    assert planned.weights == real_bytes_per_device(grok.params)
    state = grok.engine(max_batch=6, max_seq_len=96).init_state()
    assert planned.slots == sharding.padded_batch(mesh, 6)
    assert planned.state == real_bytes_per_device(state)


def test_planned_int4_bytes_are_what_load_allocates(fixture_dir):
    """4-bit experts (int8 containers on CPU), requantised while loading, in groups of 8
    rows (the fixture's expert width, 1368, takes no more)."""
    shape = sizes.RunShape(TINY, (1, 1), "int4", "scan", max_batch=2, max_seq_len=32,
                           int4_group=8)
    planned = sizes.footprint(shape, sharding.make_mesh((1, 1)))
    grok = Grok.load(fixture_dir, "tiny", mesh_shape=(1, 1), weights="int4", layers="scan",
                     int4_group=8)
    assert planned.weights == real_bytes_per_device(grok.params)


def test_grok1_int8_weights_per_device():
    """The figure README quotes: int8 grok-1 on 8 devices of `model`, scanned layers (CPU
    would hold float32; the layout is the same)."""
    mesh = sharding.make_mesh((1, 8))
    params = sizes.stored_params(GROK_1, mesh, "int8", "scan")
    total = sizes.bytes_per_device(params)
    # int8 weights and bf16 scales split 8 ways; the embedding (float32 on CPU) and the
    # norms and router, which the rules replicate over `model`.
    assert 36 * sizes.GIB < total < 40 * sizes.GIB


def test_a_run_that_cannot_fit_is_one_line_naming_what_would(monkeypatch):
    mesh = sharding.make_mesh((1, 4))
    monkeypatch.setattr(sizes, "device_memory", lambda device: 85_000_000_000)
    shape = sizes.RunShape(GROK_1, (1, 4), "int8", "scan", max_batch=8, max_seq_len=8192)
    with pytest.raises(GrokError) as e:
        sizes.check_fits(shape, mesh, name="grok-1")
    message = str(e.value)
    assert "\n" not in message and len(message) < 400
    assert message.startswith("grok-1 with int8 weights needs ")
    assert "of weights per device on this 1x4 mesh" in message
    assert "use at least 8 devices" in message and "int4" not in message  # CPU: int8 holds it
    # Where 4-bit values are packed two to a byte (accelerators), int4 is the way out.
    monkeypatch.setattr(sizes, "int4_storage", lambda platform: jnp.int4)
    with pytest.raises(GrokError, match=r"use at least 8 devices, or --weights int4 \(\d+\.\d "
                                        r"GiB of weights per device\)"):
        sizes.check_fits(shape, mesh, name="grok-1")

    monkeypatch.setattr(sizes, "device_memory", lambda device: 45 * sizes.GIB)
    mesh = sharding.make_mesh((1, 8))
    shape = sizes.RunShape(GROK_1, (1, 8), "int8", "scan", max_batch=64, max_seq_len=8192)
    with pytest.raises(GrokError, match=r"decode state \(64 slots x 8192 positions\).*"
                                        r"at most \d+ slots \(--max-batch\) fit"):
        sizes.check_fits(shape, mesh, name="grok-1")
    fits = sizes.RunShape(GROK_1, (1, 8), "int8", "scan", max_batch=4, max_seq_len=8192)
    assert sizes.check_fits(fits, mesh).slots == 4


@pytest.mark.slow  # compiles the largest steps of five guesses
def test_most_slots_takes_the_most_that_fit(fixture_dir, monkeypatch):
    """`--max-batch auto`: with room for the weights and some 20 MB, the slots chosen fit
    beside the largest step's temporaries (compiled at that size), and twice as many would
    not (on CPU every slot may join a prefill, so temporaries grow fast with the slots)."""
    from grok.engine.engine import Engine
    from grok.plan import plan

    grok = Grok.load(fixture_dir, "tiny", mesh_shape=(2, 1))
    weights = sizes.bytes_per_device(grok.params)
    memory = weights + 20 * (1 << 20)
    monkeypatch.setattr(sizes, "device_memory", lambda device: memory)

    def need(n: int, chunk: int | None) -> int:
        engine = Engine(grok, n, 64, prefill_chunk=chunk)
        state = sizes.bytes_per_device(engine.state_shapes())
        footprint = sizes.Footprint(weights, state, 0, n, 64)
        extra = max(plan._extra_bytes(k, engine.compile_program(k), footprint)
                    for k in plan.select(engine.warmup_keys(), None, largest=True))
        return weights + state + extra

    # Whole prompts, and chunks (whose continuing prefills and mixed steps count too).
    for chunk in (None, 8):
        slots = plan.most_slots(grok, 64, memory_fraction=1.0, prefill_chunk=chunk)
        assert slots >= 2 and slots % 2 == 0  # whole data rows
        assert need(slots, chunk) <= memory < need(2 * slots + 2, chunk)
    with pytest.raises(GrokError, match="no decode slot of 64 positions fits"):
        plan.most_slots(grok, 64, memory_fraction=1.0, memory=weights)


def test_run_py_refuses_a_run_that_cannot_fit_before_loading(monkeypatch, capsys):
    from grok import cli

    monkeypatch.setattr(sizes, "device_memory", lambda device: 1 << 20)
    code = cli.main(["--prompt", "1+2=", "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(
        "error: the demo model with dequantized weights needs ")
    assert "of weights per device on this 1x1 mesh" in err[0]
    assert "loaded in" not in capsys.readouterr().err


def test_progress_text():
    from grok.engine.progress import ProgressLine, progress_text

    assert progress_text("compiling", 0, 40, 0.0) == "compiling: 0/40 programs, 0 s"
    assert progress_text("compiling", 10, 40, 192.0) == (
        "compiling: 10/40 programs, 3 min 12 s, about 9 min 36 s left")
    assert progress_text("warming up", 40, 40, 7300.0) == "warming up: 40/40 programs, 2 h 01 min"
    lines = []
    line = ProgressLine("compiling", write=lines.append, interval=3600)
    for done in range(5):
        line(done, 4, float(done))
    assert lines == ["compiling: 0/4 programs, 0 s", "compiling: 4/4 programs, 4 s"]


def h100x8():
    """Eight compile-only H100s; skips, saying so, where the plan extra is missing."""
    from grok.plan import plan, targets

    try:
        return plan.gpu_target("h100x8")
    except GrokError as e:
        if targets.INSTALL_HINT in str(e):
            pytest.skip(str(e))
        raise


def test_plan_for_eight_h100s_without_a_gpu():
    """The plan of a small config with grok-1's layout (int8, scanned layers) on eight
    compile-only H100s: the state is donated into decode, each scanned layer all-reduces
    over `model`, and no layer's experts are copied out of the stack before one is chosen
    (they are read from it in place)."""
    from grok.plan import plan, targets

    target = h100x8()
    shape = sizes.RunShape(TINY, None, "int8", "scan", max_batch=8, max_seq_len=256)
    result = plan.make_plan(shape, target, kinds=("prefill", "decode"), largest=True)
    assert result.mesh_shape == (1, 8) and result.run.layers == "scan"
    assert result.target.memory_bytes == targets.GPUS["h100"].memory_bytes
    assert result.footprint.weights == sizes.bytes_per_device(sizes.stored_params(
        TINY, sharding.make_mesh((1, 8), devices=target.devices), "int8", "scan"))
    assert result.fits and result.max_slots() > 1000
    decode = next(p for p in result.programs if p.key[0] == "decode")
    assert decode.key == ("decode", 8)
    assert decode.alias_bytes >= result.footprint.state
    assert decode.collectives_per_layer.get("all-reduce", 0) >= 1
    e, d, f = TINY.num_experts, TINY.emb_size, TINY.ffn_size
    layer_experts = {f"s8[1,{e},{d},{f // 8}]", f"s8[1,{e},{f // 8},{d}]"}
    for program in result.programs:
        assert not [m for m in program.materialized if any(s in m for s in layer_experts)]
    report = plan.describe(result)
    assert "verdict: fits" in report and "decode rows 8" in report
    # The decode step's temporaries do not grow with the cache it carries through the
    # layer loop (once they held a transposed copy of it, in and out at every step).
    grok = Grok(TINY, sizes.stored_params(TINY, sharding.make_mesh((1, 8), devices=target.devices),
                                          "int8", "scan"),
                sharding.make_mesh((1, 8), devices=target.devices), layers="scan")
    temps, states = [], []
    for slots in (8, 32):
        engine = grok.engine(slots, 256)
        temps.append(engine.compile_program(("decode", 4)).memory_analysis()
                     .temp_size_in_bytes)
        states.append(sizes.bytes_per_device(engine.state_shapes()))
    assert temps[1] - temps[0] < (states[1] - states[0]) / 16
    as_json = result.to_json()
    assert as_json["fits"] and as_json["warmup_programs"] == len(
        Grok(TINY, sizes.stored_params(TINY, sharding.make_mesh((1, 8), devices=target.devices),
                                       "int8", "scan"),
             sharding.make_mesh((1, 8), devices=target.devices), layers="scan")
        .engine(8, 256, prefill_chunk=512).warmup_keys())  # the server's default chunk
    assert as_json["prefill_chunk"] == 512


def test_server_refuses_a_run_that_cannot_fit_before_loading(monkeypatch, capsys):
    from grok.serve import __main__ as serve

    monkeypatch.setattr(sizes, "device_memory", lambda device: 1 << 20)
    assert serve.main(["--max-batch", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "error: the demo model with dequantized weights needs ")
    assert serve.main(["--max-batch", "auto", "--memory-fraction", "1.5"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --memory-fraction must be in (0, 1], got 1.5")


@pytest.mark.slow  # two deviceless compiles
def test_int4_stacks_are_read_in_place_on_gpus():
    """Scanned 4-bit experts on eight compile-only H100s: the decode step's temporaries do
    not grow with the layers. Held [..., K, N] like 8-bit ones, XLA relaid out every
    layer's 4-bit weights and scales before the layer loop, at every step (then 0.55 MB a
    layer here, 6 GiB a step for grok-1)."""
    target = h100x8()
    mesh = sharding.make_mesh((1, 8), devices=target.devices)
    temps = []
    for layers in (2, 8):
        config = dataclasses.replace(TINY, emb_size=512, widening_factor=6, key_size=64,
                                     num_q_heads=8, num_kv_heads=8, num_layers=layers)
        params = sizes.stored_params(config, mesh, "int4", "scan", int4_group=64)
        engine = Grok(config, params, mesh, layers="scan").engine(8, 256)
        temps.append(engine.compile_program(("decode", 8)).memory_analysis()
                     .temp_size_in_bytes)
    stack_bytes_per_layer = 3 * 8 * 512 * (config.ffn_size // 8) // 2
    assert temps[1] - temps[0] < 6 * stack_bytes_per_layer / 10


def test_run_shape_takes_the_servers_prefill_chunk():
    """None: the platform's default (as the server's); 0: whole prompts; else a power of
    two, and deterministic steps need one."""
    assert sizes.RunShape(TINY).resolved("cpu").prefill_chunk == 16
    assert sizes.RunShape(TINY).resolved("gpu").prefill_chunk == 512
    assert sizes.RunShape(TINY, prefill_chunk=0).resolved("gpu").prefill_chunk == 0
    with pytest.raises(GrokError, match="prefill chunk must be a power of two, or None for whole "
                                         "prompts; got 24"):
        sizes.RunShape(TINY, prefill_chunk=24)
    with pytest.raises(GrokError, match="deterministic steps prefill in chunks"):
        sizes.RunShape(TINY, prefill_chunk=0, deterministic=True)


@pytest.mark.parametrize("argv, message", [
    (["--prefill-chunk", "24"], "--prefill-chunk must be a power of two, or 0 for whole "
                                "prompts; got 24"),
    (["--prefill-chunk", "0", "--deterministic"], "--deterministic prefill in chunks"),
])
def test_grok_plan_names_its_step_flags(argv, message, capsys):
    from grok.plan.__main__ import main

    assert main(["--config", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
