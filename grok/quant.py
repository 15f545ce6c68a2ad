"""Quantised weights: int8 or int4 values with bf16 scales grouped along the contracting axis.

An 8-bit weight `w[..., K, N]` is stored as `weight` (int8, same shape) and
`scales[..., G, N]` (bf16); group g covers rows g*K/G .. (g+1)*K/G, and the value is
`round_bf16(weight * scale)`. The release uses G = 8 for the two tensors it shards along K
(attention `linear`, expert `linear_1`) and G = 1 elsewhere; any G that divides K works
here, whatever the mesh. 4-bit expert weights are requantised from the exact values of the
8-bit ones, in groups of a fixed number of rows (`requantize4`), and held with the
contracting axis last (`QuantizedWeight4bit`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from grok.errors import GrokError
from grok.params import WEIGHT_MODES, expert_axis, release_groups, storage

INT4 = jnp.int4
INT4_MAX = 7  # symmetric: values -7..7 (int4's -8 unused), so that q and -q both exist
# Rows of the contracting axis per 4-bit scale: measured on the demo model, the release's
# fixtures and a full-vocabulary model (README, "4-bit experts"); 32 and 128 are the others
# tried.
DEFAULT_INT4_GROUP = 64


class QuantizedWeight:
    """Integer values and their bf16 scales; a pytree, so it passes through jit and
    sharding. `QuantizedWeight8bit` is the release's form; `QuantizedWeight4bit` ours."""

    def __init__(self, weight, scales):
        self.weight = weight
        self.scales = scales

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (dequantised) shape; Haiku checks parameters against it."""
        return tuple(self.weight.shape)

    @property
    def groups(self) -> int:
        return self.scales.shape[-2]

    def tree_flatten(self):
        return (self.weight, self.scales), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        return cls(*children)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(weight={_describe(self.weight)}, "
                f"scales={_describe(self.scales)})")


@jax.tree_util.register_pytree_node_class
class QuantizedWeight8bit(QuantizedWeight):
    """The release's int8 weight and bf16 scales."""


@jax.tree_util.register_pytree_node_class
class QuantizedWeight4bit(QuantizedWeight):
    """4-bit values (`int4_storage`: int4, which XLA packs two to a byte, or int8 on CPU)
    and their bf16 scales, both held with the contracting axis last: `weight` [..., N, K],
    `scales` [..., N, G]. Held [..., K, N] and [..., G, N] like 8-bit ones, XLA:GPU
    relaid out the whole [L, E, ...] stacks at every step before scanning the layers
    (`grok-plan`: 6 GiB a decode step for grok-1 on h100x8); held K-last, it copies none."""

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, n, k = self.weight.shape
        return (*lead, k, n)

    @property
    def groups(self) -> int:
        return self.scales.shape[-1]

    @staticmethod
    def held_shapes(shape, group: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes `weight` and `scales` have for a logical [..., K, N] weight in groups
        of `group` rows: [..., N, K] and [..., N, K/group]."""
        *lead, k, n = shape
        return (*lead, n, k), (*lead, n, k // group)

    @classmethod
    def from_values(cls, values, scales) -> QuantizedWeight4bit:
        """From values [..., K, N] and scales [..., G, N] (host arrays), as `requantize4`
        gives them."""
        return cls(*(np.ascontiguousarray(np.swapaxes(a, -1, -2)) for a in (values, scales)))


@jax.tree_util.register_pytree_node_class
class ExpertWeights:
    """A stacked expert weight [E, ...] held as E separate arrays (float or 8-bit).

    XLA:CPU copies a dynamically indexed slice of a stacked weight before the dot that
    reads it (measured: 5x the time of reading the expert in place), so on CPU each expert
    keeps its own buffer and the computation picks one with `lax.switch`. `axis` is where
    the expert axis sits in the logical shape: 0, or 1 behind a stacked layer axis.
    """

    def __init__(self, experts, axis: int = 0):
        self.experts = tuple(experts)
        self.axis = axis

    @property
    def shape(self) -> tuple[int, ...]:
        inner = tuple(self.experts[0].shape)
        return (*inner[:self.axis], len(self.experts), *inner[self.axis:])

    def tree_flatten(self):
        return self.experts, self.axis

    @classmethod
    def tree_unflatten(cls, axis, children):
        return cls(children, axis)

    def __repr__(self) -> str:
        return f"ExpertWeights({len(self.experts)} x {self.experts[0]!r}, axis={self.axis})"


def _describe(x) -> str:
    dtype = getattr(x, "dtype", None)
    shape = getattr(x, "shape", None)
    return f"{dtype}{list(shape)}" if shape is not None else repr(x)


def check_groups(weight_shape, scales_shape, name: str = "weight") -> None:
    """Raises ValueError unless `scales_shape` is a valid grouping of `weight_shape`."""
    weight_shape, scales_shape = tuple(weight_shape), tuple(scales_shape)
    ok = (len(weight_shape) >= 2 and len(scales_shape) == len(weight_shape)
          and scales_shape[:-2] == weight_shape[:-2] and scales_shape[-1] == weight_shape[-1]
          and scales_shape[-2] >= 1 and weight_shape[-2] % scales_shape[-2] == 0)
    if not ok:
        raise GrokError(
            f"{name}: scales of shape {list(scales_shape)} do not group weight of shape "
            f"{list(weight_shape)}; expected [..., G, {weight_shape[-1] if weight_shape else 'N'}]"
            f" with G dividing K={weight_shape[-2] if len(weight_shape) >= 2 else '?'}")


def nbytes(shape, dtype) -> int:
    """Bytes an array takes on a device: int4 packs two values to a byte."""
    count = int(np.prod(shape, dtype=np.int64))
    if np.dtype(dtype) in (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4)):
        return (count + 1) // 2
    return count * np.dtype(dtype).itemsize


def quantize(w, groups: int = 1) -> QuantizedWeight8bit:
    """Symmetric per-(group, column) int8 quantisation of a float weight [..., K, N].

    The scale is rounded to bf16 *before* dividing, so that int8 * scale is as close to `w`
    as the stored bf16 scale allows.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim < 2:
        raise GrokError(f"quantize: expected a weight of rank >= 2, got shape {list(w.shape)}")
    *lead, k, n = w.shape
    if groups < 1 or k % groups:
        raise GrokError(f"quantize: groups={groups} must be >= 1 and divide K={k}")
    q, scales = _round_symmetric(w.reshape(*lead, groups, k // groups, n), 127)
    return QuantizedWeight8bit(q.reshape(w.shape).astype(np.int8), scales)


def _round_symmetric(grouped: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Grouped float32 values [..., G, R, N] (R rows a group) rounded to the nearest
    multiple of their group's scale, within -top..top: (values as floats, bf16 scales
    [..., G, N]). The scale is rounded to bf16 before dividing."""
    amax = np.max(np.abs(grouped), axis=-2)  # [..., G, N]
    scales = (amax / np.float32(top)).astype(jnp.bfloat16)
    wide = scales.astype(np.float32)
    safe = np.where(wide > 0, wide, np.float32(1))
    return np.clip(np.rint(grouped / safe[..., None, :]), -top, top), scales


def dequantize(w, dtype=jnp.bfloat16):
    """The weight's values in `dtype`; for quantised weights, `round_dtype(q * scale)`.

    An int8 or int4 value times a bf16 scale is exact in float32 (8 + 8 significant bits at
    most), so computing the product in float32 and rounding once equals the release's bf16
    multiply.
    """
    if not isinstance(w, QuantizedWeight):
        return jnp.asarray(w).astype(dtype)
    if isinstance(w, QuantizedWeight4bit):  # [..., N, K], grouped along K
        *lead, n, k = w.weight.shape
        g = w.groups
        grouped = w.weight.astype(jnp.float32).reshape(*lead, n, g, k // g)
        values = grouped * w.scales.astype(jnp.float32)[..., None]
        return jnp.swapaxes(values.reshape(w.weight.shape).astype(dtype), -1, -2)
    weight, scales = w.weight, w.scales
    *lead, k, n = weight.shape
    g = scales.shape[-2]
    grouped = weight.astype(jnp.float32).reshape(*lead, g, k // g, n)
    values = grouped * scales.astype(jnp.float32)[..., :, None, :]
    return values.reshape(weight.shape).astype(dtype)


def check_int4_group(group: int, rows: int | None = None, where: str = "a weight") -> int:
    """`group` if it is a positive number of rows dividing `rows` (the contracting axis of
    `where`, or a device's share of it), else an error naming both."""
    name = "int4_group"
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise GrokError(f"{name} must be a positive integer, got {group!r:.40}")
    if rows is not None and rows % group:
        fits = 1  # a power of two: the widths of a model share those
        while fits * 2 <= group and rows % (fits * 2) == 0:
            fits *= 2
        raise GrokError(f"{name}={group} does not divide the {rows} rows of the contracting "
                        f"axis of {where}; use a group size that does, such as {fits}")
    return group


def int8_values(weight: np.ndarray, scales: np.ndarray, first_row: int = 0,
                rows: int | None = None) -> np.ndarray:
    """The exact float32 values of rows `first_row ..` of an 8-bit weight [..., K, N] of
    `rows` rows in all (default: this block is the whole weight), from the block's int8
    values and the whole weight's scales [..., G, N] (over the block's other axes)."""
    block = weight.shape[-2]
    rows = block if rows is None else rows
    groups = scales.shape[-2]
    check_groups((*weight.shape[:-2], rows, weight.shape[-1]), scales.shape, "8-bit weight")
    group_of_row = (first_row + np.arange(block)) // (rows // groups)
    per_row = np.take(np.asarray(scales, np.float32), group_of_row, axis=-2)
    return np.asarray(weight, np.float32) * per_row


def requantize4(values: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest 4-bit form of float32 `values` [..., K, N] in groups of
    `group` rows: (int4 [..., K, N], bf16 scales [..., K/group, N]).

    As `quantize`, the scale is rounded to bf16 before dividing. Blocks of whole groups
    give the blocks of the whole tensor's result, so each device's slice can be converted
    on its own (`grok.checkpoint.loader`).
    """
    *lead, k, n = values.shape
    check_int4_group(group, k, f"a weight of shape {list(values.shape)}")
    q, scales = _round_symmetric(values.reshape(*lead, k // group, group, n), INT4_MAX)
    return q.reshape(values.shape).astype(INT4), scales


def quantize4(w: QuantizedWeight8bit, group: int) -> QuantizedWeight4bit:
    """The 4-bit form of a whole 8-bit weight (host arrays)."""
    values = int8_values(np.asarray(w.weight), np.asarray(w.scales))
    return QuantizedWeight4bit.from_values(*requantize4(values, group))


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedWeight)


def map_params(fn, params: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Applies `fn(path, value)` to each parameter of a Haiku tree; quantised weights are
    leaves."""
    return {module: {name: fn(f"{module}/{name}", value) for name, value in bundle.items()}
            for module, bundle in params.items()}


def quantize_params(params):
    """Stores every parameter the release keeps in 8 bits as it does; others are untouched."""
    def convert(path, value):
        groups = release_groups(path, value.shape)
        if groups is None or is_quantized(value):
            return value
        return quantize(value, groups)
    return map_params(convert, params)


def default_weight_mode(platform: str) -> str:
    """int8 saves accelerator memory and their GEMMs fuse the conversion; XLA:CPU does not
    fuse it (every call would write the whole float weight), so CPU keeps floats."""
    return "dequantized" if platform == "cpu" else "int8"


def int4_storage(platform: str):
    """The device dtype of 4-bit values: int4 on accelerators; int8 on CPU, where jax
    0.10.2's compiled programs expect int4 arguments packed while its CPU buffers are not
    (an ahead-of-time compiled step rejects them), which costs CPU a byte a value."""
    return jnp.int8 if platform == "cpu" else INT4


def storage_dtype(platform: str):
    """Float dtype for dequantised weights: float32 holding the exact bf16 values on CPU,
    where XLA upcasts bf16 dot operands on every call; bf16 elsewhere."""
    return jnp.float32 if platform == "cpu" else jnp.bfloat16


def _to_float(path: str, value, mode: str) -> bool:
    """Whether `store_params` turns `value` into its bf16 values (once, at load)."""
    form = storage(path, mode)
    if form == "int4" and not isinstance(value, QuantizedWeight4bit):
        raise GrokError(f"parameter {path}: int4 weights are made while loading "
                        f"(`load_checkpoint(int4_group=...)`), got {value!r:.200}")
    if form == "int8" and isinstance(value, QuantizedWeight4bit):
        raise GrokError(f"parameter {path} is 4-bit: load it with weights int4 (or "
                        f"dequantized), not {mode}")
    return form == "bf16"


def _without_axis(sharding: jax.sharding.NamedSharding, ndim: int, axis: int):
    spec = (*sharding.spec, *(None,) * (ndim - len(sharding.spec)))
    return jax.sharding.NamedSharding(sharding.mesh,
                                      jax.sharding.PartitionSpec(*spec[:axis], *spec[axis + 1:]))


def stored_form(path: str, value, mode: str, float_dtype, split_experts: bool = False):
    """What `store_params` makes of parameter `value` (arrays or `jax.ShapeDtypeStruct`s
    with NamedShardings), as ShapeDtypeStructs with their shardings: the bytes a load
    places, known before any is read."""
    def abstract(a):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)

    if _to_float(path, value, mode):
        placed = value.weight if is_quantized(value) else value
        value = jax.ShapeDtypeStruct(placed.shape, float_dtype, sharding=placed.sharding)
    else:
        value = jax.tree.map(abstract, value)
    axis = expert_axis(path) if split_experts else None
    if axis is None:
        return value
    return ExpertWeights((jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape[:axis] + a.shape[axis + 1:], a.dtype,
        sharding=_without_axis(a.sharding, len(a.shape), axis)), value)
        for _ in range(value.shape[axis])), axis)


@functools.cache
def _converter(to_float: bool, float_dtype, axis: int | None, shardings: tuple, treedef):
    """One compiled conversion per kind and placement, shared by every layer's tensor."""
    def convert(w):
        if to_float:
            w = dequantize(w, jnp.bfloat16).astype(float_dtype)
        if axis is not None:
            w = ExpertWeights((jax.tree.map(lambda a, i=i: jnp.take(a, i, axis=axis), w)
                               for i in range(w.shape[axis])), axis)
        return w
    return jax.jit(convert, out_shardings=jax.tree.unflatten(treedef, shardings))


def store_params(params, mode: str, float_dtype, split_experts: bool = False):
    """Converts loaded parameters for inference, as the parameter table's storage says.

    The embedding table becomes its bf16 values (the release casts it to bf16 at every
    use); with `mode="dequantized"` the 8-bit weights become their exact bf16 values too;
    with `mode="int4"` the expert weights are expected in 4 bits already (the loader
    requantises them slice by slice).
    Both are then held in `float_dtype`. Norms and the router stay float32. With
    `split_experts`, stacked expert weights become `ExpertWeights`. Every result is placed
    as `stored_form` says.
    """
    if mode not in WEIGHT_MODES:
        raise GrokError(f"weights must be one of {list(WEIGHT_MODES)}, got {mode!r:.40}")

    def convert(path, value):
        to_float = _to_float(path, value, mode)
        axis = expert_axis(path) if split_experts else None
        if not to_float and axis is None:
            return value
        target = stored_form(path, value, mode, float_dtype, split_experts)
        shardings, treedef = jax.tree.flatten(jax.tree.map(lambda a: a.sharding, target))
        return _converter(to_float, float_dtype, axis, tuple(shardings), treedef)(value)
    return map_params(convert, params)


def qdot(spec: str, x, w):
    """`einsum(spec, x, w)` the release's way: operands in the weight's compute dtype (bf16
    for quantised weights), float32 accumulation, one rounding to the activations' dtype."""
    if is_quantized(w):
        w = dequantize(w, x.dtype)
    out = jnp.einsum(spec, x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    return out.astype(x.dtype)
