"""``python -m kvmnumad.cli``: kvmnumactl without the installed script (the tests run it so)."""

import sys

from kvmnumad.cli import main

sys.exit(main())
