"""What the project knows about each parameter, in one table.

Every parameter of Grok-1 is one of seven kinds. A kind's row says how to recognise it by
its release name, its logical shape (letters of `grok.model`'s glossary; HC is heads times
head width, K heads for keys and values), how the release shards it over the (data, model)
mesh, how the release groups its 8-bit scales, whether it is a stack of experts, and how
each weight mode holds it on the devices. Sharding, quantisation, loading, the converter
and the plan read this table; nothing else matches parameter names.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from types import MappingProxyType

from jax.sharding import PartitionSpec as P

from grok.errors import GrokError
from grok.layers import is_stacked

DATA, MODEL = "data", "model"  # the mesh's axes, named by the specs below

# How a weight mode holds a parameter on the devices:
#   "float32": as loaded (float32 norms and router, which the release computes in float32);
#   "bf16": the exact bf16 values, in the platform's float dtype (`quant.storage_dtype`);
#   "int8": the release's int8 values and bf16 scales;
#   "int4": 4-bit values and bf16 scales requantised from the int8 ones (`grok.quant`).
STORAGE_FORMS = ("float32", "bf16", "int8", "int4")
WEIGHT_MODES = ("int8", "int4", "dequantized")


def _storage(**forms: str) -> Mapping[str, str]:
    assert set(forms) == set(WEIGHT_MODES) and set(forms.values()) <= set(STORAGE_FORMS)
    return MappingProxyType(forms)


_AS_LOADED = _storage(int8="float32", int4="float32", dequantized="float32")
_BF16 = _storage(int8="bf16", int4="bf16", dequantized="bf16")
_8BIT = _storage(int8="int8", int4="int8", dequantized="bf16")
_EXPERT = _storage(int8="int8", int4="int4", dequantized="bf16")


@dataclasses.dataclass(frozen=True)
class ParamKind:
    name: str
    pattern: str  # searched in "module/path/param", per-layer or stacked alike
    shape: tuple[str, ...]  # logical axes, without a stacked layer axis
    spec: P  # the release's placement of the logical array
    release_groups: int | None  # 8-bit scale groups along K (axis -2); None: stored as float
    expert_stack: bool  # axis 0 is the expert axis E
    storage: Mapping[str, str]  # weight mode -> storage form


# The release's placement (SPEC.md section 4): projections into the model width split K
# over data and N over model, projections out of it the reverse; the expert axis stays
# whole. Its 8-bit groups: 8 along K for the two tensors it shards along K, else 1.
PARAM_KINDS: tuple[ParamKind, ...] = (
    ParamKind("embedding", r"in_out_embed/embeddings$", ("V", "D"),
              P(None, (DATA, MODEL)), None, False, _BF16),
    ParamKind("attention in", r"multi_head_attention/(query|key|value)/w$", ("D", "HC"),
              P(DATA, MODEL), 1, False, _8BIT),
    ParamKind("attention out", r"multi_head_attention/linear/w$", ("HC", "D"),
              P(MODEL, DATA), 8, False, _8BIT),
    ParamKind("router", r"router/w$", ("D", "E"), P(DATA, None), None, False, _AS_LOADED),
    ParamKind("expert in", r"moe/(linear|linear_v)/w$", ("E", "D", "F"),
              P(None, DATA, MODEL), 1, True, _EXPERT),
    ParamKind("expert out", r"moe/linear_1/w$", ("E", "F", "D"),
              P(None, MODEL, DATA), 8, True, _EXPERT),
    ParamKind("norm", r"rms_norm(_\d+)?/scale$", ("D",), P(None), None, False, _AS_LOADED),
)


def kind_of(path: str) -> ParamKind:
    """The kind of parameter `path` ("module/path/param"); an unknown name is an error."""
    for kind in PARAM_KINDS:
        if re.search(kind.pattern, path):
            return kind
    raise GrokError(f"unknown parameter {path[:200]!r}: not one of Grok-1's kinds "
                    f"({', '.join(k.name for k in PARAM_KINDS)})")


def spec_for(path: str) -> P:
    """The placement of parameter `path`; a stacked layer parameter [L, ...] keeps its
    layer axis whole (a scan reads each layer on every device)."""
    spec = kind_of(path).spec
    return P(None, *spec) if is_stacked(path) else spec


def release_groups(path: str, shape) -> int | None:
    """The 8-bit scale groups the release uses for parameter `path` of logical `shape`
    (1 where its K does not divide into the release's groups), or None for a float one."""
    groups = kind_of(path).release_groups
    if groups is None:
        return None
    return groups if shape[-2] % groups == 0 else 1


def expert_axis(path: str) -> int | None:
    """The expert axis of an expert stack (1 behind a stacked layer axis), else None."""
    if not kind_of(path).expert_stack:
        return None
    return 1 if is_stacked(path) else 0


def storage(path: str, mode: str) -> str:
    """How weight mode `mode` holds parameter `path` (one of STORAGE_FORMS)."""
    if mode not in WEIGHT_MODES:
        raise GrokError(f"weights must be one of {list(WEIGHT_MODES)}, got {mode!r:.40}")
    return kind_of(path).storage[mode]
