"""A private dbus-daemon that kvmnumad starts for itself.

The embedded default of ``kvmnumad`` (and of ``make run``): a developer gets a
working bus with the project's policy without touching the system bus.  It is
a real dbus-daemon, so busctl, gdbus and d-feet talk to it exactly as they
would to the system bus.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
    <allow user="*"/>
  </policy>
</busconfig>
"""


class PrivateBus:
    """Owns one dbus-daemon process and its directory; ``close()`` ends both."""

    def __init__(self, directory: Path | None = None) -> None:
        self._own_dir = directory is None
        self.dir = Path(tempfile.mkdtemp(prefix="kvmnumad-bus-")) if directory is None else directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = self.dir / "bus.sock"
        if self.socket.exists():
            self.socket.unlink()
        config = self.dir / "bus.conf"
        config.write_text(CONFIG.format(socket=self.socket))
        out = subprocess.run(
            ["dbus-daemon", f"--config-file={config}", "--fork", "--print-address=1", "--print-pid=2"],
            check=True, capture_output=True, text=True,
        )
        self.address = out.stdout.strip().splitlines()[0]
        self.pid = int(out.stderr.strip().splitlines()[-1])

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        elif self.socket.exists():
            self.socket.unlink()

    def __enter__(self) -> PrivateBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
