"""JAX's persistent compilation cache, on by default, so that a second start with the same
model and shapes loads its compiled steps from disk instead of compiling them again (on the
real model, minutes).

The folder is, by priority: the `--compilation-cache` flag, the `GROK_COMPILATION_CACHE`
environment variable, then `$XDG_CACHE_HOME/grok1-jax/xla` (default `~/.cache/...`). The
value `off` (flag or variable) turns the cache off.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import jax

from grok.errors import GrokError

ENV_VAR = "GROK_COMPILATION_CACHE"
OFF = "off"

_events: collections.Counter[str] = collections.Counter()


def _count(event: str, **_) -> None:
    if event.startswith("/jax/compilation_cache/"):
        _events[event.rsplit("/", 1)[1]] += 1


jax.monitoring.register_event_listener(_count)


def cache_hits() -> int:
    """Programs loaded from the persistent cache so far in this process."""
    return _events["cache_hits"]


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "grok1-jax" / "xla"


def enable(setting: str | os.PathLike | None = None) -> Path | None:
    """Turns the cache on at the folder the setting, the environment or the default names
    (see the module docstring); returns it, or None when the cache is off. Call it before
    the first compile."""
    chosen = setting if setting is not None else os.environ.get(ENV_VAR) or default_dir()
    if str(chosen).strip().lower() == OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = Path(chosen).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GrokError(f"compilation cache folder {str(path)!r} cannot be created "
                        f"({e.strerror}); pass another with --compilation-cache DIR or "
                        f"turn it off with --compilation-cache off") from None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache every program: the small ones add up over the many buckets a server warms up.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def add_argument(parser) -> None:
    parser.add_argument(
        "--compilation-cache", metavar="DIR|off",
        help=f"folder for compiled programs, reused by the next start with the same shapes "
             f"('off' to turn off; default: ${ENV_VAR}, else {default_dir()})")
