"""Parity with logits that xAI's own code computed for the upstream-tiny fixture
(tolerances: see helpers.py)."""

import json

import numpy as np
import pytest
from helpers import assert_matches_reference

from grok import Grok


@pytest.fixture(scope="module")
def reference(fixture_dir):
    ref = json.loads((fixture_dir / "reference.json").read_text())
    return np.asarray(ref["tokens"]), np.load(fixture_dir / "reference_logits.npy")


# Two meshes in the quick run; the rest with the slow tests.
MESHES = [(1, 1), (1, 8), *(pytest.param(m, marks=pytest.mark.slow)
                            for m in [(2, 4), (8, 1), (1, 2)])]


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_fixture_logits_on_mesh(fixture_dir, reference, mesh_shape):
    tokens, want = reference
    grok = Grok.load(fixture_dir, fixture_dir / "config.json", mesh_shape=mesh_shape)
    got = grok.logits(tokens)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert_matches_reference(got, want)


def test_batch_rows_match_single_rows(fixture_dir, reference):
    """Batch 3 on a data axis of 2 (so one padding row is added inside): each row gives the
    logits it gives alone. The release's batch > 1 is wrong; ours must not be."""
    tokens, want = reference
    grok = Grok.load(fixture_dir / "ckpt-0", "tiny", mesh_shape=(2, 4))
    rng = np.random.default_rng(0)
    batch = np.stack([tokens[0], rng.integers(3, 4096, tokens.shape[1]), tokens[0][::-1]])
    together = grok.logits(batch)
    assert_matches_reference(together[:1], want)
    for i, row in enumerate(batch):
        alone = grok.logits(row[None])
        # Same computation per row; only the dot's blocking may differ with the batch size,
        # which moves a bf16 logit by at most a couple of 1/32 steps.
        np.testing.assert_allclose(together[i], alone[0], atol=2 / 32, rtol=0)


def test_default_mesh_uses_every_device(fixture_dir):
    grok = Grok.load(fixture_dir, "tiny")
    assert dict(grok.mesh.shape) == {"data": 1, "model": 8}


@pytest.mark.parametrize("mesh_shape, message", [
    ((4, 4), "needs 16 devices, but only 8"),
    ((1, 3), "num_q_heads=16 cannot be split over a model axis of 3"),
    ((0, 2), "mesh_shape must be two positive integers"),
])
def test_bad_mesh_is_a_clear_error(fixture_dir, mesh_shape, message):
    with pytest.raises(ValueError, match=message):
        Grok.load(fixture_dir, "tiny", mesh_shape=mesh_shape)


@pytest.mark.parametrize("tokens, message", [
    ([[1, 2, 4096]], r"token id 4096 is outside \[0, vocab_size=4096\)"),
    ([[1, -1]], r"token id -1 is outside"),
    ([[]], "non-empty"),
    ([1, 2, 3], "non-empty \\[batch, time\\] array"),
    ([[1.5, 2.0]], "must be integers"),
    ([[1] * 257], "257 tokens exceed the context of sequence_len=256"),
])
def test_bad_tokens_are_clear_errors(fixture_dir, tokens, message):
    grok = Grok.load(fixture_dir, "tiny", mesh_shape=(1, 1))
    with pytest.raises(ValueError, match=message):
        grok.logits(tokens)
