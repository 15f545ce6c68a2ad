"""The plan of a run: every program the engine would compile, compiled for the target's
devices (real ones, or GPUs described to XLA's compiler) from abstract parameters, with the
memory each device needs and the facts in each program's HLO that decide its speed.

No checkpoint is read and nothing is allocated: the parameters are the ShapeDtypeStructs
`Grok.load` would place (`sizes.stored_params`), the engine is the one the server runs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import jax
from jax.sharding import Mesh

from grok import sharding
from grok.api import Grok
from grok.engine.engine import MAX_SLOTS, Engine, state_shapes
from grok.engine.prefix_cache import DEFAULT_BLOCK_SIZE, prefix_pool_shapes
from grok.errors import GrokError
from grok.plan import hlo, sizes, targets
from grok.plan.sizes import Footprint, RunShape, gib
from grok.quant import QuantizedWeight4bit, is_quantized

PROGRAM_KINDS = ("init", "prefill", "decode", "mixed")
STEP_KINDS = ("prefill", "decode", "mixed")  # programs that run the model on the state


@dataclasses.dataclass(frozen=True)
class PlanTarget:
    """The devices a plan compiles for and the memory each has."""

    name: str  # "local", "h100x8", or a target config file's name
    description: str  # what each device is
    devices: tuple
    memory_bytes: int | None  # per device; None where the platform does not say

    @property
    def platform(self) -> str:
        return self.devices[0].platform


def local_target() -> PlanTarget:
    devices = tuple(jax.devices())
    return PlanTarget("local", devices[0].device_kind, devices,
                      sizes.device_memory(devices[0]))


def gpu_target(text: str) -> PlanTarget:
    """`h100x8`-style targets, compiled through XLA's CUDA plugin (the `plan` extra)."""
    target = targets.parse_target(text)
    devices = targets.compile_devices(targets.target_config_text(target.gpu), target.count)
    return PlanTarget(str(target), target.gpu.description, tuple(devices),
                      target.gpu.memory_bytes)


def file_target(path, count: int) -> PlanTarget:
    """Any GPU, from a `GpuTargetConfig` text proto file, `count` of them."""
    config = targets.load_target_config(path)
    devices = targets.compile_devices(config.text, count)
    return PlanTarget(f"{path} x{count}", config.description, tuple(devices),
                      config.memory_bytes)


def default_mesh_shape(count: int, config) -> tuple[int, int]:
    """Tensor parallelism over as many devices as the heads allow, data over the rest."""
    model = math.gcd(count, config.num_kv_heads, config.num_q_heads)
    return count // model, model


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """One compiled program: how long it took and what it needs beyond the resident bytes
    (weights and decode state), per device."""

    key: tuple
    compile_s: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    extra_bytes: int  # inputs and outputs beyond the resident ones, plus temporaries
    materialized: tuple[str, ...]  # quantised weights written to memory (see hlo.py)
    collectives_per_layer: dict

    @property
    def name(self) -> str:
        kind, *shape = self.key
        labels = {"prefill": ("batch", "prompt"), "decode": ("rows",),
                  "mixed": ("rows",)}.get(kind)
        if labels is None:  # init, and the block copies (keyed by the cache's settings)
            return kind
        return " ".join([kind, *(f"{a} {b}" for a, b in zip(labels, shape, strict=True))])

    def to_json(self) -> dict:
        return {"program": self.name, "key": list(self.key), "compile_s": self.compile_s,
                "argument_bytes": self.argument_bytes, "output_bytes": self.output_bytes,
                "alias_bytes": self.alias_bytes, "temp_bytes": self.temp_bytes,
                "extra_bytes": self.extra_bytes, "materialized_weights": list(self.materialized),
                "collectives_per_layer": self.collectives_per_layer}


@dataclasses.dataclass(frozen=True)
class Plan:
    run: RunShape  # with the platform's defaults filled in
    target: PlanTarget
    mesh_shape: tuple[int, int]
    footprint: Footprint
    memory_fraction: float
    warmup_programs: int  # what the server's warmup compiles
    programs: tuple[ProgramReport, ...]  # those compiled for this plan
    prefix_block_bytes: int  # one prefix-cache block of DEFAULT_BLOCK_SIZE tokens, per device

    def prefix_blocks(self) -> int | None:
        """Prefix-cache blocks the headroom holds: what a server takes by default."""
        if self.usable is None:
            return None
        data = self.mesh_shape[0]
        return max(0, int((self.usable - self.peak) // self.prefix_block_bytes)) // data * data

    @property
    def usable(self) -> int | None:
        memory = self.target.memory_bytes
        return None if memory is None else int(memory * self.memory_fraction)

    @property
    def largest(self) -> ProgramReport | None:
        return max(self.programs, key=lambda p: p.extra_bytes, default=None)

    @property
    def peak(self) -> int:
        largest = self.largest
        return self.footprint.resident + (largest.extra_bytes if largest else 0)

    @property
    def fits(self) -> bool | None:
        return None if self.usable is None else self.peak <= self.usable

    def max_slots(self) -> int | None:
        """The most slots that fit at this context (the state grows by a slot's share;
        temporaries as compiled here)."""
        if self.usable is None:
            return None
        fp, data = self.footprint, self.mesh_shape[0]
        spare = self.usable - fp.weights - (self.largest.extra_bytes if self.largest else 0)
        return max(0, int(spare // (fp.state / fp.slots)) // data * data)

    def max_context(self) -> int | None:
        """The longest context that fits at these slots (cache bytes grow per position; the
        rest of the state and the temporaries as compiled here), in steps of 16."""
        if self.usable is None:
            return None
        fp = self.footprint
        per_position = fp.cache / fp.max_seq_len
        spare = (self.usable - fp.weights - (fp.state - fp.cache)
                 - (self.largest.extra_bytes if self.largest else 0))
        return max(0, min(self.run.config.sequence_len, int(spare // per_position) // 16 * 16))

    def verdict(self) -> str:
        """Whether it fits, and if not, the first thing to change."""
        fp, usable = self.footprint, self.usable
        if usable is None:
            return "unknown: the devices do not report their memory"
        slots, context = self.max_slots(), self.max_context()
        if self.fits:
            return (f"fits, with {gib(usable - self.peak)} to spare per device; about "
                    f"{slots} slots fit at {fp.max_seq_len} positions, and {fp.slots} slots "
                    f"up to {context} positions")
        if fp.weights > usable:
            return (f"does not fit: the weights alone need {gib(fp.weights)} per device of "
                    f"{gib(usable)} usable; use more devices (a larger `model` or `data` "
                    f"axis) or another weight mode")
        if slots and slots >= 1:
            return (f"does not fit: use at most {slots} slots (--max-batch) at "
                    f"{fp.max_seq_len} positions, or {fp.slots} slots of at most {context}")
        return ("does not fit: the weights leave too little for the decode state and the "
                "largest step; use more devices or a shorter --max-seq-len")

    def to_json(self) -> dict:
        fp = self.footprint
        return {
            "model_layers": self.run.config.num_layers,
            "target": self.target.name, "device": self.target.description,
            "devices": len(self.target.devices), "mesh": list(self.mesh_shape),
            "weights": self.run.weights, "layers": self.run.layers, "moe": self.run.moe,
            "int4_group": self.run.int4_group if self.run.weights == "int4" else None,
            "slots": fp.slots, "max_seq_len": fp.max_seq_len,
            "prefill_chunk": self.run.prefill_chunk or None,
            "deterministic": self.run.deterministic,
            "device_memory_bytes": self.target.memory_bytes,
            "memory_fraction": self.memory_fraction, "usable_bytes": self.usable,
            "weight_bytes": fp.weights, "state_bytes": fp.state,
            "largest_program": self.largest.name if self.largest else None,
            "largest_extra_bytes": self.largest.extra_bytes if self.largest else 0,
            "peak_bytes": self.peak, "fits": self.fits, "verdict": self.verdict(),
            "max_slots": self.max_slots(), "max_context": self.max_context(),
            "prefix_cache_blocks": self.prefix_blocks(),
            "prefix_cache_block_size": DEFAULT_BLOCK_SIZE,
            "warmup_programs": self.warmup_programs,
            "compiled_programs": len(self.programs),
            "compile_s": sum(p.compile_s for p in self.programs),
            "programs": [p.to_json() for p in self.programs],
        }


def select(keys: Sequence[tuple], kinds: Sequence[str] | None, largest: bool) -> list[tuple]:
    """The programs to compile: of the given kinds (default all), and with `largest` only
    each kind's biggest shape, which has the largest temporaries."""
    chosen = [k for k in keys if kinds is None or k[0] in kinds]
    if not largest:
        return chosen
    biggest: dict[str, tuple] = {}
    for key in chosen:
        if key[0] not in biggest or math.prod(key[1:]) > math.prod(biggest[key[0]][1:]):
            biggest[key[0]] = key
    return list(biggest.values())


def make_plan(shape: RunShape, target: PlanTarget, *, memory_fraction: float = 0.9,
              kinds: Sequence[str] | None = None, largest: bool = False,
              auto_slots: bool = False,
              progress: Callable[[int, int, float], None] | None = None) -> Plan:
    """The plan of `shape` on `target`: every warmup program compiled (or those of `kinds`,
    or with `largest` each kind's biggest), and the memory per device. `auto_slots`: the
    slots are what the server's `--max-batch auto` would take (`most_slots`), not
    `shape.max_batch`."""
    if not 0 < memory_fraction <= 1:
        raise GrokError(f"memory fraction must be in (0, 1], got {memory_fraction!r}")
    run = shape.resolved(target.platform)
    mesh_shape = run.mesh_shape or default_mesh_shape(len(target.devices), run.config)
    mesh = _mesh(mesh_shape, target)
    sharding.check_mesh(run.config, mesh)
    params = sizes.stored_params(run.config, mesh, run.weights, run.layers, run.int4_group)
    grok = Grok(run.config, params, mesh, moe_strategy=run.moe, layers=run.layers)
    if auto_slots:
        run = dataclasses.replace(run, max_batch=most_slots(
            grok, run.max_seq_len, memory_fraction, target.memory_bytes,
            prefill_chunk=run.prefill_chunk or None, deterministic=run.deterministic))
    footprint = sizes.footprint(run, mesh, params)
    engine = grok.engine(run.max_batch, run.max_seq_len, prefill_chunk=run.prefill_chunk or None,
                         deterministic=run.deterministic)
    keys = select(engine.warmup_keys(), kinds, largest)
    weight_shapes = [shape for leaf in jax.tree.leaves(params, is_leaf=is_quantized)
                     if is_quantized(leaf) for shape in _weight_forms(leaf)]
    reports = []
    start = time.perf_counter()
    if progress is not None:
        progress(0, len(keys), 0.0)
    for done, key in enumerate(keys, 1):
        compiled = engine.compile_program(key)
        reports.append(_report(key, compiled, engine.compile_times.get(key, 0.0), footprint,
                               weight_shapes, run))
        if progress is not None:
            progress(done, len(keys), time.perf_counter() - start)
    data = mesh_shape[0]
    block_bytes = sizes.bytes_per_device(prefix_pool_shapes(
        run.config, mesh, data, DEFAULT_BLOCK_SIZE)) // data
    return Plan(run, target, mesh_shape, footprint, memory_fraction,
                len(engine.warmup_keys()), tuple(reports), block_bytes)


def _weight_forms(w) -> list[tuple[int, ...]]:
    """The per-device shapes a quantised weight's values take when dequantised: as held,
    and split into its scale groups ([..., G, K/G, N] for 8 bits, [..., N, G, K/G] for 4
    bits held K-last), which is how XLA writes them when it does."""
    held = tuple(w.weight.sharding.shard_shape(w.weight.shape))
    scales = tuple(w.scales.sharding.shard_shape(w.scales.shape))
    if isinstance(w, QuantizedWeight4bit):
        *lead, n, k = held
        groups = scales[-1]
        return [held, (*lead, n, groups, k // groups)]
    *lead, k, n = held
    groups = scales[-2]
    return [held, (*lead, groups, k // groups, n)]


def most_slots(grok: Grok, max_seq_len: int, memory_fraction: float = 0.9,
               memory: int | None = None, prefill_chunk: int | None = None,
               deterministic: bool = False) -> int:
    """The most decode slots the devices hold at `max_seq_len`, as vLLM sizes its cache
    from its memory utilization: what `memory_fraction` of a device leaves after the
    weights and the largest step's temporaries, those compiled (never run) for a first
    guess that ignores them, of the steps an engine of `prefill_chunk` and `deterministic`
    runs. `memory`: bytes per device (default: what the device says)."""
    mesh = grok.mesh
    memory = sizes.device_memory(mesh.devices.flat[0]) if memory is None else memory
    if memory is None:
        raise GrokError("--max-batch auto needs the devices' memory, which this platform "
                        "does not report: give --max-batch N")
    usable = int(memory * memory_fraction)
    weights = sizes.bytes_per_device(grok.params)
    data = mesh.shape[sharding.DATA]
    per_slot = sizes.bytes_per_device(state_shapes(grok.config, mesh, data, max_seq_len)) / data

    def fit(extra: int) -> int:
        return min(MAX_SLOTS, int((usable - weights - extra) // per_slot)) // data * data

    def extra_at(slots: int) -> int:  # the largest step's temporaries, compiled
        engine = Engine(grok, slots, max_seq_len, prefill_chunk=prefill_chunk,
                        deterministic=deterministic)
        footprint = Footprint(weights, sizes.bytes_per_device(engine.state_shapes()), 0,
                              slots, max_seq_len)
        return max(_extra_bytes(key, engine.compile_program(key), footprint)
                   for key in select(engine.warmup_keys(), STEP_KINDS, largest=True))

    # Temporaries grow with the slots (more rows per step), so the slots that fit beside
    # those of a larger guess fit beside their own. A guess whose temporaries leave no
    # room is halved.
    guess = fit(0)
    while guess >= data:
        extra = extra_at(guess)
        slots = fit(extra)
        if slots >= data:
            return min(slots, guess)
        guess = guess // 2 // data * data
    raise GrokError(f"no decode slot of {max_seq_len} positions fits beside the weights "
                    f"({gib(weights)}) and the temporaries of the largest step in "
                    f"{gib(usable)} per device ({memory_fraction:g} of {gib(memory)}); use "
                    f"more devices or a shorter --max-seq-len")


def spare_prefix_blocks(engine: Engine, block_size: int, memory_fraction: float = 0.9
                        ) -> int | None:
    """Prefix-cache blocks of `block_size` tokens that fit in what `memory_fraction` of a
    device leaves after the weights, the decode state and the largest step's temporaries
    (compiled now if they are not yet); None on CPU (whose memory is the host's, shared
    with everything else) and where the device does not report its memory."""
    grok, mesh = engine.grok, engine.mesh
    device = mesh.devices.flat[0]
    memory = None if device.platform == "cpu" else sizes.device_memory(device)
    if memory is None:
        return None
    weights = sizes.bytes_per_device(grok.params)
    footprint = Footprint(weights, sizes.bytes_per_device(engine.state_shapes()), 0,
                          engine.slots, engine.max_seq_len)
    extra = max(_extra_bytes(key, engine.compile_program(key), footprint)
                for key in select(engine.warmup_keys(), STEP_KINDS, largest=True))
    data = mesh.shape[sharding.DATA]
    # A block's keys and values per device: a pool of one block per data row, over them.
    per_block = sizes.bytes_per_device(prefix_pool_shapes(grok.config, mesh, data,
                                                          block_size)) / data
    spare = int(memory * memory_fraction) - footprint.resident - extra
    return max(0, int(spare // per_block)) // data * data


def _mesh(mesh_shape: tuple[int, int], target: PlanTarget) -> Mesh:
    data, model = mesh_shape
    if data * model != len(target.devices):
        raise GrokError(f"mesh {data}x{model} uses {data * model} devices; target "
                        f"{target.name} has {len(target.devices)}: a plan uses them all")
    return sharding.make_mesh(mesh_shape, devices=target.devices)


def _report(key, compiled, compile_s: float, footprint: Footprint, weight_shapes,
            run: RunShape) -> ProgramReport:
    memory = compiled.memory_analysis()
    text = compiled.as_text()
    materialized: tuple[str, ...] = ()
    if run.weights in ("int8", "int4") and key[0] in STEP_KINDS:
        materialized = tuple(hlo.materialized_weights(text, weight_shapes))
    return ProgramReport(key, compile_s, memory.argument_size_in_bytes,
                         memory.output_size_in_bytes, memory.alias_size_in_bytes,
                         memory.temp_size_in_bytes, _extra_bytes(key, compiled, footprint),
                         materialized, _collectives_per_layer(text, run))


def _extra_bytes(key: tuple, compiled, footprint: Footprint) -> int:
    """What a program needs beyond the resident weights and decode state (which prefill
    and decode take as arguments, and init makes): its temporaries, outputs that alias no
    input, and other inputs."""
    memory = compiled.memory_analysis()
    resident = footprint.resident if key[0] in STEP_KINDS else 0
    made = footprint.state if key[0] == "init" else 0
    return (memory.temp_size_in_bytes
            + max(0, memory.output_size_in_bytes - memory.alias_size_in_bytes - made)
            + max(0, memory.argument_size_in_bytes - resident))


def _collectives_per_layer(text: str, run: RunShape) -> dict:
    """What one decoder layer waits on: the scanned body's collectives, or an unrolled
    program's total over its layers (which then includes the few outside the layers)."""
    if run.layers == "scan":
        bodies = hlo.loop_bodies(text)
        counts = [hlo.collectives(text, body) for body in bodies]
        best = max(counts, key=lambda c: sum(c.values()), default={})
        return {k: v for k, v in best.items() if v}
    total = hlo.collectives(text)
    return {k: round(v / run.config.num_layers, 2) for k, v in total.items() if v}


def describe(plan: Plan) -> str:
    """The plan as a person reads it."""
    fp, run = plan.footprint, plan.run
    target = plan.target
    memory = "memory unknown" if target.memory_bytes is None else gib(target.memory_bytes)
    weights = f"{run.weights} weights"
    if run.weights == "int4":
        weights += f" (groups of {run.int4_group} rows)"
    lines = [
        f"{run.config.num_layers}-layer model on {target.name}: {len(target.devices)} x "
        f"{target.description} ({memory} each), mesh {plan.mesh_shape[0]}x"
        f"{plan.mesh_shape[1]}, {weights}, {run.layers} layers, {run.moe} MoE",
        f"decode state: {fp.slots} slots x {fp.max_seq_len} positions; prompts "
        + (f"in chunks of {run.prefill_chunk}" if run.prefill_chunk else "whole")
        + (", deterministic steps" if run.deterministic else ""),
        "per device:",
        f"  weights        {gib(fp.weights):>12}",
        f"  decode state   {gib(fp.state):>12}",
    ]
    largest = plan.largest
    if largest is not None:
        lines.append(f"  largest step   {gib(largest.extra_bytes):>12}  ({largest.name}: "
                     f"temporaries {gib(largest.temp_bytes)})")
    lines.append(f"  peak           {gib(plan.peak):>12}")
    if plan.usable is not None:
        lines.append(f"  usable         {gib(plan.usable):>12}  ({plan.memory_fraction:g} of "
                     f"{gib(target.memory_bytes)})")
        lines.append(f"  headroom       {gib(plan.usable - plan.peak):>12}")
        blocks = plan.prefix_blocks()
        lines.append(f"prefix cache: the headroom holds {blocks} blocks of "
                     f"{DEFAULT_BLOCK_SIZE} tokens ({blocks * DEFAULT_BLOCK_SIZE} positions, "
                     f"{gib(blocks * plan.prefix_block_bytes)} per device), what a server "
                     f"takes by default")
    lines.append(f"verdict: {plan.verdict()}")
    total = sum(p.compile_s for p in plan.programs)
    lines.append(f"programs: warmup compiles {plan.warmup_programs}; compiled "
                 f"{len(plan.programs)} here in {total:.1f} s")
    width = max((len(p.name) for p in plan.programs), default=10)
    for p in plan.programs:
        collectives = ", ".join(f"{k} {v:g}" for k, v in p.collectives_per_layer.items())
        lines.append(f"  {p.name:<{width}}  {p.compile_s:6.1f} s  temp {gib(p.temp_bytes):>9}"
                     f"  weights in bf16: {len(p.materialized) or 'none'}"
                     f"  collectives per layer: {collectives or 'none'}")
    return "\n".join(lines)

