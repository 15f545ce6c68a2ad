"""Test setup: eight simulated CPU devices, so every mesh test runs on any machine.

XLA reads the device count once, at backend start, so it is set before jax is imported.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled programs go here rather than in the user's cache folder, for commands under test
# and for this process alike: test modules load the same fixture at the same shapes, so
# later modules load many of their programs instead of compiling them (compiling is most
# of the suite's time).
if "GROK_COMPILATION_CACHE" not in os.environ:
    os.environ["GROK_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="grok-test-xla-")
    atexit.register(shutil.rmtree, os.environ["GROK_COMPILATION_CACHE"], ignore_errors=True)

from grok import compilation  # after the flags above: jax reads them as it starts

compilation.enable(os.environ["GROK_COMPILATION_CACHE"])

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURE = SHARED / "fixtures" / "upstream-tiny"
TOKENIZER = SHARED / "tokenizer" / "grok-1-tokenizer.model"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """The release-computed tiny fixture; skips where ../shared is absent (a fresh clone)."""
    if not (FIXTURE / "ckpt-0").is_dir():
        pytest.skip(f"fixture not found at {FIXTURE}")
    return FIXTURE


@pytest.fixture(scope="module")
def http(url):
    """An httpx client of the module's server (the module's `url` fixture)."""
    import httpx

    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def client(url):
    """The `openai` client of the module's server (the module's `url` fixture)."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
