"""`python -m bitfleet ...`, the same as the `bitfleet` command (used to spawn agents)."""

import sys

from bitfleet.cli.main import main

if __name__ == "__main__":  # not when a spawned worker process imports this module
    sys.exit(main())
