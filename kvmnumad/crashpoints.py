"""A test hook: the daemon SIGKILLs itself at a named point of a change.

Inert unless the daemon starts with ``KVMNUMAD_CRASH_FILE`` set (tests do,
systemd's unit never does): then each point stats that file, and when it
holds the point's name the daemon removes it (one shot: the restarted daemon
runs through) and kills itself with SIGKILL, which no handler sees.  A test
arms a point by writing its name, makes the call that passes it, and checks
from outside what the next start finds (tests/test_crash_points.py).  Points
sit at the edges of a change's commit (the state file's rename or unlink), so
what a kill there leaves is known: before the commit, the old VM or none;
after it, the new one.
"""

from __future__ import annotations

import os
import signal

ENV = "KVMNUMAD_CRASH_FILE"
_FILE = os.environ.get(ENV) or None  # read once: the hook is the starter's choice, not a caller's

POINTS = frozenset({
    "create.planned",  # admitted and placed, no kernel object made yet
    "create.built",  # VM made, set up and running, not on the API, no state file
    "destroy.unlisted",  # off the API, nothing released, state file on disk
    "destroy.released",  # threads ended and fds closed, state file still on disk
    "restore.restored",  # a saved VM is back, the next ones not yet
    "migrate.moved",  # a guest node's memory moved, the new node map not yet saved
    "state.written",  # a new definition written and fsynced beside the old, not renamed over it
    "persist.saved",  # a definition committed (renamed into place), the call not answered
    "persist.removed",  # a definition removed (unlinked, directory fsynced), the call not answered
})


def reached(point: str) -> None:
    """Die here if the armed point is ``point`` (see the module docstring)."""
    if _FILE is None:
        return
    try:
        with open(_FILE) as f:
            armed = f.read().strip()
    except FileNotFoundError:
        return
    if armed != point:
        return
    os.unlink(_FILE)
    os.kill(os.getpid(), signal.SIGKILL)
