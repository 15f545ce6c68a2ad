"""A second start with the same model and shapes compiles nothing: every step comes from
JAX's persistent compilation cache, which run.py turns on by default."""

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

ARGS = [sys.executable, "run.py", "--prompt", "12+34=", "--max-new-tokens", "3"]
SUMMARY = re.compile(r"^(\d+) programs? compiled, (\d+) loaded from the compilation cache, "
                     r"in [\d.]+ s$")


def _run(env) -> tuple[int, int]:
    """(programs compiled, programs loaded from the cache) as run.py reports them."""
    done = subprocess.run(ARGS, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "46"
    lines = done.stderr.splitlines()
    # One progress line for the compiles, not one line per program.
    assert not [line for line in lines if line.startswith(("compiling ", "compiled "))]
    summaries = [m for line in lines if (m := SUMMARY.match(line))]
    assert len(summaries) == 1, done.stderr
    return int(summaries[0].group(1)), int(summaries[0].group(2))


@pytest.mark.slow
def test_second_start_loads_every_step_from_the_cache(tmp_path):
    env = {**os.environ, "GROK_COMPILATION_CACHE": str(tmp_path / "xla")}
    compiled, loaded = _run(env)
    assert compiled >= 3 and loaded == 0  # init, prefill, decode
    assert _run(env) == (0, compiled)
    assert any(p.is_file() for p in (tmp_path / "xla").iterdir())


@pytest.mark.slow
def test_cache_off(tmp_path):
    env = {**os.environ, "GROK_COMPILATION_CACHE": "off", "XDG_CACHE_HOME": str(tmp_path)}
    for _ in range(2):
        compiled, loaded = _run(env)
        assert compiled >= 3 and loaded == 0
    assert not (tmp_path / "grok1-jax").exists()
