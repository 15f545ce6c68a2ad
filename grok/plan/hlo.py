"""Facts about speed read from a compiled program's optimized HLO (`compiled.as_text()`).

Two things decide whether the sharded 8-bit model runs at the speed of its weight reads:
how many collectives each step (and each layer of a scanned layer stack) waits on, and
whether any int8 weight is written back to memory before its matrix product reads it, as
floats (dequantized outside the product's fusion) or as a copy of its bytes (a slice of a
stacked weight). The text is parsed line by line; no XLA API is needed, so these facts can
be checked on any saved program.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
from collections.abc import Iterable, Mapping

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

# Opcodes whose result is no new buffer: a view, a pass-through or a control-flow handle.
# (An async pair's `-done` is the `-start`'s buffer, so it writes nothing new either.)
_NO_WRITE = frozenset({"parameter", "get-tuple-element", "bitcast", "tuple", "while", "call",
                       "conditional", "opt-barrier", "after-all", "add-dependency",
                       "async-update", "partition-id", "replica-id"})

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")
_CALLEES = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation|"
                      r"branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_KIND = re.compile(r"\bkind=(k\w+)")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction: its result arrays and the computations it names."""

    name: str
    opcode: str
    arrays: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, dims) per array of the result
    callees: tuple[tuple[str, str], ...]  # (attribute, computation): ("body", "region_0")
    kind: str  # a fusion's kind (kLoop, kInput, kCustom, ...), else ""

    def called(self, *attributes: str) -> list[str]:
        """Computations named by these attributes (all of them when none are given)."""
        return [name for key, name in self.callees if not attributes or key in attributes]

    def describe(self, computation: str) -> str:
        shapes = ", ".join(f"{dtype}[{','.join(map(str, dims))}]" for dtype, dims in self.arrays)
        kind = f" {self.kind}" if self.kind else ""
        return f"{computation}: %{self.name} = {shapes} {self.opcode}{kind}"


@dataclasses.dataclass(frozen=True)
class Computation:
    name: str
    entry: bool
    instructions: tuple[Instruction, ...]


def parse(hlo_text: str) -> Mapping[str, Computation]:
    """The module's computations by name, in the order the text lists them. Read-only and
    kept for the last few texts: the facts below each ask for it, and a 314B model's program
    is tens of megabytes of text."""
    return _parse(hlo_text)


@functools.lru_cache(maxsize=4)
def _parse(hlo_text: str) -> Mapping[str, Computation]:
    computations: dict[str, Computation] = {}
    current: tuple[str, bool] | None = None
    body: list[Instruction] = []
    for line in hlo_text.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header and not line.startswith("HloModule"):
                current, body = (header.group(2), bool(header.group(1))), []
        elif line.startswith("}"):
            computations[current[0]] = Computation(current[0], current[1], tuple(body))
            current = None
        elif (match := _INSTRUCTION.match(line)) is not None:
            body.append(_instruction(match.group(1), match.group(2)))
    return types.MappingProxyType(computations)


def _instruction(name: str, rest: str) -> Instruction:
    """`rest` is the text after `name =`: a result type, the opcode, operands, attributes."""
    if rest.startswith("("):  # a tuple type, which may nest
        end = _closing(rest, 0)
        type_text, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
        type_text, _, rest = rest.partition(" ")
    opcode = rest.split("(", 1)[0].strip()
    attributes = rest[_closing(rest, rest.find("(")) + 1:] if "(" in rest else ""
    callees = tuple((key, n.strip().lstrip("%")) for key, value in _CALLEES.findall(attributes)
                    for n in value.strip("{}").split(",") if n.strip())
    kind = _KIND.search(attributes)
    return Instruction(name, opcode, _arrays(type_text), callees,
                       kind.group(1) if kind and opcode == "fusion" else "")


def _closing(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at `start` (or the text's end)."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    return len(text) - 1


def _arrays(type_text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    arrays = []
    for dtype, dims in _ARRAY.findall(type_text):
        sizes = [d.strip().removeprefix("<=") for d in dims.split(",") if d.strip()]
        if all(s.isdigit() for s in sizes):
            arrays.append((dtype, tuple(int(s) for s in sizes)))
    return tuple(arrays)


def _entry(computations: Mapping[str, Computation]) -> Computation:
    for computation in computations.values():
        if computation.entry:
            return computation
    raise ValueError("no ENTRY computation in the HLO text")


def _collective(opcode: str) -> str | None:
    """The collective an opcode performs, counting an async pair once (at its start)."""
    base = opcode.removesuffix("-start")
    return base if base in COLLECTIVES else None


def _own_counts(computation: Computation) -> dict[str, int]:
    counts = dict.fromkeys(COLLECTIVES, 0)
    for instruction in computation.instructions:
        if (kind := _collective(instruction.opcode)) is not None:
            counts[kind] += 1
    return counts


def collectives(hlo_text: str, computation: str | None = None) -> dict[str, int]:
    """Collectives in `computation` (default: ENTRY) and everything it calls, each
    instruction counted once: a static count, not times a loop's trip count. Give a loop's
    body (`loop_bodies`) to read what one layer of a scanned stack waits on."""
    computations = parse(hlo_text)
    start = computation if computation is not None else _entry(computations).name
    if start not in computations:
        raise ValueError(f"no computation {start!r} in the HLO text")
    totals = dict.fromkeys(COLLECTIVES, 0)
    for name in _reachable(computations, [start]):
        for kind, n in _own_counts(computations[name]).items():
            totals[kind] += n
    return totals


def collectives_by_computation(hlo_text: str) -> dict[str, dict[str, int]]:
    """Collectives per computation, for those that have any; one inside an async wrapper
    (`async-start`, `calls=`) or a fusion counts for the computation that launches it."""
    computations = parse(hlo_text)
    inner = {name for c in computations.values() for i in c.instructions
             for name in i.called("calls")}
    result = {}
    for name in computations:
        if name in inner:
            continue
        counts = dict.fromkeys(COLLECTIVES, 0)
        for reached in _reachable(computations, [name], follow_control=False):
            for kind, n in _own_counts(computations[reached]).items():
                counts[kind] += n
        if any(counts.values()):
            result[name] = counts
    return result


def _reachable(computations: Mapping[str, Computation], start: list[str],
               follow_control: bool = True, into_loops: bool = True) -> set[str]:
    """`start` and the computations they call: all, or only fused and async-wrapped ones
    (`follow_control` False); `into_loops` False stops at while loops."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        for instruction in computations[name].instructions:
            if instruction.opcode == "while" and not into_loops:
                continue
            todo.extend(instruction.called() if follow_control else instruction.called("calls"))
    return seen


def loop_bodies(hlo_text: str) -> list[str]:
    """Bodies of the outermost while loops (a `lax.scan` over layers compiles to one),
    found from ENTRY through calls and branches but not into other loops' bodies."""
    computations = parse(hlo_text)
    outside = _reachable(computations, [_entry(computations).name], into_loops=False)
    bodies = [body for c in computations.values() if c.name in outside
              for i in c.instructions if i.opcode == "while" for body in i.called("body")]
    return list(dict.fromkeys(bodies))


def materialized_weights(hlo_text: str,
                         weight_shapes: Iterable[tuple[int, ...]]) -> list[str]:
    """Instructions outside fusions that write an array shaped like a quantised weight.

    `weight_shapes` are the per-device shard shapes of the int8 or int4 weights, with or without
    leading stacking axes (layers, experts): a shape matches its trailing slices, and its
    two last axes either way round (a transposed copy), ignoring axes of size 1. A float
    result is a weight dequantized to memory (its product then reads 2 or 4 bytes a
    value instead of 1); an integer one is a copy of the weight's bytes, such as a scanned
    layer's slice of a stacked weight copied before its product reads it. Converting
    inside the product's own fusion (a Triton GEMM) writes nothing and is not reported.
    Activations that happen to share a weight's shape are reported too: read the names.
    """
    targets = _weight_targets(weight_shapes)
    computations = parse(hlo_text)
    fused = {name for c in computations.values() for i in c.instructions
             if i.opcode == "fusion" for name in i.called("calls")}
    found = []
    for name, computation in computations.items():
        if name in fused:
            continue
        for instruction in computation.instructions:
            if instruction.opcode in _NO_WRITE or instruction.opcode.endswith("-done"):
                continue
            if any(_squeeze(dims) in targets for _, dims in instruction.arrays):
                found.append(instruction.describe(name))
    return found


def _squeeze(dims: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in dims if d != 1)


def _weight_targets(weight_shapes: Iterable[tuple[int, ...]]) -> set[tuple[int, ...]]:
    targets = set()
    for shape in weight_shapes:
        shape = tuple(int(d) for d in shape)
        for start in range(len(shape)):
            trailing = _squeeze(shape[start:])
            if len(trailing) >= 2:
                targets.add(trailing)
                targets.add((*trailing[:-2], trailing[-1], trailing[-2]))
    return targets
