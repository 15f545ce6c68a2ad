"""The command line: `run.py` as a subprocess (two runs: JSON output, a missing checkpoint)
and `grok.cli.main` in-process for streaming and for the input errors.

Greedy outputs are compared with reference.json as in test_generate: up to the first step
whose release top-2 logit gap is at or below 0.125 (two logits each moving by the bf16 noise
of 2/32 can swap there; ties may break either way).
"""

import io
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, TOKENIZER

from grok.cli import main

CLEAR_GAP = 0.125
NEW = 12
OTHER_PROMPT = "The team has issues with the"  # 6 ids, all inside the fixture's vocab 4096
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def reference(fixture_dir):
    return json.loads((fixture_dir / "reference.json").read_text())


@pytest.fixture(scope="module")
def model_args(fixture_dir):
    if not TOKENIZER.is_file():
        pytest.skip(f"released tokenizer not found at {TOKENIZER}")
    return ["--checkpoint", str(fixture_dir), "--config", str(fixture_dir / "config.json"),
            "--tokenizer", str(TOKENIZER), "--mesh", "1x1"]


def run_script(args, cwd):
    """run.py in a fresh interpreter, from another working directory, on 8 CPU devices."""
    env = {**os.environ, "XLA_FLAGS": os.environ["XLA_FLAGS"],
           "JAX_PLATFORMS": os.environ["JAX_PLATFORMS"]}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def call_main(argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def clear_steps(gaps) -> int:
    return next((i for i, gap in enumerate(gaps) if gap <= CLEAR_GAP), len(gaps))


@pytest.fixture(scope="module")
def json_run(model_args, reference, tmp_path_factory):
    """One subprocess: two prompts, greedy, JSON lines."""
    args = [*model_args, "--json", "--temperature", "0", "--max-new-tokens", str(NEW),
            "--prompt", reference["prompt"], "--prompt", OTHER_PROMPT]
    done = run_script(args, cwd=tmp_path_factory.mktemp("cwd"))
    assert done.returncode == 0, done.stderr
    return done


def test_json_lines_in_prompt_order(json_run, reference):
    lines = json_run.stdout.splitlines()
    assert len(lines) == 2
    rows = [json.loads(line) for line in lines]
    for row in rows:
        assert {"prompt", "prompt_ids", "output_ids", "output_logprobs", "text",
                "finish_reason"} <= row.keys()
        assert len(row["output_ids"]) == len(row["output_logprobs"]) == NEW
        assert row["finish_reason"] == "length"
    assert [row["prompt"] for row in rows] == [reference["prompt"], OTHER_PROMPT]
    assert rows[0]["prompt_ids"] == reference["prompt_ids"]
    assert rows[1]["prompt_ids"] == [422, 1280, 574, 2400, 419, 333]
    k = clear_steps(reference["greedy_top2_gaps"])
    assert k == 6
    # Measured: all 12 of reference["greedy_ids"] match, and the text is sampled_text.
    assert rows[0]["output_ids"][:k] == reference["greedy_ids"][:k]
    assert rows[0]["text"].startswith("figfigfigfig issues")


def test_timings_on_stderr(json_run):
    err = json_run.stderr
    assert re.search(r"loaded in \d+\.\d+ s on a 1x1 mesh", err), err
    assert re.search(r"compile \d+\.\d+ s, prefill \d+\.\d+ s \(11 tokens\), "
                     r"decode (\d+\.\d+|nan) tokens/s \(22 tokens\)", err), err
    assert "Traceback" not in err


def test_streaming_writes_text(model_args, reference, json_run):
    """Without --json the texts stream to stdout, each prompt after a header line; they are
    the JSON run's texts (the same program on the same inputs, so exactly equal)."""
    code, out, err = call_main([*model_args, "--temperature", "0", "--max-new-tokens",
                                str(NEW), "--prompt", reference["prompt"],
                                "--prompt", OTHER_PROMPT])
    assert code == 0, err
    texts = [json.loads(line)["text"] for line in json_run.stdout.splitlines()]
    assert out == (f"--- prompt 0: {reference['prompt']}\n{texts[0]}\n"
                   f"--- prompt 1: {OTHER_PROMPT}\n{texts[1]}\n")
    assert texts[0].startswith("figfigfigfig issues")


def test_missing_checkpoint_subprocess(tmp_path):
    done = run_script(["--checkpoint", "/nonexistent"], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert "Traceback" not in done.stderr


# --- bad input via main() --------------------------------------------------------------

# Rejected before the checkpoint is read.
BEFORE_LOAD = [
    (["--checkpoint", "/nonexistent"], "no checkpoint at '/nonexistent'"),
    (["--tokenizer", "/nonexistent.model"], "no tokenizer at '/nonexistent.model'"),
    (["--mesh", "3x3"], "mesh 3x3 needs 9 devices, but only 8"),
    (["--mesh", "foo"], "--mesh must be DATAxMODEL"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--prompt-file", "/nonexistent.txt"], "--prompt-file '/nonexistent.txt' does not exist"),
]
# Sampling settings and prompts: also rejected before loading.
SETTINGS = [
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    (["--top-k", "-1"], "top_k must be an integer in [0, 2**31)"),
    (["--max-new-tokens", "300", "--prompt", "The answer to life the"],
     "prompt 0 has 5 tokens; with max_new_tokens=300 it needs 305 positions, more than "
     "sequence_len=256"),
    (["--prompt", "The universe"], "prompt 0: token id 9072 is outside [0, vocab_size=4096)"),
]


@pytest.mark.parametrize("extra, message", BEFORE_LOAD + SETTINGS)
def test_bad_input_is_one_error_line(model_args, extra, message):
    code, out, err = call_main([*model_args, *extra])
    assert code == 2
    assert out == ""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert message in errors[0]
    assert "Traceback" not in err


def test_missing_checkpoint_says_where_files_go(model_args):
    _, _, err = call_main([*model_args, "--checkpoint", "/nonexistent"])
    assert "checkpoints" in err and "ckpt-0" in err


@pytest.mark.parametrize("extra, message", [
    *BEFORE_LOAD,
    *SETTINGS,
])
def test_bad_input_stderr_is_only_the_error(model_args, extra, message):
    code, _, err = call_main([*model_args, *extra])
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert message in lines[0]
