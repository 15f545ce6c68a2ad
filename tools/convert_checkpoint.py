"""Copies a checkpoint in the released format, optionally keeping only its first N layers,
or with its expert weights in 4 bits.

    python tools/convert_checkpoint.py SRC DST [--config grok-1] [--layers N]
                                       [--weights int4 [--int4-group 64]]

`--layers N` makes a smaller model of full width (the embedding, the final norm and layers
0..N-1), which is how benchmarks get realistic tensors without 318 GB of disk.
`--weights int4` writes the expert weights requantised to 4 bits (grok-1: about 160 GB
instead of 318) in the project's 4-bit format (README, "4-bit experts"); the other tensors
stay as the release stores them. Loading it needs no conversion: `--weights int4`.

SRC holds `ckpt-0` (or is it); every source file's header is checked against the config
before anything is written. DST receives `ckpt-0/` (the kept tensors, renumbered in the
release's order for the smaller tree) and `config.json` with `num_layers`. The format does
not depend on the mesh (one whole tensor per file, and any mesh reads any scale grouping),
so the copy serves every mesh. Tensors are streamed one at a time from their memory maps
into the new files: memory stays at a write buffer, whatever the checkpoint's size.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from grok import checkpoint
from grok.cli import ArgumentParser
from grok.config import resolve_config
from grok.quant import DEFAULT_INT4_GROUP, check_int4_group

_LAYER = re.compile(r"transformer/decoder_layer_(\d+)/")


def convert(source: Path, destination: Path, config, layers: int | None = None,
            int4_group: int | None = None) -> dict:
    """Writes the first `layers` layers (default: all) of the checkpoint at `source` to
    `destination`, with 4-bit experts in groups of `int4_group` rows if given; returns a
    summary (tensors, bytes written, config of the copy)."""
    config = resolve_config(config)
    layers = config.num_layers if layers is None else layers
    if isinstance(layers, bool) or not isinstance(layers, int) \
            or not 1 <= layers <= config.num_layers:
        raise ValueError(f"--layers must be between 1 and the source's num_layers="
                         f"{config.num_layers}, got {layers!r}")
    if destination.resolve() in (source.resolve(), source.resolve().parent):
        raise ValueError(f"{destination} is the source checkpoint's own folder; write the copy "
                         "elsewhere")
    target = destination / checkpoint.CKPT_DIR
    if target.is_dir() and any(target.iterdir()):
        raise ValueError(f"{target} is not empty; write the copy into a new folder")
    params = checkpoint.read_checkpoint(source, config)  # validates every source file
    kept = {module: bundle for module, bundle in params.items()
            if (m := _LAYER.match(module)) is None or int(m.group(1)) < layers}
    if int4_group is not None:
        check_int4_group(int4_group)
    checkpoint.write_checkpoint(destination, kept, int4_group=int4_group)
    dataclasses.replace(config, num_layers=layers).to_json(destination / "config.json")
    written = sum(p.stat().st_size for p in target.iterdir())
    return {"tensors": len(checkpoint.flatten(kept)[0]), "bytes": written,
            "num_layers": layers}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder holding ckpt-0, or ckpt-0 itself")
    parser.add_argument("destination", type=Path, help="new folder for the copy")
    parser.add_argument("--config", default="grok-1",
                        help="the source's config: preset or JSON path (default: %(default)s)")
    parser.add_argument("--layers", type=int, help="keep layers 0..N-1 (default: all)")
    parser.add_argument("--weights", choices=("int8", "int4"), default="int8",
                        help="int4: expert weights requantised to 4 bits (default: "
                             "%(default)s, as the source)")
    parser.add_argument("--int4-group", type=int, default=DEFAULT_INT4_GROUP, metavar="ROWS",
                        help="with --weights int4: rows per 4-bit scale (default: "
                             "%(default)s)")
    start = time.perf_counter()
    try:
        args = parser.parse_args(argv)
        summary = convert(args.source, args.destination, args.config, args.layers,
                          args.int4_group if args.weights == "int4" else None)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(f"wrote {summary['tensors']} tensors ({summary['bytes'] / 1e9:.2f} GB, "
          f"{summary['num_layers']} layers) to {args.destination} in {seconds:.1f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
