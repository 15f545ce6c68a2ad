"""A second start with the same model and shapes compiles nothing: every step comes from
JAX's persistent compilation cache, which run.py turns on by default."""

import os
import subprocess
import sys

import pytest
from conftest import REPO

ARGS = [sys.executable, "run.py", "--prompt", "12+34=", "--max-new-tokens", "3"]


def _run(env) -> str:
    done = subprocess.run(ARGS, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "46"
    return done.stderr


@pytest.mark.slow
def test_second_start_loads_every_step_from_the_cache(tmp_path):
    env = {**os.environ, "GROK_COMPILATION_CACHE": str(tmp_path / "xla")}
    first = [line for line in _run(env).splitlines() if " in " in line and "s" in line]
    compiled = [line for line in first if line.startswith("compiled ")]
    assert len(compiled) >= 3  # prefill, insert, decode
    second = _run(env).splitlines()
    assert not [line for line in second if line.startswith("compiled ")]
    loaded = [line for line in second if line.endswith("(from the compilation cache)")]
    assert len(loaded) == len(compiled)
    assert any(p.is_file() for p in (tmp_path / "xla").iterdir())


@pytest.mark.slow
def test_cache_off(tmp_path):
    env = {**os.environ, "GROK_COMPILATION_CACHE": "off", "XDG_CACHE_HOME": str(tmp_path)}
    for _ in range(2):
        lines = _run(env).splitlines()
        assert not [line for line in lines if "from the compilation cache" in line]
    assert not (tmp_path / "grok1-jax").exists()
