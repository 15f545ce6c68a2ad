"""Grok-1 inference in JAX and Haiku."""

__version__ = "0.1.0"  # the package's one version number (pyproject.toml reads it)

from grok.api import Grok
from grok.config import GROK_1, NANO, PRESETS, TINY, GrokConfig
from grok.errors import CheckpointError, GrokError
from grok.quant import QuantizedWeight4bit, QuantizedWeight8bit, dequantize, quantize, quantize4

__all__ = [
    "GROK_1",
    "NANO",
    "PRESETS",
    "TINY",
    "CheckpointError",
    "Grok",
    "GrokConfig",
    "GrokError",
    "QuantizedWeight4bit",
    "QuantizedWeight8bit",
    "__version__",
    "dequantize",
    "quantize",
    "quantize4",
]
