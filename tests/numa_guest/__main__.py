"""``python -m tests.numa_guest --topology 2node``: see launcher.py."""

import sys

from .launcher import main

sys.exit(main())
