"""The demo model: a small Grok-1-architecture model, trained by `tools/train_demo.py` on
addition, that ships inside the package (`grok/demo_files/`) so that `run.py` and an
installed `grok-run` work before the 318 GB download.

It answers prompts like "123+456=" with "579" and EOS. The problems are split for good by a
hash rule: the training script never sees a held-out problem, so the held-out ones shown by
`run.py` and used by the tests are fresh to the model. `load()` gives it to Python in one call.
"""

from __future__ import annotations

import argparse
import random
import zlib
from collections.abc import Sequence
from pathlib import Path

from grok.api import Grok

# Package data, so found wherever the package is installed.
DEMO_FILES = Path(__file__).resolve().parent / "demo_files"
DEMO_CHECKPOINT = DEMO_FILES  # holds ckpt-0/
DEMO_CONFIG = DEMO_FILES / "config.json"
DEMO_TOKENIZER = DEMO_FILES / "demo.model"

MAX_DIGITS = 3  # each operand has 1 to 3 digits
# Its expert width, 88 rows, takes 4-bit groups of at most 8 rows (`--weights int4`).
INT4_GROUP = 8
HOLD_OUT_ONE_IN = 50  # 2% of all problems are held out of training
# Enough new tokens for the longest answer (1998: four digits) and its EOS.
MAX_NEW_TOKENS = 8
EXAMPLES = 5
EXAMPLE_SEED = 2037  # a mix of lengths and carries

# What the demo changes from the release's sampling defaults.
SETTINGS = {"temperature": 0.0, "max_new_tokens": MAX_NEW_TOKENS}

BANNER = """\
No Grok-1 weights in checkpoints/ckpt-0: running the demo, a small model of the Grok-1
architecture (8 experts, int8 weights) that tools/train_demo.py trained on addition.
Prompts look like "123+456=". For the real 314B model, see checkpoints/README.md."""


def is_held_out(a: int, b: int) -> bool:
    """Whether a+b is one of the problems kept out of training (a fixed 1 in 50)."""
    return zlib.crc32(prompt(a, b).encode()) % HOLD_OUT_ONE_IN == 0


def prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def _operand(rng: random.Random) -> int:
    """A number of 1..MAX_DIGITS digits, the digit count uniform, so short ones are common."""
    digits = rng.randint(1, MAX_DIGITS)
    return rng.randrange(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits)


def problems(rng: random.Random, count: int, held_out: bool) -> list[tuple[int, int]]:
    """`count` random problems (a, b), all held out of training or all from the training part."""
    out = []
    while len(out) < count:
        a, b = _operand(rng), _operand(rng)
        if is_held_out(a, b) == held_out:
            out.append((a, b))
    return out


def fresh_problems(seed: int, count: int) -> list[tuple[int, int]]:
    """`count` different seeded held-out problems: the model never saw them in training.
    (Drawn one at a time, since short operands leave few held-out problems to repeat.)"""
    rng, out = random.Random(seed), {}
    while len(out) < count:
        out.setdefault(problems(rng, 1, held_out=True)[0])
    return list(out)


def is_right(a: int, b: int, text: str) -> bool:
    return text == str(a + b)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None
               ) -> argparse.Namespace:
    """Parses the command line; with no --checkpoint given and no real weights in place,
    the defaults become the demo's: its files, greedy sampling (right for arithmetic), room
    for the longest answer, and a 1x1 mesh (more devices would only add traffic to a model
    this small, and the release's default of all devices need not divide its heads).

    `args.demo` says which. An explicit --checkpoint is never replaced by the demo, so a
    wrong path stays an error.
    """
    real_default = parser.get_default("checkpoint")
    parser.set_defaults(checkpoint=None)  # tells "no --checkpoint" from an explicit one
    args = parser.parse_args(argv)
    demo = args.checkpoint is None and not (Path(real_default) / "ckpt-0").is_dir()
    if demo:
        parser.set_defaults(checkpoint=DEMO_CHECKPOINT, config=str(DEMO_CONFIG),
                            tokenizer=DEMO_TOKENIZER, mesh=(1, 1), int4_group=INT4_GROUP,
                            **SETTINGS)
    else:
        parser.set_defaults(checkpoint=real_default)
    args = parser.parse_args(argv)
    args.demo = demo
    return args


class DemoGrok(Grok):
    """The demo model, whose `generate`, `stream` and `run` default to greedy decoding and
    room for the longest answer (the release's 100 new tokens do not fit its 64 positions)."""

    def run(self, prompts, log=None, **settings):
        return super().run(prompts, log=log, **{**SETTINGS, **settings})


def load(mesh_shape: tuple[int, int] = (1, 1), weights: str | None = None,
         moe: str = "sparse", int4_group: int = INT4_GROUP) -> DemoGrok:
    """The demo model with its config and tokenizer, ready for `generate("123+456=")`."""
    return DemoGrok.load(DEMO_CHECKPOINT, DEMO_CONFIG, tokenizer_path=DEMO_TOKENIZER,
                         mesh_shape=mesh_shape, weights=weights, moe=moe,
                         int4_group=int4_group)


def example_prompts() -> list[str]:
    return [prompt(a, b) for a, b in fresh_problems(EXAMPLE_SEED, EXAMPLES)]


def write_examples(completions, out) -> None:
    """One line per example: the problem, the model's answer, the right one, and a verdict."""
    right = 0
    for (a, b), completion in zip(fresh_problems(EXAMPLE_SEED, EXAMPLES), completions,
                                  strict=True):
        ok = is_right(a, b, completion.text)
        right += ok
        out.write(f"{prompt(a, b) + completion.text:<14} right answer {a + b:<5} "
                  f"{'correct' if ok else 'WRONG'}\n")
    out.write(f"{right} of {EXAMPLES} correct (problems the model never saw in training)\n")
