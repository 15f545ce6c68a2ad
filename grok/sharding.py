"""Device mesh and parameter placement, as the release shards (the table is `grok.params`).

The mesh has two axes: `data` (batch, and the release's second split of weights) and
`model` (tensor parallelism). XLA's SPMD partitioner keeps the computation correct on any
placement, so every mesh gives the same numbers; placements only decide where bytes live.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from grok.config import GrokConfig
from grok.errors import GrokError
from grok.params import DATA, MODEL, spec_for

TOKENS_SPEC = P(DATA, None)  # [B, T]
REPLICATED_SPEC = P()
RESIDUAL_SPEC = P(DATA, None, None)  # [B, T, D]: rows split, width whole, as the release
LAYERS_KV_SPEC = P(None, DATA, MODEL, None, None)  # [L, B, K, S, C]: all layers' keys


def make_mesh(mesh_shape: tuple[int, int] | None = None, devices=None) -> Mesh:
    """A (data, model) mesh over the first data*model devices (default: all on `model`).

    With several processes the default is one row of `data` per process (`jax.devices()`
    lists devices process by process), so that tensor parallelism stays inside a host, and
    the mesh must use every device: a process without devices in it could not take part.
    """
    processes = jax.process_count() if devices is None else 1
    devices = list(jax.devices() if devices is None else devices)
    if mesh_shape is None:
        mesh_shape = (processes, len(devices) // processes)
    if (not isinstance(mesh_shape, (tuple, list)) or len(mesh_shape) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                       for n in mesh_shape)):
        raise GrokError(f"mesh_shape must be two positive integers (data, model), "
                         f"got {mesh_shape!r}")
    data, model = mesh_shape
    if data * model > len(devices):
        available = "1 is" if len(devices) == 1 else f"{len(devices)} are"
        hint = ""
        if devices and all(d.platform == "cpu" for d in devices):
            hint = (f"; on CPU, XLA_FLAGS=--xla_force_host_platform_device_count="
                    f"{data * model} (set before JAX starts) simulates {data * model}")
        raise GrokError(f"mesh {data}x{model} needs {data * model} devices, but only "
                        f"{available} available{hint}")
    if processes > 1 and data * model != len(devices):
        raise GrokError(f"mesh {data}x{model} uses {data * model} devices, but a run of "
                         f"{processes} processes must use all {len(devices)}")
    grid = np.array(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, (DATA, MODEL))


def check_mesh(config: GrokConfig, mesh: Mesh) -> None:
    """Raises ValueError where the model axis would cut through heads."""
    model = mesh.shape[MODEL]
    for name in ("num_q_heads", "num_kv_heads"):
        heads = getattr(config, name)
        if heads % model:
            raise GrokError(f"{name}={heads} cannot be split over a model axis of {model}: "
                             f"use a model axis that divides {heads}")


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def param_sharding(mesh: Mesh, path: str, kind: str, shape) -> NamedSharding:
    """Placement of one stored array of parameter `path`.

    `kind` is "value" for float parameters, "weight" for quantised values, "scales" for
    their scales [..., G, N]: those follow the weight, except that the K-axis split is
    dropped where it does not divide G (a shard then holds every group, which costs little:
    scales are small). The placement itself is the parameter table's (`grok.params`).
    """
    spec = spec_for(path)
    if len(spec) != len(shape):
        raise ValueError(f"parameter {path!r}: rule {spec} is for rank {len(spec)}, "
                         f"the array has shape {list(shape)}")
    if kind == "scales" and shape[-2] % _axis_size(mesh, spec[-2]):
        spec = P(*spec[:-2], None, spec[-1])
    for dim, (size, axes) in enumerate(zip(shape, spec, strict=True)):
        ways = _axis_size(mesh, axes)
        if size % ways:
            raise GrokError(f"parameter {path!r} ({kind}): dimension {dim} of size {size} "
                             f"cannot be split {ways} ways over mesh axes {axes}")
    return NamedSharding(mesh, spec)


def k_last(target: NamedSharding, ndim: int) -> NamedSharding:
    """The placement of an array's [..., N, K] form (a 4-bit weight, `quant`) from that of
    its logical [..., K, N] one: the last two axes' splits swapped."""
    spec = (*target.spec, *(None,) * (ndim - len(target.spec)))
    return NamedSharding(target.mesh, P(*spec[:-2], spec[-1], spec[-2]))


def put(host, target: jax.sharding.Sharding) -> jax.Array:
    """A global array from a host array that every process holds whole and alike: each
    device takes its slice (`jax.device_put` would check across processes first). The
    slices are copies, so the caller may reuse `host` afterwards."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, target, lambda index: np.array(host[index]))


def fetch(x: jax.Array) -> np.ndarray:
    """A global array's value on every process: read where this process holds all of it,
    else gathered from the processes that hold its parts."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    return multihost_utils.process_allgather(x, tiled=True)


def padded_batch(mesh: Mesh, batch_size: int) -> int:
    """The batch rounded up to a multiple of the data axis (rows are split over it)."""
    data = mesh.shape[DATA]
    return -(-batch_size // data) * data


def constrain(x, mesh: Mesh | None, spec: P):
    """Pins an activation's placement (no-op without a mesh), so that XLA does not carry
    a weight's split into the residual stream and reshuffle it at every layer."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
