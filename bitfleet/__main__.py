"""`python -m bitfleet ...`, the same as the `bitfleet` command (used to spawn agents)."""

import sys

from bitfleet.cli.main import main

sys.exit(main())
