"""8-bit weights: int8 values with bf16 scales grouped along the contracting axis.

A weight `w[..., K, N]` is stored as `weight` (int8, same shape) and `scales[..., G, N]`
(bf16); group g covers rows g*K/G .. (g+1)*K/G. The release uses G = 8 for the two tensors
it shards along K (attention `linear`, expert `linear_1`) and G = 1 elsewhere; any G that
divides K works here, whatever the mesh.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grok.errors import GrokError
from grok.layers import is_stacked


@jax.tree_util.register_pytree_node_class
class QuantizedWeight8bit:
    """An int8 weight and its bf16 scales; a pytree, so it passes through jit and sharding."""

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
        return (f"QuantizedWeight8bit(weight={_describe(self.weight)}, "
                f"scales={_describe(self.scales)})")


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
    grouped = w.reshape(*lead, groups, k // groups, n)
    amax = np.max(np.abs(grouped), axis=-2)  # [..., G, N]
    scales = (amax / 127.0).astype(jnp.bfloat16)
    safe = np.where(scales.astype(np.float32) > 0, scales.astype(np.float32), 1.0)
    q = np.clip(np.rint(grouped / safe[..., None, :]), -127, 127).astype(np.int8)
    return QuantizedWeight8bit(q.reshape(w.shape), scales)


def dequantize(w, dtype=jnp.bfloat16):
    """The weight's values in `dtype`; for 8-bit weights, `round_dtype(int8 * scale)`.

    int8 times a bf16 scale is exact in float32 (8 + 8 significant bits), so computing the
    product in float32 and rounding once equals the release's bf16 multiply.
    """
    if not isinstance(w, QuantizedWeight8bit):
        return jnp.asarray(w).astype(dtype)
    weight, scales = w.weight, w.scales
    *lead, k, n = weight.shape
    g = scales.shape[-2]
    grouped = weight.astype(jnp.float32).reshape(*lead, g, k // g, n)
    values = grouped * scales.astype(jnp.float32)[..., :, None, :]
    return values.reshape(weight.shape).astype(dtype)


# Parameters the release stores as 8-bit, with the scale groups it uses: 8 along K for the
# two tensors it shards along K (when K allows it), 1 for the others. Matched against the
# parameter's "module/path/name"; anything unmatched stays a float array.
_RELEASE_8BIT: tuple[tuple[str, int], ...] = (
    (r"multi_head_attention/(query|key|value)/w$", 1),
    (r"multi_head_attention/linear/w$", 8),
    (r"moe/(linear|linear_v)/w$", 1),
    (r"moe/linear_1/w$", 8),
)


def release_groups(path: str, shape) -> int | None:
    """Scale groups the release uses for parameter `path`, or None if it is stored as float."""
    for pattern, groups in _RELEASE_8BIT:
        if re.search(pattern, path):
            return groups if shape[-2] % groups == 0 else 1
    return None


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedWeight8bit)


def map_params(fn, params: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Applies `fn(path, value)` to each parameter of a Haiku tree; 8-bit weights are leaves."""
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


WEIGHT_MODES = ("int8", "dequantized")


def default_weight_mode(platform: str) -> str:
    """int8 saves accelerator memory and their GEMMs fuse the conversion; XLA:CPU does not
    fuse it (every call would write the whole float weight), so CPU keeps floats."""
    return "dequantized" if platform == "cpu" else "int8"


def storage_dtype(platform: str):
    """Float dtype for dequantised weights: float32 holding the exact bf16 values on CPU,
    where XLA upcasts bf16 dot operands on every call; bf16 elsewhere."""
    return jnp.float32 if platform == "cpu" else jnp.bfloat16


def _to_float(path: str, value, mode: str) -> bool:
    return (is_quantized(value) and mode == "dequantized") \
        or path.endswith("in_out_embed/embeddings")


def _expert_axis(path: str) -> int | None:
    """The expert axis of a stacked expert weight (1 behind a stacked layer axis)."""
    if not re.search(r"/moe/linear(_v|_1)?/w$", path):
        return None
    return 1 if is_stacked(path) else 0


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
    axis = _expert_axis(path) if split_experts else None
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
    """Converts loaded parameters for inference, same numbers either way.

    The embedding table becomes its bf16 values (the release casts it to bf16 at every
    use); with `mode="dequantized"` the 8-bit weights become their exact bf16 values too.
    Both are then held in `float_dtype`. Norms and the router stay float32. With
    `split_experts`, stacked expert weights become `ExpertWeights`. Every result is placed
    as `stored_form` says.
    """
    if mode not in WEIGHT_MODES:
        raise GrokError(f"weights must be one of {WEIGHT_MODES}, got {mode!r}")

    def convert(path, value):
        to_float = _to_float(path, value, mode)
        axis = _expert_axis(path) if split_experts else None
        if not to_float and axis is None:
            return value
        target = stored_form(path, value, mode, float_dtype, split_experts)
        shardings, treedef = jax.tree.flatten(jax.tree.map(lambda a: a.sharding, target))
        return _converter(to_float, float_dtype, axis, tuple(shardings), treedef)(value)
    return map_params(convert, params)


def qdot(spec: str, x, w):
    """`einsum(spec, x, w)` the release's way: operands in the weight's compute dtype (bf16
    for 8-bit weights), float32 accumulation, one rounding to the activations' dtype."""
    if is_quantized(w):
        w = dequantize(w, x.dtype)
    out = jnp.einsum(spec, x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    return out.astype(x.dtype)
