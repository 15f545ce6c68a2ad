"""EleutherAI's lm-evaluation-harness against the server on the demo model, and the same
questions answered by the library (`Grok.score`, `Grok.score_rolling`, `Grok.generate`):
the two must report the same numbers (questions that bf16 noise could decide either way
left out).

    python tools/lm_eval/demo_eval.py --lm-eval-python /path/to/lm-eval-venv/bin/python

lm_eval lives in an environment of its own (see README.md here: it brings transformers,
datasets and more); this script runs in the project's. It writes the task data (held-out
addition problems) and a Hugging Face tokenizer built from the demo's SentencePiece model
into a work folder, serves the demo on a free port of 127.0.0.1 (`python -m grok.serve`),
runs `lm_eval --model local-completions` over the tasks in tasks/grok_demo, and prints each
metric as lm_eval reports it beside the library's, exiting 1 where they differ.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from grok import demo
from grok.config import resolve_config

HERE = Path(__file__).resolve().parent
TASKS = HERE / "tasks" / "grok_demo"
CHOICES = 4
MAX_GEN = 8  # the longest answer (4 digits) and EOS
# Two correct bf16 computations of a log-likelihood in differently shaped programs differ by
# up to about 1/4 nat (tests/test_scoring.py): a question whose two likeliest choices are
# closer than that can be decided either way, and is left out.
NEAR_TIE = 1 / 4
# Perplexities are exponentials of sums over every token, each agreeing to the last bits
# of differently shaped computations (see tests/test_scoring.py): their logarithms agree
# within 1e-2, relatively. Accuracies agree exactly.
LOG_PERPLEXITY_RTOL = 1e-2


def choices(total: int, rng: random.Random) -> tuple[list[str], int]:
    """Four sums of the answer's width (none a prefix of another, which would win on
    log-likelihood for free): the answer and three of answer +-1, +-10, +-100 (the nearest
    other numbers of that width for small sums), in a seeded order."""
    width = len(str(total))
    wrong = [total + d for d in (1, -1, 10, -10, 100, -100)
             if total + d >= 0 and len(str(total + d)) == width]
    if len(wrong) < CHOICES - 1:
        low, high = (0 if width == 1 else 10 ** (width - 1)), 10 ** width
        near = sorted((x for x in range(low, high) if x != total and x not in wrong),
                      key=lambda x: abs(x - total))
        wrong += near[:CHOICES - 1 - len(wrong)]
    picked = [*rng.sample(wrong, CHOICES - 1), total]
    rng.shuffle(picked)
    return [str(x) for x in picked], picked.index(total)


def make_docs(count: int, seed: int) -> list[dict]:
    """Half held-out problems (the demo gets nearly all right), half with a four-digit
    operand, longer than any it trained on (it gets many wrong: accuracies that tell
    two scorers apart)."""
    rng = random.Random(seed)
    longer = [(rng.randrange(1000, 10000), rng.randrange(1, 1000))
              for _ in range(count - count // 2)]
    docs = []
    for a, b in demo.fresh_problems(seed, count // 2) + longer:
        options, gold = choices(a + b, rng)
        docs.append({"prompt": demo.prompt(a, b), "answer": str(a + b), "choices": options,
                     "gold": gold})
    return docs


def choice_totals(model, docs: list[dict]) -> list[list[float]]:
    flat = model.score([d["prompt"] for d in docs for _ in range(CHOICES)],
                       [c for d in docs for c in d["choices"]])
    return [[s.total for s in flat[i * CHOICES:(i + 1) * CHOICES]] for i in range(len(docs))]


def without_near_ties(docs: list[dict], totals: list[list[float]]
                      ) -> tuple[list[dict], list[list[float]]]:
    """The docs (and their choices' totals) whose two likeliest choices are apart."""
    kept_docs, kept_totals = [], []
    for d, t in zip(docs, totals, strict=True):
        best, second = sorted(t, reverse=True)[:2]
        if best - second >= NEAR_TIE:
            kept_docs.append(d)
            kept_totals.append(t)
    return kept_docs, kept_totals


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(port: int, cwd: Path) -> subprocess.Popen:
    """The demo server (a folder without checkpoints/ serves the demo), once ready."""
    server = subprocess.Popen([sys.executable, "-m", "grok.serve", "--port", str(port),
                               "--log-level", "warning"], cwd=cwd)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(1)
    server.kill()
    raise SystemExit("the server did not become ready in 10 minutes")


def run_lm_eval(python: str, port: int, work: Path, batch_size: int) -> dict:
    tokenizer = work / "tokenizer"
    subprocess.run([python, str(HERE / "build_tokenizer.py"), str(demo.DEMO_TOKENIZER),
                    str(tokenizer)], check=True, env=_offline())
    context = resolve_config(demo.DEMO_CONFIG).sequence_len
    model_args = (f"model=grok-1-demo base_url=http://127.0.0.1:{port}/v1/completions "
                  f"tokenizer_backend=huggingface tokenizer={tokenizer} "
                  f"tokenized_requests=True max_length={context} "
                  f"max_gen_toks={MAX_GEN} num_concurrent=1 max_retries=1 timeout=600")
    out = work / "results"
    subprocess.run([python, "-m", "lm_eval", "run", "--model", "local-completions",
                    "--model_args", *model_args.split(), "--include_path", str(work / "tasks"),
                    "--tasks", "grok_demo", "--batch_size", str(batch_size),
                    "--output_path", str(out)],
                   check=True, cwd=work / "tasks" / "grok_demo", env=_offline())
    (results,) = out.rglob("results_*.json")
    return json.loads(results.read_text())["results"]


def _offline() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1"}


def library_metrics(model, docs: list[dict], choice_scores: list[list[float]]
                    ) -> dict[tuple[str, str], float]:
    """Each task's metrics as lm_eval defines them, from the library's own calls
    (`choice_scores`: `choice_totals` of the docs)."""
    prompts = [d["prompt"] for d in docs]
    acc = acc_norm = 0
    for d, totals in zip(docs, choice_scores, strict=True):
        acc += max(range(CHOICES), key=totals.__getitem__) == d["gold"]
        normed = [t / len(c) for t, c in zip(totals, d["choices"], strict=True)]
        acc_norm += max(range(CHOICES), key=normed.__getitem__) == d["gold"]
    greedy = model.score(prompts, [d["answer"] for d in docs])
    generated = model.generate(prompts, temperature=0, max_new_tokens=MAX_GEN)
    rolling = model.score_rolling([d["prompt"] + d["answer"] for d in docs])
    logprob = sum(s.total for s in rolling)
    # Each text is one word (no spaces) of as many bytes as characters.
    words, chars = len(docs), sum(len(d["prompt"] + d["answer"]) for d in docs)
    n = len(docs)
    return {("grok_demo_sums_mc", "acc"): acc / n,
            ("grok_demo_sums_mc", "acc_norm"): acc_norm / n,
            ("grok_demo_sums_greedy", "acc"): sum(s.greedy for s in greedy) / n,
            ("grok_demo_sums_gen", "exact_match"):
                sum(c.text == d["answer"] for c, d in zip(generated, docs, strict=True)) / n,
            ("grok_demo_sums_rolling", "word_perplexity"): math.exp(-logprob / words),
            ("grok_demo_sums_rolling", "byte_perplexity"): math.exp(-logprob / chars),
            ("grok_demo_sums_rolling", "bits_per_byte"): -logprob / chars / math.log(2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lm-eval-python", required=True,
                   help="the Python of an environment with lm-eval and transformers")
    p.add_argument("--count", type=int, default=200, help="problems (default: %(default)s)")
    p.add_argument("--seed", type=int, default=2024, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=4,
                   help="prompts per request lm_eval sends (default: %(default)s)")
    p.add_argument("--keep", type=Path, help="keep the work folder (results, samples) here")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="grok-lm-eval-")) if args.keep is None else args.keep
    shutil.copytree(TASKS, work / "tasks" / "grok_demo", dirs_exist_ok=True)
    model = demo.load()
    made = make_docs(args.count, args.seed)
    docs, totals = without_near_ties(made, choice_totals(model, made))
    (work / "tasks" / "grok_demo" / "demo_sums.jsonl").write_text(
        "".join(json.dumps(d) + "\n" for d in docs))
    port = free_port()
    server = serve(port, work)
    try:
        start = time.perf_counter()
        reported = run_lm_eval(args.lm_eval_python, port, work, args.batch_size)
        took = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(60)
    mine = library_metrics(model, docs, totals)
    print(f"\n{len(docs)} problems (of {len(made)}: half held out, half longer than any "
          f"trained on; {len(made) - len(docs)} near-ties left out); lm_eval over HTTP took "
          f"{took:.0f} s\n")
    print(f"{'task':<24} {'metric':<16} {'lm_eval (server)':>17} {'library':>10}  agree")
    failed = 0
    for (task, metric), value in mine.items():
        theirs = reported[task][f"{metric},none"]
        if "perplexity" in metric:
            agree = math.isclose(math.log(theirs), math.log(value),
                                 rel_tol=LOG_PERPLEXITY_RTOL)
        elif metric == "bits_per_byte":
            agree = math.isclose(theirs, value, rel_tol=LOG_PERPLEXITY_RTOL)
        else:
            agree = theirs == value
        failed += not agree
        print(f"{task:<24} {metric:<16} {theirs:>17.5g} {value:>10.5g}  "
              f"{'yes' if agree else 'NO'}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
