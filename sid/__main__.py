"""``python -m sid``: the ``sid`` command where the console script is not on PATH (see sid/cli.py)."""

import sys

from sid.cli import main

if __name__ == "__main__":
    sys.exit(main())
