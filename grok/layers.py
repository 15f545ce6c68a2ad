"""How the decoder layers run: one compiled body scanned over stacked weights, or unrolled.

`scan` holds each per-layer parameter as one array with a leading layer axis
(`transformer/decoder_layer/...`, [L, ...]) and runs one compiled layer body L times, so
compile time does not grow with depth: what makes the 64-layer model ready in minutes.
`unrolled` keeps the release's tree (`transformer/decoder_layer_{i}/...`), one buffer per
layer, and writes every layer into the program. XLA:CPU copies the slice of a stacked
weight that a dot reads (measured: a 4-layer scan 3.9x slower at batch 1 than unrolled
layers), so CPU, where models are small, unrolls; accelerators scan.

Checkpoints always keep the release's per-layer names and files; the loader stacks them.
"""

from __future__ import annotations

import re

import numpy as np

from grok.errors import GrokError

LAYER_MODES = ("scan", "unrolled")

_RELEASE_LAYER = re.compile(r"^transformer/decoder_layer_(\d+)/(.+)$")
STACKED_PREFIX = "transformer/decoder_layer/"
# The experts' weights [L, E, ...] stay outside the scanned body, which reads each chosen
# expert straight from the stack: were they the body's own parameters, the scan would
# slice out all E experts of a layer (a copy) before choosing among them.
EXPERTS_PREFIX = "transformer/moe/"


def default_layer_mode(platform: str) -> str:
    return "unrolled" if platform == "cpu" else "scan"


def check_layer_mode(mode: str) -> str:
    if mode not in LAYER_MODES:
        raise GrokError(f"layers must be one of {list(LAYER_MODES)}, got {mode!r:.40}")
    return mode


def split_release_path(path: str) -> tuple[str, int] | None:
    """("transformer/decoder_layer/rest", i) for the release's per-layer path
    "transformer/decoder_layer_{i}/rest"; None for a parameter outside the layers."""
    match = _RELEASE_LAYER.match(path)
    if match is None:
        return None
    rest = match.group(2)
    if rest.startswith("moe/"):
        return EXPERTS_PREFIX + rest.removeprefix("moe/"), int(match.group(1))
    return STACKED_PREFIX + rest, int(match.group(1))


def release_path(stacked: str, layer: int) -> str:
    """The release's path of layer `layer` of a stacked parameter (`split_release_path`'s
    inverse)."""
    if stacked.startswith(EXPERTS_PREFIX):
        return f"transformer/decoder_layer_{layer}/moe/{stacked[len(EXPERTS_PREFIX):]}"
    return f"transformer/decoder_layer_{layer}/{stacked[len(STACKED_PREFIX):]}"


def is_stacked(path: str) -> bool:
    """Whether `path` names a stacked [L, ...] parameter of the `scan` tree."""
    return path.startswith((STACKED_PREFIX, EXPERTS_PREFIX))


def stack_params(release: dict, num_layers: int) -> dict:
    """The `scan` tree of a release-named tree of host arrays (8-bit weights stack part by
    part). For tests and tools; `Grok.load` stacks while it reads, without this copy."""
    import jax  # the package's other users of this module need no JAX

    stacked: dict = {}
    layers: dict[str, dict[int, dict]] = {}
    for module, bundle in release.items():
        split = split_release_path(module + "/")
        if split is None:
            stacked[module] = dict(bundle)
        else:
            layers.setdefault(split[0].rstrip("/"), {})[split[1]] = bundle
    for module, per_layer in layers.items():
        if sorted(per_layer) != list(range(num_layers)):
            raise GrokError(f"{module}: expected layers 0..{num_layers - 1}, found "
                            f"{sorted(per_layer)[:8]}")
        bundles = [per_layer[i] for i in range(num_layers)]
        stacked[module] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                       *bundles)
    return stacked


def unstack_params(stacked: dict, num_layers: int) -> dict:
    """The release-named tree of a `scan` tree (layer i of each stacked array)."""
    import jax

    release: dict = {}
    for module, bundle in stacked.items():
        if not is_stacked(module + "/"):
            release[module] = dict(bundle)
            continue
        for i in range(num_layers):
            release[release_path(module + "/", i).rstrip("/")] = jax.tree.map(
                lambda x, i=i: x[i], bundle)
    return release
