"""Which experts each kind of text uses: runs labelled prompts through the router and
compares the labels.

The prompts file has one prompt a line, `LABEL<TAB>PROMPT` (say `code`, `math`, `prose`);
blank lines and lines starting with `#` are skipped. For each label, every token of its
prompts is routed (`Grok.routing`, the forward pass's own choices) and counted per layer and
expert. Printed: per layer, each label's two most used experts with their shares; then how
far apart the labels' usage is, as the mean over layers of the Jensen-Shannon distance
between their expert-share distributions (0: the same, 1: disjoint experts). `--json` and
`--plot` (needs the `plot` extra) write the same to files.

    python tools/expert_report.py prompts.tsv [--checkpoint DIR --config grok-1 ...]

Without --checkpoint it uses the demo model and its tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from grok import demo, plot
from grok.api import Grok
from grok.errors import GrokError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        raise GrokError(message)


def parse_prompts(path: Path) -> dict[str, list[str]]:
    """{label: prompts} in file order; every mistake names the file and line."""
    if not path.is_file():
        raise GrokError(f"prompts file {str(path)!r} does not exist")
    out: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        label, tab, prompt = line.partition("\t")
        if not tab or not label.strip() or not prompt:
            raise GrokError(f"{path}:{number}: expected LABEL<TAB>PROMPT, got {line[:60]!r}")
        out.setdefault(label.strip(), []).append(prompt)
    if len(out) < 1:
        raise GrokError(f"{path}: no prompts (lines are LABEL<TAB>PROMPT)")
    return out


def label_counts(grok: Grok, prompts: list[str]) -> np.ndarray:
    """int64[L, E]: how often each layer's router chose each expert over the prompts."""
    cfg = grok.config
    counts = np.zeros((cfg.num_layers, cfg.num_experts), np.int64)
    for prompt in prompts:
        ids = grok.tokenizer.encode(prompt)
        cfg.check_tokens([ids])
        experts = grok.routing([ids]).experts[0]  # [T, L, X]
        for layer in range(cfg.num_layers):
            counts[layer] += np.bincount(experts[:, layer].ravel(), minlength=cfg.num_experts)
    return counts


def shares(counts: np.ndarray) -> np.ndarray:
    total = counts.sum(-1, keepdims=True)
    return np.divide(counts, total, out=np.zeros(counts.shape), where=total > 0)


def js_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon distance (base 2, so in [0, 1]) between rows of p and q [L, E]."""
    m = (p + q) / 2

    def kl(a, b):
        return np.sum(np.where(a > 0, a * np.log2(np.where(a > 0, a, 1) / np.where(b > 0, b, 1)),
                               0.0), axis=-1)
    return np.sqrt(np.clip((kl(p, m) + kl(q, m)) / 2, 0.0, 1.0))


def report(grok: Grok, labelled: dict[str, list[str]]) -> dict:
    counts = {label: label_counts(grok, prompts) for label, prompts in labelled.items()}
    share = {label: shares(c) for label, c in counts.items()}
    labels = list(labelled)
    distance = np.array([[float(js_distance(share[a], share[b]).mean()) for b in labels]
                         for a in labels])
    return {"labels": labels, "counts": counts, "share": share, "distance": distance}


def print_report(result: dict, out) -> None:
    labels, share = result["labels"], result["share"]
    layers = next(iter(share.values())).shape[0]
    width = max(16, *(len(label) for label in labels))
    out.write("layer  " + "".join(f"{label:<{width + 2}}" for label in labels) + "\n")
    for layer in range(layers):
        cells = []
        for label in labels:
            row = share[label][layer]
            top = np.argsort(-row, kind="stable")[:2]
            cells.append(", ".join(f"{e}:{row[e]:.0%}" for e in top))
        out.write(f"{layer:<7}" + "".join(f"{c:<{width + 2}}" for c in cells) + "\n")
    out.write("\nmean Jensen-Shannon distance between labels (0 same, 1 disjoint)\n")
    out.write(" " * (width + 2) + "".join(f"{label:>{width + 2}}" for label in labels) + "\n")
    for label, row in zip(labels, result["distance"], strict=True):
        out.write(f"{label:<{width + 2}}" + "".join(f"{d:>{width + 2}.3f}" for d in row) + "\n")


def main(argv=None) -> int:
    p = _Parser(description="Expert usage per label of a file of LABEL<TAB>PROMPT lines.")
    p.add_argument("prompts", type=Path, help="file of LABEL<TAB>PROMPT lines")
    p.add_argument("--checkpoint", type=Path, help="folder holding ckpt-0 (default: demo)")
    p.add_argument("--config", default="grok-1", help="preset or JSON path, with --checkpoint")
    p.add_argument("--tokenizer", type=Path, help="SentencePiece model, with --checkpoint")
    p.add_argument("--mesh", help="DATAxMODEL devices (default 1xALL)")
    p.add_argument("--json", type=Path, metavar="FILE.json", help="write the counts and "
                   "distances as JSON")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="draw each label's shares "
                   "and the distance matrix (needs the 'plot' extra)")
    try:
        args = p.parse_args(argv)
        labelled = parse_prompts(args.prompts)
        if args.plot is not None:
            plot.require()
        mesh = None
        if args.mesh:
            parts = args.mesh.lower().split("x")
            if len(parts) != 2 or not all(x.isdigit() and int(x) > 0 for x in parts):
                raise GrokError(f"--mesh must be DATAxMODEL, e.g. 1x8, got {args.mesh!r}")
            mesh = (int(parts[0]), int(parts[1]))
        if args.checkpoint is None:
            grok = demo.load(mesh_shape=mesh or (1, 1))
        else:
            if args.tokenizer is None:
                raise GrokError("--checkpoint needs --tokenizer (the SentencePiece model)")
            grok = Grok.load(args.checkpoint, args.config, tokenizer_path=args.tokenizer,
                             mesh_shape=mesh)
        result = report(grok, labelled)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_report(result, sys.stdout)
    if args.json is not None:
        args.json.write_text(json.dumps({
            "labels": result["labels"],
            "counts": {k: v.tolist() for k, v in result["counts"].items()},
            "share": {k: v.tolist() for k, v in result["share"].items()},
            "distance": result["distance"].tolist()}) + "\n")
    if args.plot is not None:
        plot.labels_figure(result["share"], result["distance"], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
