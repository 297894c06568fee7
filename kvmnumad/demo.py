"""``make run``: the daemon on its own private bus with a demo VM."""

import sys

from kvmnumad.daemon import main

if __name__ == "__main__":
    sys.exit(main(["--bus", "private", "--demo", *sys.argv[1:]]))
