"""benchmarks/bench.py on a fresh clone: its default config is in the repository, and a
mistake in its arguments is one line on stderr with exit code 2, before any work."""

import importlib.util
import json
import sys

import pytest
from conftest import REPO

from grok.config import GrokConfig
from grok.demo import DEMO_CHECKPOINT, DEMO_CONFIG


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench", module)
    spec.loader.exec_module(module)
    return module


def test_default_config_is_in_the_repository(bench):
    assert bench.DEFAULT_CONFIG.is_relative_to(REPO / "benchmarks" / "configs")
    config = GrokConfig.from_json(bench.DEFAULT_CONFIG)
    assert (config.num_layers, config.emb_size, config.num_q_heads, config.num_kv_heads,
            config.num_experts, config.ffn_size, config.vocab_size) == (4, 1024, 16, 8, 8,
                                                                        5464, 32768)


@pytest.mark.parametrize("argv, message", [
    # The demo's 64 positions do not hold a 64-token prompt and 33 new tokens.
    (["--config", str(DEMO_CONFIG), "--checkpoint", str(DEMO_CHECKPOINT)],
     f"--prompt-len 64 and --decode-steps 32 need 97 positions, but {DEMO_CONFIG} has "
     f"sequence_len=64; pass smaller ones"),
    (["--config", "/nonexistent.json"], "config file '/nonexistent.json' does not exist"),
    (["--mesh", "2by2"], "--mesh must be DATAxMODEL, e.g. 1x1, got '2by2'"),
    (["--prompt-len", "0"], "argument --prompt-len: expected a positive integer, got '0'"),
    (["--weights", "int3"], "argument --weights: invalid choice: 'int3'"),
    (["--checkpoint", "/nonexistent"], "--checkpoint '/nonexistent' does not exist"),
])
def test_mistakes_are_one_line(bench, argv, message, capsys):
    assert bench.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: "), captured.err
    assert message in captured.err


@pytest.mark.slow
def test_compile_only_on_the_demo(bench, capsys):
    assert bench.main(["--config", str(DEMO_CONFIG), "--checkpoint", str(DEMO_CHECKPOINT),
                       "--prompt-len", "8", "--mesh", "1x1", "--compile-only"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert sorted(figures["compile_s_by_batch"], key=int) == ["1", "2", "3", "4", "8"]
    assert all(s > 0 for s in figures["compile_s_by_batch"].values())
