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

import grok
from grok.cli import main
from grok.errors import GrokError

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
    # The fixture's experts are 1368 wide: groups of 64 rows cannot tile them.
    (["--weights", "int4", "--int4-group", "64", "--prompt", "The answer to life the"],
     "int4_group=64 does not divide the 1368 rows of the contracting axis of "
     "transformer/decoder_layer_0/moe/linear_1/w (a device's share on this mesh); use a group "
     "size that does, such as 8"),
    (["--weights", "int4", "--int4-group", "0", "--prompt", "The answer to life the"],
     "int4_group must be a positive integer, got 0"),
    (["--prefix-block-size", "0"], "--prefix-block-size must be in [1, 2**24], got 0"),
    (["--prefix-cache-blocks", "-3"], "--prefix-cache-blocks must be in [1, 2**24], got -3"),
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
    (["--presence-penalty", "2.5"], "presence_penalty must be a number in [-2, 2], got 2.5"),
    (["--repetition-penalty", "0"], "repetition_penalty must be a number > 0, got 0.0"),
    (["--logit-bias", "5"], "--logit-bias must be ID=BIAS, e.g. 2=-100, got '5'"),
    (["--logit-bias", "5000=1", "--prompt", "The answer to life the"],
     "logit_bias: token id 5000 is out of range [0, vocab_size=4096)"),
    (["--min-tokens", "200"], "min_tokens must be an integer in [0, max_new_tokens=100]"),
    (["--stop-token-id", "-4"], "stop_token_ids must be a list of token ids"),
    (["--json-schema", '{"type": "array", "uniqueItems": true}'],
     "json_schema: 'uniqueItems' at / is not supported"),
    (["--json-schema", "/nonexistent/s.json"],
     "--json-schema: '/nonexistent/s.json' is neither a schema nor a readable file"),
    (["--regex", "(ab"], "regex: regex does not compile: Regex parsing error"),
    (["--regex", "a", "--choice", "b"], "argument --choice: not allowed with argument --regex"),
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
    assert "pass --checkpoint" not in err  # the user just did


def test_missing_tokenizer_suggests_the_flag_only_when_not_given(model_args, tmp_path,
                                                                 monkeypatch):
    _, _, err = call_main([*model_args, "--tokenizer", "/nonexistent.model"])
    assert "pass --tokenizer" not in err and "tokenizer/README.md" in err
    monkeypatch.chdir(tmp_path)  # no tokenizer/tokenizer.model here
    argv = [a for a in model_args if a != "--tokenizer" and a != str(TOKENIZER)]
    _, _, err = call_main(argv)
    assert err == ("error: no tokenizer at 'tokenizer/tokenizer.model': put the released "
                   "tokenizer.model there or pass --tokenizer; tokenizer/README.md says where "
                   "to get it\n")


def test_one_device_is_singular(monkeypatch):
    import jax

    from grok import sharding
    with pytest.raises(GrokError, match=r"needs 2 devices, but only 1 is available; on CPU, "
                                        r"XLA_FLAGS=--xla_force_host_platform_device_count=2 "):
        sharding.make_mesh((1, 2), devices=jax.devices()[:1])


# --- help, version, and the ways to start it -----------------------------------------------

def test_help_shows_every_default_and_what_the_demo_changes(capsys):
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in ["(default: 100)", "(default: 0.01)", "(default: 1.0)", "(default: 0)",
                    "default: 42", "(default: sparse)", "default: none",
                    "(default: tokenizer/tokenizer.model)", "(default: grok-1)",
                    "checkpoints/ in the current directory", "(default: 1xALL"]:
        assert default in text, default
    assert ("greedy sampling (--temperature 0), --max-new-tokens 8 and --mesh 1x1" in text)
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=N simulates N" in text


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.endswith(f" {grok.__version__}\n")
    assert re.fullmatch(r"\d+\.\d+\.\d+", grok.__version__)


@pytest.mark.parametrize("module", ["grok", "grok.cli"])
def test_python_dash_m(module, tmp_path):
    done = subprocess.run([sys.executable, "-m", module, "--version"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"python -m {module} {grok.__version__}\n"
    assert done.stderr == ""


def test_run_py_without_the_dependencies_says_what_to_do(tmp_path):
    """-S: no site-packages, as with a system python outside the virtual environment."""
    done = subprocess.run([sys.executable, "-S", str(REPO / "run.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "is not installed for" in lines[0], done.stderr
    assert "virtual environment" in lines[0] and "pip install -e ." in lines[0]


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


def test_a_structured_run(model_args):
    pytest.importorskip("xgrammar")
    code, out, err = call_main([*model_args, "--prompt", OTHER_PROMPT, "--max-new-tokens", "8",
                                "--temperature", "1", "--json", "--choice", "yes",
                                "--choice", "no thanks"])
    assert code == 0, err
    completion = json.loads(out)
    assert completion["text"] in ("yes", "no thanks") and completion["finish_reason"] == "stop"
