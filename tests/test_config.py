"""GrokConfig: the release's constants, JSON I/O and validation."""

import dataclasses
import json
import math

import pytest

from grok.config import GROK_1, NANO, PRESETS, TINY, GrokConfig, ffn_size, resolve_config


def test_grok1_matches_spec_constants():
    c = GROK_1
    assert c.vocab_size == 131072 == 128 * 1024
    assert (c.pad_token, c.eos_token) == (0, 2)
    assert c.sequence_len == 8192
    assert c.emb_size == 6144 == c.num_q_heads * c.key_size
    assert (c.num_q_heads, c.num_kv_heads, c.key_size) == (48, 8, 128)
    assert c.q_per_kv == 6
    assert c.num_layers == 64
    assert (c.num_experts, c.num_selected_experts) == (8, 2)
    assert c.widening_factor == 8
    assert c.ffn_size == 32768
    # Multipliers are compared exactly: they are the release's float literals.
    assert c.embedding_multiplier_scale == 78.38367176906169
    assert c.output_multiplier_scale == 0.5773502691896257
    assert c.attn_output_multiplier == pytest.approx(0.08838834764831845, rel=1e-15)
    assert c.attn_output_multiplier == pytest.approx(1 / math.sqrt(128), rel=1e-15)


@pytest.mark.parametrize("d, w, expected", [
    (6144, 8, 32768),  # 49152 * 2 // 3 = 32768, already a multiple of 8
    (256, 8, 1368),  # 2048 * 2 // 3 = 1365 -> rounded up to 1368
    (32, 2, 48),  # 64 * 2 // 3 = 42 -> 48 (NANO)
    (24, 1, 16),  # 24 * 2 // 3 = 16 exactly
])
def test_ffn_size_formula(d, w, expected):
    assert ffn_size(d, w) == expected
    assert expected % 8 == 0


def test_tiny_and_nano_are_consistent():
    assert TINY.ffn_size == 1368
    assert TINY.attn_output_multiplier == 0.25
    assert NANO.ffn_size == 48
    assert NANO.q_per_kv == 2
    assert PRESETS == {"grok-1": GROK_1, "tiny": TINY, "nano": NANO}


def test_from_json_fixture_equals_tiny(fixture_dir):
    assert GrokConfig.from_json(fixture_dir / "config.json") == TINY


@pytest.mark.parametrize("config", [GROK_1, TINY, NANO])
def test_json_round_trip(config, tmp_path):
    path = tmp_path / "config.json"
    text = config.to_json(path)
    assert path.read_text() == text
    assert json.loads(text) == dataclasses.asdict(config)
    back = GrokConfig.from_json(path)
    assert back == config
    # floats survive exactly through JSON
    assert back.embedding_multiplier_scale == config.embedding_multiplier_scale
    assert back.attn_output_multiplier == config.attn_output_multiplier


def _write(tmp_path, values, name="c.json"):
    path = tmp_path / name
    path.write_text(json.dumps(values))
    return path


def _tiny_dict(**changes):
    values = dataclasses.asdict(TINY)
    values.update(changes)
    return values


def test_unknown_key_rejected(tmp_path):
    path = _write(tmp_path, _tiny_dict(num_heads=4))
    with pytest.raises(ValueError, match="num_heads"):
        GrokConfig.from_json(path)


def test_missing_key_rejected(tmp_path):
    values = _tiny_dict()
    del values["num_kv_heads"]
    path = _write(tmp_path, values)
    with pytest.raises(ValueError, match=r"missing.*num_kv_heads"):
        GrokConfig.from_json(path)


def test_json_not_an_object_rejected(tmp_path):
    path = _write(tmp_path, [1, 2, 3])
    with pytest.raises(ValueError, match="JSON object"):
        GrokConfig.from_json(path)


@pytest.mark.parametrize("changes, field", [
    (dict(emb_size=255), "emb_size"),
    (dict(key_size=32), "emb_size"),  # 16 * 32 != 256
    (dict(num_kv_heads=3), "num_kv_heads"),  # 16 % 3 != 0
    (dict(emb_size=16 * 15, key_size=15), "key_size"),  # odd head width
    (dict(num_selected_experts=9), "num_selected_experts"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(num_layers=-1), "num_layers"),
    (dict(num_experts=0), "num_experts"),
    (dict(sequence_len=0), "sequence_len"),
    (dict(num_layers=2.0), "num_layers"),  # not an integer
    (dict(num_layers=True), "num_layers"),  # a bool is no size
    (dict(widening_factor=0), "widening_factor"),
    (dict(embedding_multiplier_scale=-1.0), "embedding_multiplier_scale"),
    (dict(output_multiplier_scale=float("inf")), "output_multiplier_scale"),
    (dict(attn_output_multiplier=0.0), "attn_output_multiplier"),
    (dict(pad_token=4096), "pad_token"),
    (dict(eos_token=-1), "eos_token"),
    (dict(eos_token=5000), "eos_token"),
])
def test_invalid_values_rejected(changes, field, tmp_path):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **changes)
    if all(math.isfinite(v) for v in changes.values()):  # JSON has no inf
        path = _write(tmp_path, _tiny_dict(**changes))
        with pytest.raises(ValueError, match=field):
            GrokConfig.from_json(path)


def test_non_json_file_rejected(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("vocab_size: 4096\n")
    with pytest.raises(ValueError, match=r"bad\.json.*not valid JSON"):
        GrokConfig.from_json(path)


def test_missing_file_rejected(tmp_path):
    path = tmp_path / "nowhere.json"
    with pytest.raises(ValueError, match=r"nowhere\.json.*does not exist"):
        GrokConfig.from_json(path)


def test_resolve_config(tmp_path):
    assert resolve_config("grok-1") is GROK_1
    assert resolve_config("tiny") is TINY
    assert resolve_config("nano") is NANO
    custom = dataclasses.replace(NANO, num_layers=1)
    assert resolve_config(custom) is custom
    path = tmp_path / "custom.json"
    custom.to_json(path)
    assert resolve_config(path) == custom  # os.PathLike
    assert resolve_config(str(path)) == custom  # str path
    with pytest.raises(ValueError, match="grok-2"):
        resolve_config("grok-2")
    with pytest.raises(ValueError, match="preset"):
        resolve_config(str(tmp_path / "absent.json"))
