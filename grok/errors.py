"""The project's own exception types.

Everything a user can get wrong (a request, a setting, a flag, a file) raises a `GrokError`,
a `ValueError` subclass: callers tell "the input was wrong" (HTTP 400, exit code 2) apart
from a bug or a failing machine (HTTP 500, a traceback) by this type alone.
"""

from __future__ import annotations


class GrokError(ValueError):
    """A mistake in what the user gave: a request, a setting, a flag or a file."""


class CheckpointError(GrokError):
    """A checkpoint file that is missing, damaged, hostile or does not fit the model."""
