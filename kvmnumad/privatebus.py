"""A private dbus-daemon that kvmnumad starts for itself, and the one config of every private bus.

The embedded default of ``kvmnumad`` (and of ``make run``): a developer gets a
working bus with the project's policy without touching the system bus.  It is
a real dbus-daemon, so busctl, gdbus and d-feet talk to it exactly as they
would to the system bus.

The test fixtures start their buses from the same :func:`bus_config`, so what
the tests prove about the policy holds for ``make run`` too.  The config is
the system bus's default policy (deny owning and calling unless a policy file
allows it) plus the project's own ``org.kvmnuma1.conf``: only root may own
org.kvmnuma1, anyone may call it, and nobody may eavesdrop.  Others may
connect (the socket's directory is world-readable), so a bus that let anyone
own the name would let any local user stand in for the daemon before it
starts and answer root's busctl.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

POLICY_NAME = "org.kvmnuma1.conf"
# First match wins: a source checkout's own copy (it matches the code that
# runs), then where the packages install it (packaging/debian/install, the rpm spec).
POLICY_PLACES = (
    Path(__file__).resolve().parent.parent / "dbus" / POLICY_NAME,
    Path("/usr/share/dbus-1/system.d") / POLICY_NAME,
)

CONFIG_TEMPLATE = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <!-- No servicedir: nothing is bus-activated, a call to a name nobody owns fails at once. -->
  <policy context="default">
    <!-- Anyone may connect (others call kvmnumad as they would on the system bus). -->
    <allow user="*"/>
    <!-- The system bus's defaults: holes for names and method calls come from policy files. -->
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Debug.Stats"/>
  </policy>
  <!-- busctl monitor and dbus-monitor (BecomeMonitor) for root, as on the system bus: debugging
       the bus needs it, and the bus grants BecomeMonitor only to root or its own uid anyway.
       Nobody gets an eavesdrop rule: a monitor sees everything, an eavesdropper nothing extra. -->
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
{policy}{owner}</busconfig>
"""

# A bus started by someone other than root (kvmnumad --bus private as a user of the
# kvm group) is that user's own: it gets what the project's policy gives root there.
_OWNER_POLICY = """  <!-- This bus belongs to the uid that started it, which runs kvmnumad on it. -->
  <policy user={user}>
    <allow own="org.kvmnuma1"/>
    <allow send_destination="org.kvmnuma1"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
"""


def find_policy() -> Path:
    """Without the project's policy nobody may own org.kvmnuma1 on the bus,
    so a missing file is an error here, not a daemon that fails later."""
    for place in POLICY_PLACES:
        if place.is_file():
            return place
    raise FileNotFoundError(f"D-Bus policy {POLICY_NAME} not found in: {', '.join(map(str, POLICY_PLACES))}")


def bus_config(socket: Path, policy: Path | None, owner_uid: int | None = None) -> str:
    """``policy`` None leaves the project's policy out (a bus on which the
    service cannot start); ``owner_uid`` defaults to the calling process's."""
    uid = os.getuid() if owner_uid is None else owner_uid
    include = f"  <include>{escape(str(policy))}</include>\n" if policy is not None else ""
    owner = ""
    if uid != 0:
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:  # a uid without a passwd entry: dbus-daemon takes the number too
            user = str(uid)
        owner = _OWNER_POLICY.format(user=quoteattr(user))
    return CONFIG_TEMPLATE.format(socket=escape(str(socket)), policy=include, owner=owner)


class PrivateBus:
    """Owns one dbus-daemon process and its directory; ``close()`` ends both."""

    def __init__(self, directory: Path | None = None, policy: Path | None = None) -> None:
        self._own_dir = directory is None
        self.dir = Path(tempfile.mkdtemp(prefix="kvmnumad-bus-")) if directory is None else directory
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._own_dir:
            self.dir.chmod(0o755)  # mkdtemp's 0700 would keep out the callers the policy lets in
        self.socket = self.dir / "bus.sock"
        if self.socket.exists():
            self.socket.unlink()
        config = self.dir / "bus.conf"
        config.write_text(bus_config(self.socket, policy or find_policy()))
        out = subprocess.run(
            ["dbus-daemon", f"--config-file={config}", "--fork", "--print-address=1", "--print-pid=2"],
            check=True, capture_output=True, text=True,
        )
        self.address = out.stdout.strip().splitlines()[0]
        self.pid = int(out.stderr.strip().splitlines()[-1])

    @classmethod
    def adopt(cls, address: str, pid: int, directory: str) -> PrivateBus:
        """The bus an earlier exec of this daemon started (Reexec): served on
        again, and closed by this process in the end, as if it had made it."""
        bus = cls.__new__(cls)
        bus._own_dir = True
        bus.dir = Path(directory)
        bus.socket = bus.dir / "bus.sock"
        bus.address = address
        bus.pid = pid
        return bus

    def describe(self) -> dict[str, str | int]:
        """What adopt() needs."""
        return {"address": self.address, "pid": self.pid, "directory": str(self.dir)}

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
