"""Test setup: eight simulated CPU devices, so every mesh test runs on any machine.

XLA reads the device count once, at backend start, so it is set before jax is imported.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
