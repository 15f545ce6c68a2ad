"""Bytes per device of a run, from shapes and placements alone: what `Grok.load` will place
and what the engine's decode state will hold, before a byte of either exists.

The weights are the release's abstract tree (`model.abstract_params`), placed by the
partition rules and converted as `quant.store_params` converts them (`stored_form`), so the
figures are the ones a load really allocates (a test checks it); the decode state is the
engine's own `state_shapes`. Run.py and the server check them against the devices' memory
before reading the checkpoint, and `grok-plan` adds the compiled programs' temporaries.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from grok import model, sharding
from grok.config import GrokConfig
from grok.engine.engine import check_steps, default_prefill_chunk, state_shapes
from grok.errors import GrokError
from grok.layers import check_layer_mode, default_layer_mode
from grok.params import storage
from grok.quant import (
    DEFAULT_INT4_GROUP,
    WEIGHT_MODES,
    QuantizedWeight4bit,
    QuantizedWeight8bit,
    check_int4_group,
    default_weight_mode,
    int4_storage,
    is_quantized,
    map_params,
    nbytes,
    storage_dtype,
    stored_form,
)

GIB = 1 << 30


def gib(n: float) -> str:
    """Bytes for a person: GiB, or MiB below one GiB (small configs)."""
    return f"{n / GIB:.1f} GiB" if abs(n) >= GIB else f"{n / (1 << 20):.1f} MiB"


@dataclasses.dataclass(frozen=True)
class RunShape:
    """What decides a run's memory: the model, the mesh and how weights and layers are held,
    the decode state's slots and positions, and the server's steps (their chunk: its
    temporaries). `weights`, `layers` and `prefill_chunk` None: the platform's defaults, as
    `Grok.load` and the server choose them; `prefill_chunk` 0: whole prompts."""

    config: GrokConfig
    mesh_shape: tuple[int, int] | None = None
    weights: str | None = None
    layers: str | None = None
    moe: str = "sparse"
    max_batch: int = 8
    max_seq_len: int | None = None
    int4_group: int = DEFAULT_INT4_GROUP  # rows per 4-bit scale, with weights="int4"
    prefill_chunk: int | None = None
    deterministic: bool = False  # the server's --deterministic steps (one shape each)

    def __post_init__(self):
        if self.weights is not None and self.weights not in WEIGHT_MODES:
            raise GrokError(f"weights must be one of {list(WEIGHT_MODES)}, got "
                            f"{self.weights!r:.40}")
        if self.layers is not None:
            check_layer_mode(self.layers)
        check_int4_group(self.int4_group)
        for name in ("max_batch", "max_seq_len"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise GrokError(f"{name} must be a positive integer, got {value!r:.40}")
        if self.prefill_chunk is not None:  # None: the platform's default, a chunk
            check_steps(self.prefill_chunk or None, self.deterministic)
        if self.max_seq_len is not None and self.max_seq_len > self.config.sequence_len:
            raise GrokError(f"max_seq_len={self.max_seq_len} exceeds the model's context of "
                            f"{self.config.sequence_len}")

    def resolved(self, platform: str) -> RunShape:
        """With the platform's defaults filled in."""
        return dataclasses.replace(
            self,
            weights=self.weights or default_weight_mode(platform),
            layers=self.layers or default_layer_mode(platform),
            max_seq_len=self.max_seq_len or self.config.sequence_len,
            prefill_chunk=(default_prefill_chunk(platform) if self.prefill_chunk is None
                           else self.prefill_chunk))


def stored_params(config: GrokConfig, mesh: Mesh, weights: str, layers: str,
                  int4_group: int = DEFAULT_INT4_GROUP) -> dict:
    """The parameters `Grok.load` places for this config, mesh and modes, as
    ShapeDtypeStructs with their shardings; a 4-bit group a device's rows cannot hold is
    the error the load would raise."""
    platform = mesh.devices.flat[0].platform

    def place(path, value):
        def one(kind, shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.param_sharding(
                mesh, path, kind, shape))
        if is_quantized(value) and storage(path, weights) == "int4":
            *lead, rows, columns = value.shape
            logical = sharding.param_sharding(mesh, path, "weight", value.shape)
            check_int4_group(int4_group, logical.shard_shape(value.shape)[-2],
                             f"{path} (a device's share on this mesh)")
            scales = sharding.param_sharding(mesh, path, "scales",
                                             (*lead, rows // int4_group, columns))
            held_weight, held_scales = QuantizedWeight4bit.held_shapes(value.shape, int4_group)
            value = QuantizedWeight4bit(  # held K-last (see QuantizedWeight4bit)
                jax.ShapeDtypeStruct(held_weight, int4_storage(platform),
                                     sharding=sharding.k_last(logical, len(held_weight))),
                jax.ShapeDtypeStruct(held_scales, jnp.bfloat16,
                                     sharding=sharding.k_last(scales, len(held_scales))))
        elif is_quantized(value):
            value = QuantizedWeight8bit(one("weight", value.weight.shape, value.weight.dtype),
                                        one("scales", value.scales.shape, value.scales.dtype))
        else:
            value = one("value", value.shape, value.dtype)
        return stored_form(path, value, weights, storage_dtype(platform),
                           split_experts=platform == "cpu")
    return map_params(place, model.abstract_params(config, layers=layers))


def bytes_per_device(tree) -> int:
    """Bytes the most loaded device holds of a tree of placed ShapeDtypeStructs (or
    arrays): its shard of every leaf."""
    per_device: dict = {}
    for leaf in jax.tree.leaves(tree):
        shard = nbytes(leaf.sharding.shard_shape(leaf.shape), leaf.dtype)
        for device in leaf.sharding.device_set:
            per_device[device] = per_device.get(device, 0) + shard
    return max(per_device.values(), default=0)


def device_memory(device: jax.Device) -> int | None:
    """Bytes of memory a device offers, where the platform says: the allocator's limit on
    accelerators, the host's memory shared by the local devices on CPU."""
    if device.platform == "cpu":
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages // max(1, len([d for d in jax.local_devices() if d.platform == "cpu"]))
    try:
        stats = device.memory_stats()
    except Exception:  # a platform without statistics (or a compile-only device)
        return None
    return None if not stats else stats.get("bytes_limit")


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Bytes per device of the weights and of the decode state."""

    weights: int
    state: int
    cache: int  # of `state`: the keys and values, which grow with the positions
    slots: int  # rows of the decode state (max_batch rounded to the data axis)
    max_seq_len: int

    @property
    def resident(self) -> int:
        return self.weights + self.state


def footprint(shape: RunShape, mesh: Mesh, params: dict | None = None) -> Footprint:
    """`params`: the run's `stored_params`, where the caller has them already."""
    platform = mesh.devices.flat[0].platform
    run = shape.resolved(platform)
    if params is None:
        params = stored_params(run.config, mesh, run.weights, run.layers, run.int4_group)
    slots = sharding.padded_batch(mesh, run.max_batch)
    state = state_shapes(run.config, mesh, slots, run.max_seq_len)
    return Footprint(bytes_per_device(params), bytes_per_device(state),
                     bytes_per_device((state.cache.k, state.cache.v)), slots, run.max_seq_len)


def check_fits(shape: RunShape, mesh: Mesh, memory_fraction: float = 0.9,
               name: str = "the model") -> Footprint:
    """Raises GrokError, naming what would fit, when the weights and the decode state
    alone exceed `memory_fraction` of a device's memory; silent where the platform does
    not say how much it has. For run.py and the server, before any weight is read."""
    fp = footprint(shape, mesh)
    memory = device_memory(mesh.devices.flat[0])
    if memory is None:
        return fp
    usable = int(memory * memory_fraction)
    if fp.resident <= usable:
        return fp
    run = shape.resolved(mesh.devices.flat[0].platform)
    data, model_ways = mesh.shape[sharding.DATA], mesh.shape[sharding.MODEL]
    where = f"on this {data}x{model_ways} mesh"
    if fp.weights > usable:
        devices = data * model_ways
        need = devices * math.ceil(fp.weights / (usable * 0.8))  # room left for the cache
        advice = (f"use at least {need} devices" if need > devices else "use more devices")
        if run.weights == "int8":
            try:
                int4 = footprint(dataclasses.replace(run, weights="int4"), mesh).weights
            except GrokError:  # the 4-bit groups do not fit this mesh's shares
                int4 = usable
            if int4 <= usable * 0.8:
                advice += f", or --weights int4 ({gib(int4)} of weights per device)"
        raise GrokError(
            f"{name} with {run.weights} weights needs {gib(fp.weights)} of weights per "
            f"device {where}, "
            f"more than {memory_fraction:.0%} of the {gib(memory)} each device has "
            f"({gib(usable)}): {advice}")
    per_slot = fp.state / fp.slots
    slots = int((usable - fp.weights) // per_slot) // data * data
    advice = (f"at most {slots} slots (--max-batch) fit at {run.max_seq_len} positions"
              if slots >= 1 else "use more devices or a shorter --max-seq-len")
    raise GrokError(
        f"{name} with {run.weights} weights needs {gib(fp.weights)} of weights and "
        f"{gib(fp.state)} of "
        f"decode state ({fp.slots} slots x {run.max_seq_len} positions) per device {where}, "
        f"more than {memory_fraction:.0%} of the {gib(memory)} each device has: {advice}")
