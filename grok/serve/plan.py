"""What the device loop does before one scheduler step, and how process 0 tells the others.

In a multi-process run every process holds a share of the model and must run the same
compiled steps on the same slots. Only process 0 hears from clients, so before each step
it broadcasts a `StepPlan` (new requests with their settings, cancellations, stop); every
process applies it to its own scheduler, whose decisions depend on nothing else, and all
of them then step alike.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from grok.engine.request import GenerationSettings, Request
from grok.structured import spec

MIN_PAYLOAD = 256  # bytes; payloads are padded to a power of two at least this size


@dataclasses.dataclass(frozen=True)
class NewRequest:
    """A request to submit; `key` is process 0's name for it, which cancels refer to."""

    key: int
    prompt_ids: tuple[int, ...]
    settings: GenerationSettings

    def request(self, compile_structure) -> Request:
        """The request on a process that did not check it: `compile_structure(spec)`
        compiles its structure (process 0 compiled it already, so it does)."""
        structure = self.settings.structure
        grammar = None if structure is None else compile_structure(structure)
        return Request(self.prompt_ids, self.settings, grammar=grammar)


def _settings_json(settings: GenerationSettings) -> dict:
    raw = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    if settings.structure is not None:
        raw["structure"] = spec.to_json(settings.structure)
    return raw


def _settings(raw: dict) -> GenerationSettings:
    if raw.get("structure") is not None:
        raw = raw | {"structure": spec.from_json(raw["structure"])}
    return GenerationSettings(**raw)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    submits: tuple[NewRequest, ...] = ()
    cancels: tuple[int, ...] = ()
    stop: bool = False

    def encode(self) -> bytes:
        return json.dumps({
            "submits": [[s.key, list(s.prompt_ids), _settings_json(s.settings)]
                        for s in self.submits],
            "cancels": list(self.cancels), "stop": self.stop}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> StepPlan:
        raw = json.loads(data)
        submits = tuple(NewRequest(key, tuple(ids), _settings(settings))
                        for key, ids, settings in raw["submits"])
        return cls(submits, tuple(raw["cancels"]), raw["stop"])


class LocalChannel:
    """A single process: the plan is already everyone's."""

    def share(self, plan: StepPlan | None) -> StepPlan:
        assert plan is not None
        return plan


class BroadcastChannel:
    """Process 0's plan, received by every process. Two collectives per plan: the length
    (a fixed shape), then the bytes padded to a power of two, so that only a handful of
    broadcast shapes ever compile. Must be called by the thread that owns the device."""

    def __init__(self, is_source: bool):
        self.is_source = is_source

    def share(self, plan: StepPlan | None) -> StepPlan:
        from jax.experimental import multihost_utils

        payload = plan.encode() if self.is_source else b""
        length = np.array([len(payload)], np.int32)
        length = int(np.asarray(multihost_utils.broadcast_one_to_all(
            length, is_source=self.is_source))[0])
        size = max(MIN_PAYLOAD, 1 << max(length - 1, 0).bit_length())
        buffer = np.zeros(size, np.uint8)
        buffer[: len(payload)] = np.frombuffer(payload, np.uint8)
        buffer = np.asarray(multihost_utils.broadcast_one_to_all(
            buffer, is_source=self.is_source))
        return plan if self.is_source else StepPlan.decode(buffer[:length].tobytes())
