"""``python -m kvmnumad``: the daemon."""

import sys

from kvmnumad.daemon import main

sys.exit(main())
