"""Run inside the NUMA guest by tests/numa_guest/guest-run.sh (its ``*.py`` form):
``python -m bench ARGS`` from the repository, so that bench.guest gets the
launcher's freeze watch, heartbeat and console file instead of a boot loop of its own."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
os.chdir(REPO)
sys.path.insert(0, str(REPO))

from bench.__main__ import main  # noqa: E402  (after the path is set)

sys.exit(main(sys.argv[1:]))
