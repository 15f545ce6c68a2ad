"""`python -m grok`: the command line (see `python -m grok --help`)."""

import sys

from grok.cli import main

if __name__ == "__main__":
    sys.exit(main())
