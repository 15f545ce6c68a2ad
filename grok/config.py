"""Model configuration: the release's hyperparameters, validated, with named presets.

Field names follow the release's `TransformerConfig`/`LanguageModelConfig`, so a flat JSON
object written for the release (or `../shared/fixtures/upstream-tiny/config.json`) reads
unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from grok.errors import GrokError

# RMSNorm epsilon and RoPE base used throughout the release.
RMS_NORM_EPS = 1e-5
ROPE_BASE = 10_000
# Attention logits are soft-capped to (-30, 30) with 30 * tanh(x / 30).
ATTN_SOFT_CAP = 30.0


def ffn_size(emb_size: int, widening_factor: float) -> int:
    """Expert hidden width: two thirds of `widening_factor * emb_size` (the GLU convention),
    rounded up to a multiple of 8, as the release computes it (6144, 8 -> 32768)."""
    size = int(widening_factor * emb_size) * 2 // 3
    return size + (-size) % 8


@dataclasses.dataclass(frozen=True)
class GrokConfig:
    """Hyperparameters of a Grok-1-architecture model."""

    vocab_size: int
    pad_token: int
    eos_token: int
    sequence_len: int
    embedding_multiplier_scale: float
    output_multiplier_scale: float
    emb_size: int
    widening_factor: float
    key_size: int
    num_q_heads: int
    num_kv_heads: int
    num_layers: int
    attn_output_multiplier: float
    num_experts: int
    num_selected_experts: int

    def __post_init__(self):
        self._validate()

    @property
    def ffn_size(self) -> int:
        return ffn_size(self.emb_size, self.widening_factor)

    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one key/value head (6 for Grok-1)."""
        return self.num_q_heads // self.num_kv_heads

    def _validate(self) -> None:
        for name in ("vocab_size", "sequence_len", "emb_size", "key_size", "num_q_heads",
                     "num_kv_heads", "num_layers", "num_experts", "num_selected_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise GrokError(f"GrokConfig.{name} must be a positive integer, got {value!r}")
        for name in ("pad_token", "eos_token"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise GrokError(f"GrokConfig.{name} must be an integer, got {value!r}")
            if not 0 <= value < self.vocab_size:
                raise GrokError(
                    f"GrokConfig.{name}={value} must lie in [0, vocab_size={self.vocab_size})")
        for name in ("embedding_multiplier_scale", "output_multiplier_scale",
                     "attn_output_multiplier", "widening_factor"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value <= 0):
                raise GrokError(f"GrokConfig.{name} must be a positive number, got {value!r}")
        if self.emb_size != self.num_q_heads * self.key_size:
            raise GrokError(
                f"GrokConfig: emb_size={self.emb_size} must equal num_q_heads * key_size = "
                f"{self.num_q_heads} * {self.key_size} = {self.num_q_heads * self.key_size}")
        if self.num_q_heads % self.num_kv_heads:
            raise GrokError(
                f"GrokConfig: num_q_heads={self.num_q_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads} (grouped-query attention)")
        if self.key_size % 2:
            raise GrokError(
                f"GrokConfig: key_size={self.key_size} must be even (RoPE rotates half-pairs)")
        if self.num_selected_experts > self.num_experts:
            raise GrokError(
                f"GrokConfig: num_selected_experts={self.num_selected_experts} must be at most "
                f"num_experts={self.num_experts}")
        if self.ffn_size <= 0:
            raise GrokError(
                f"GrokConfig: widening_factor={self.widening_factor} with emb_size="
                f"{self.emb_size} gives an empty expert width")

    def check_tokens(self, tokens) -> np.ndarray:
        """Token ids as an int32 [B, T] array, or a ValueError saying what is wrong."""
        arr = np.asarray(tokens)
        if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise GrokError(f"tokens must be a non-empty [batch, time] array, "
                             f"got shape {list(arr.shape)}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise GrokError(f"tokens must be integers, got dtype {arr.dtype}")
        bad = (arr < 0) | (arr >= self.vocab_size)
        if bad.any():
            raise GrokError(f"token id {arr[bad][0]} is outside [0, vocab_size="
                             f"{self.vocab_size})")
        if arr.shape[1] > self.sequence_len:
            raise GrokError(f"{arr.shape[1]} tokens exceed the context of "
                             f"sequence_len={self.sequence_len}")
        return arr.astype(np.int32)

    # --- JSON ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "config") -> GrokConfig:
        if not isinstance(values, dict):
            raise GrokError(f"{source}: expected a JSON object, got {type(values).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        missing = [n for n in names if n not in values]
        if unknown:
            raise GrokError(f"{source}: unknown config key(s) {unknown}; expected {names}")
        if missing:
            raise GrokError(f"{source}: missing config key(s) {missing}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> GrokConfig:
        try:
            with open(path) as f:
                values = json.load(f)
        except FileNotFoundError:
            raise GrokError(f"config file {os.fspath(path)!r} does not exist") from None
        except json.JSONDecodeError as e:
            raise GrokError(f"config file {os.fspath(path)!r} is not valid JSON: {e}") from None
        return cls.from_dict(values, source=f"config file {os.fspath(path)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """Returns the flat JSON object; also writes it to `path` when one is given."""
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text


GROK_1 = GrokConfig(
    vocab_size=128 * 1024,
    pad_token=0,
    eos_token=2,
    sequence_len=8192,
    embedding_multiplier_scale=78.38367176906169,
    output_multiplier_scale=0.5773502691896257,
    emb_size=48 * 128,
    widening_factor=8,
    key_size=128,
    num_q_heads=48,
    num_kv_heads=8,
    num_layers=64,
    attn_output_multiplier=1 / math.sqrt(128),  # 1/sqrt(key_size)
    num_experts=8,
    num_selected_experts=2,
)

# The shape ratios of the upstream-tiny fixture: 16 q heads over 8 kv heads, real multipliers.
TINY = dataclasses.replace(
    GROK_1,
    vocab_size=4096,
    sequence_len=256,
    emb_size=16 * 16,
    key_size=16,
    num_q_heads=16,
    num_kv_heads=8,
    num_layers=2,
    attn_output_multiplier=1 / math.sqrt(16),
)

# Smallest model with every part present; for fast unit tests.
NANO = dataclasses.replace(
    TINY,
    vocab_size=512,
    sequence_len=64,
    emb_size=4 * 8,
    key_size=8,
    num_q_heads=4,
    num_kv_heads=2,
    num_layers=2,
    attn_output_multiplier=1 / math.sqrt(8),
    widening_factor=2,
    num_experts=4,
)

PRESETS: dict[str, GrokConfig] = {"grok-1": GROK_1, "tiny": TINY, "nano": NANO}


def resolve_config(config: GrokConfig | str | os.PathLike) -> GrokConfig:
    """Accepts a config, a preset name, or the path of a JSON config file."""
    if isinstance(config, GrokConfig):
        return config
    if isinstance(config, str) and config in PRESETS:
        return PRESETS[config]
    if isinstance(config, (str, os.PathLike)) and os.path.exists(config):
        return GrokConfig.from_json(config)
    raise GrokError(
        f"config {config!r} is neither a preset ({', '.join(PRESETS)}) nor an existing JSON file")
