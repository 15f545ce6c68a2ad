"""What a prompt chunk costs the decoding requests: a decode step, a prefill step of one
chunk alone, and the two as one step (`Engine.prefill_and_generate`), timed alternately in
one process.

The chunk continues a long prompt deep into its slot (attending up to --position plus a
chunk), as the long-arrival scenario of serve_bench.py has it, while --rows requests
decode. Figures are medians over --rounds rounds after one that compiles.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DEFAULT_CONFIG = HERE / "configs" / "cpu-bench-4k.json"


def measure(grok, rows: int, chunk: int, position: int, rounds: int) -> dict:
    from grok.engine.engine import PrefillRow
    from grok.engine.request import GenerationSettings

    cfg = grok.config
    # The chunk moves on twice a round (alone, and with a decode step).
    engine = grok.engine(rows + 1, position + 2 * chunk * (rounds + 1) + 1,
                         prefill_chunk=chunk)
    rng = np.random.default_rng(0)
    settings = GenerationSettings(max_new_tokens=4 * rounds + 4, temperature=0)
    running = [engine.make_request(rng.integers(3, cfg.vocab_size, 32).tolist(), settings)
               for _ in range(rows)]
    long = engine.make_request(rng.integers(3, cfg.vocab_size, engine.max_seq_len - 1).tolist(),
                               GenerationSettings(max_new_tokens=1, temperature=0))
    state = engine.init_state()
    state, _, _ = engine.prefill([PrefillRow(r, i, 0, 32) for i, r in enumerate(running)],
                                 state)
    active = engine.put_active(np.arange(rows + 1) < rows)
    decode_rows = engine.rows_for(rows)
    filled, start = 33, position
    times: dict[str, list[float]] = {"decode": [], "chunk alone": [], "decode with chunk": []}
    for round_ in range(rounds + 1):
        for kind in times:
            part = PrefillRow(long, rows, start, start + chunk)
            began = time.perf_counter()
            if kind == "decode":
                state, _ = engine.generate(state, active, decode_rows, filled)
            elif kind == "chunk alone":
                state, _, _ = engine.prefill([part], state)
            else:
                state, _, _, _ = engine.prefill_and_generate(part, state, active, decode_rows,
                                                             filled)
            took = time.perf_counter() - began
            if round_ > 0:  # the first round compiles
                times[kind].append(took)
            if kind != "chunk alone":
                filled += 1
            if kind != "decode":
                start += chunk
    medians = {kind: round(float(np.median(t)) * 1e3, 1) for kind, t in times.items()}
    return {"rows": rows, "chunk": chunk, "position": position, "median_ms": medians,
            "with_chunk_over_decode": round(medians["decode with chunk"] / medians["decode"], 2),
            "separate_over_decode": round(
                (medians["decode"] + medians["chunk alone"]) / medians["decode"], 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--checkpoint", type=Path,
                        help="existing checkpoint (default: write a random one)")
    parser.add_argument("--rows", type=int, default=4, help="requests decoding")
    parser.add_argument("--chunks", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--position", type=int, default=1600,
                        help="where in its prompt the chunk starts")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    import jax

    from grok import Grok, GrokConfig

    config = GrokConfig.from_json(args.config)
    with tempfile.TemporaryDirectory(prefix="grok-mixed-step-") as scratch:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from bench import write_random_checkpoint

            checkpoint = Path(scratch)
            write_random_checkpoint(args.config, checkpoint)
        grok = Grok.load(checkpoint, config, mesh_shape=(1, 1))
        results = [measure(grok, args.rows, chunk, args.position, args.rounds)
                   for chunk in args.chunks]
    print(json.dumps({"config": str(args.config), "device": jax.devices()[0].platform,
                      "cpus": os.cpu_count(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
