"""Sample text from Grok-1: `python run.py --prompt "..."` (see `--help`)."""

import sys

from grok.cli import main

if __name__ == "__main__":
    sys.exit(main())
