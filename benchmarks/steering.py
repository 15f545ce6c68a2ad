"""What the sampling controls cost a decode step; figures as JSON.

    python benchmarks/steering.py [--config CONFIG.json] [--baseline-repo PATH] [--rounds 2]

On CPU, the cpu-bench config with random weights (16 slots of 288 positions): the median
decode step with 8 requests running, each a greedy 24-token continuation of a 32-token
prompt, (a) with no control set, on this checkout and, with --baseline-repo, on another
checkout of the project (one without the controls: the cost of carrying them when unused);
(b) with all 8 rows steered (presence, frequency and repetition penalties and a 64-token
logit_bias); (c) with one of the 8 steered. Each round runs every variant in a fresh process
of its own, in turn, so that the machine's drift spreads over all of them.

Progress goes to stderr, the figures to stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "benchmarks" / "configs" / "cpu-bench.json"
RUNNING, PROMPT, NEW = 8, 32, 24
STEERED = dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure(code: Path, config: Path, steered: int, repeats: int) -> float:
    """Median decode-step ms with `steered` of the running rows steered (run in a process
    whose `grok` is the one in `code`)."""
    sys.path.insert(0, str(code))
    import grok  # before bench, which puts this checkout first on the path

    if not Path(grok.__file__).resolve().is_relative_to(code.resolve()):
        raise SystemExit(f"imported {grok.__file__}, not the grok of {code}")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench import write_random_checkpoint

    from grok import Grok
    from grok.engine.request import GenerationSettings
    from grok.engine.scheduler import Scheduler

    with tempfile.TemporaryDirectory(prefix="grok-steering-") as scratch:
        write_random_checkpoint(config, Path(scratch))
        grok = Grok.load(scratch, config, mesh_shape=(1, 1))
    engine = grok.engine(16, 288, prefill_chunk=64)
    rng = np.random.default_rng(0)
    vocab = grok.config.vocab_size
    plain = GenerationSettings(max_new_tokens=NEW, temperature=0, ignore_eos=True)
    bias = {int(t): -5.0 for t in rng.choice(vocab, 64, replace=False)}
    settings = [plain] * RUNNING
    if steered:  # (a checkout without the controls takes none)
        settings[:steered] = [GenerationSettings(
            max_new_tokens=NEW, temperature=0, ignore_eos=True, logit_bias=bias,
            **STEERED)] * steered
    medians = []
    for repeat in range(repeats + 1):  # the first compiles
        scheduler = Scheduler(engine)
        for s in settings:
            scheduler.submit(engine.make_request(rng.integers(3, vocab, PROMPT).tolist(), s))
        times = []
        while scheduler.has_work:
            decoding = scheduler.running == RUNNING and scheduler.waiting == 0
            start = time.perf_counter()
            scheduler.step()
            if decoding:
                times.append(time.perf_counter() - start)
        if repeat:
            medians.append(float(np.median(times[1:])) * 1e3)
    return float(np.median(medians))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--baseline-repo", type=Path,
                        help="another checkout of the project, measured without controls")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs per process")
    parser.add_argument("--measure", nargs=2, metavar=("CODE", "STEERED"),
                        help=argparse.SUPPRESS)  # one variant, in a process of its own
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.config, int(args.measure[1]),
                                 args.repeats)))
        return 0
    variants = {"no controls": (REPO, 0), "all 8 steered": (REPO, RUNNING),
                "1 of 8 steered": (REPO, 1)}
    if args.baseline_repo is not None:
        variants["no controls, baseline"] = (args.baseline_repo.resolve(), 0)
    found: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name, (code, steered) in variants.items():
            out = subprocess.run([sys.executable, __file__, "--config", str(args.config),
                                  "--repeats", str(args.repeats), "--measure", str(code),
                                  str(steered)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
            found[name].append(json.loads(out.stdout))
            log(f"  round {round_}: {name}: {found[name][-1]:.1f} ms")
    ms = {name: round(float(np.median(v)), 1) for name, v in found.items()}
    base = ms["no controls"]
    result = {"decode step ms, 8 running (median)": ms,
              "ratio to no controls": {name: round(v / base, 3) for name, v in ms.items()}}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
