"""Grok-1 inference in JAX and Haiku."""

from grok.api import Grok
from grok.config import GROK_1, NANO, PRESETS, TINY, GrokConfig
from grok.quant import QuantizedWeight8bit, dequantize, quantize

__all__ = [
    "GROK_1",
    "NANO",
    "PRESETS",
    "TINY",
    "Grok",
    "GrokConfig",
    "QuantizedWeight8bit",
    "dequantize",
    "quantize",
]
