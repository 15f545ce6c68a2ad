"""Sample text from Grok-1: `python run.py --prompt "..."` (see `--help`).

The same command as `grok-run` and `python -m grok`, for a checkout that is not installed.
"""

import sys

try:
    from grok.cli import main
except ModuleNotFoundError as e:  # started outside the environment that has JAX
    sys.exit(f"error: {e.name} is not installed for {sys.executable}: activate the project's "
             f"virtual environment (. .venv/bin/activate) or install the project "
             f"(pip install -e .) first")

if __name__ == "__main__":
    sys.exit(main())
