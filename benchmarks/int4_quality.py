"""What 4-bit experts cost in quality: int4 (per group size) against the release's int8.

    python benchmarks/int4_quality.py [--groups 32,64,128] [--positions 256]
                                      [--fixture ../shared/fixtures/upstream-tiny]

Three measurements, printed as one JSON object (progress on stderr):

- demo: held-out accuracy of the trained demo model on 1000 problems it never saw, int8
  against int4. Its expert width (88 rows) admits groups of at most 8 rows.
- fixture: the largest and mean distance of the logits from those the release's own code
  computed (`upstream-tiny`, whose widths admit groups of 8), int8 beside int4.
- random: a random model of full vocabulary (`configs/int4-quality.json`, widths that
  groups of 32 to 128 divide) in the released format; greedy text from int8 weights, then
  both modes' logits over it: top-1 agreement and mean KL(int8 || int4) per position,
  beside the same figures for int8's own values computed another way (`dequantized`),
  which differ by rounding alone: the floor of what these measures can tell apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench import log, write_random_checkpoint  # noqa: E402

from grok import Grok, demo  # noqa: E402
from grok.config import GrokConfig  # noqa: E402

QUALITY_CONFIG = REPO / "benchmarks" / "configs" / "int4-quality.json"
DEMO_PROBLEMS, DEMO_SEED, DEMO_GROUP = 1000, 11, demo.INT4_GROUP
FIXTURE_GROUP = 8


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(want: np.ndarray, got: np.ndarray) -> dict:
    """int4 logits `got` against int8 logits `want`, both [..., V]."""
    p, q = log_softmax(want), log_softmax(got)
    kl = (np.exp(p) * (p - q)).sum(-1)
    return {"top1_agreement": float((want.argmax(-1) == got.argmax(-1)).mean()),
            "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "max_abs_logit_diff": float(np.abs(want - got).max())}


def demo_accuracy(weights: str, group: int) -> float:
    model = demo.load(weights=weights, int4_group=group)
    problems = demo.fresh_problems(DEMO_SEED, DEMO_PROBLEMS)
    outs = model.generate([demo.prompt(a, b) for a, b in problems])
    return sum(demo.is_right(a, b, o.text) for (a, b), o in zip(problems, outs,
                                                                   strict=True)) / len(problems)


def fixture_errors(fixture: Path) -> dict:
    reference = json.loads((fixture / "reference.json").read_text())
    tokens, want = np.asarray(reference["tokens"]), np.load(fixture / "reference_logits.npy")
    out = {}
    for name, weights in (("int8", "int8"), (f"int4_g{FIXTURE_GROUP}", "int4")):
        grok = Grok.load(fixture, fixture / "config.json", mesh_shape=(1, 1), weights=weights,
                         int4_group=FIXTURE_GROUP, progress=False)
        diff = np.abs(grok.logits(tokens) - want)
        out[name] = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}
    return out


def random_model(groups: list[int], positions: int) -> dict:
    config = GrokConfig.from_json(QUALITY_CONFIG)
    with tempfile.TemporaryDirectory() as folder:
        write_random_checkpoint(QUALITY_CONFIG, Path(folder))
        int8 = Grok.load(folder, config, mesh_shape=(1, 1), weights="int8", progress=False)
        prompt = np.random.default_rng(0).integers(3, config.vocab_size, 16).tolist()
        text = int8.generate(prompt, temperature=0, max_new_tokens=positions).output_ids
        tokens = np.asarray([prompt + list(text)])
        want = int8.logits(tokens)[0, len(prompt) - 1:]
        del int8
        p = np.exp(log_softmax(want))
        out = {"positions": int(want.shape[0]),
               "int8_mean_top1_probability": float(p.max(-1).mean()),
               "int8_mean_top1_margin": float(np.mean(np.diff(np.sort(want, -1)[:, -2:], axis=-1)))}
        # The floor: the same int8 values computed another way (float32 on CPU, once
        # converted), which moves logits by rounding alone.
        floor = Grok.load(folder, config, mesh_shape=(1, 1), weights="dequantized",
                          progress=False)
        out["dequantized"] = compare(want, floor.logits(tokens)[0, len(prompt) - 1:])
        del floor
        for group in groups:
            start = time.perf_counter()
            int4 = Grok.load(folder, config, mesh_shape=(1, 1), weights="int4",
                             int4_group=group, progress=False)
            out[f"int4_g{group}"] = compare(want, int4.logits(tokens)[0, len(prompt) - 1:])
            log(f"random model, int4 groups of {group}: {out[f'int4_g{group}']} "
                f"({time.perf_counter() - start:.0f} s)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default="32,64,128",
                        help="group sizes for the random model (default: %(default)s)")
    parser.add_argument("--positions", type=int, default=256,
                        help="greedy positions compared on the random model")
    parser.add_argument("--parts", default="demo,fixture,random",
                        help="which measurements (default: %(default)s)")
    parser.add_argument("--fixture", type=Path,
                        default=REPO.parent / "shared" / "fixtures" / "upstream-tiny")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    results: dict = {}
    if "demo" in parts:
        log("demo: 1000 held-out problems ...")
        results["demo"] = {"int8": demo_accuracy("int8", DEMO_GROUP),
                           f"int4_g{DEMO_GROUP}": demo_accuracy("int4", DEMO_GROUP)}
        log(f"demo: {results['demo']}")
    if "fixture" in parts and (args.fixture / "reference_logits.npy").is_file():
        results["fixture"] = fixture_errors(args.fixture)
        log(f"fixture: {results['fixture']}")
    elif "fixture" in parts:
        log(f"fixture: not found at {args.fixture}, skipped")
    if "random" in parts:
        results["random"] = random_model([int(g) for g in args.groups.split(",")],
                                         args.positions)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
