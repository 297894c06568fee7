"""Fixtures that start the real system services kvmnumad talks to (we are root).

Load them as a plugin from a test module (or from conftest.py)::

    pytest_plugins = ["tests.sysfixtures"]

``system_bus`` (session): a dbus-daemon with the distribution's own
    /usr/share/dbus-1/system.conf (so the system policy applies: deny own,
    deny method calls unless a policy file punches a hole), listening on
    ``unix:path=<tmp>/sock`` and including the project's dbus/org.kvmnuma1.conf.
    Gives a ``SystemBus``: ``.address``, ``.env()`` (adds DBUS_SYSTEM_BUS_ADDRESS,
    which sd-bus, GDBus and polkitd follow), ``.busctl(*args, user=None)``.
    ``fresh_system_bus`` (function scope) is the same, for one test alone.
    Bus activation is off (an empty service dir), so a call to a name nobody
    owns fails at once instead of launching an installed kvmnumad.
``polkitd`` (session): /usr/lib/polkit-1/polkitd on that bus, with
    dbus/org.kvmnuma1.policy installed into /usr/share/polkit-1/actions for the
    session (an existing file is restored at teardown).  Gives a ``Polkitd``:
    ``.grant(group, *action_ids)`` writes a rules file in /etc/polkit-1/rules.d
    and waits until polkitd answers by it (pkcheck for a member's process); a
    context manager: on exit the file is removed and the block ends once
    polkitd answers without it.  Unprivileged callers get "no" from the policy defaults
    (no logind here, so no active session).
``journald`` (session): the systemd-journald already serving
    /run/systemd/journal/socket, or one started here and stopped at teardown.
    Gives a ``Journal`` with ``.entries(*matches, wait_for=1)`` -> list of
    ``journalctl -o json`` dicts.
``restore_logging``: puts the root logger's handlers and level back after a
    test that called kvmnumad.journal.setup_logging.
``unpriv_user`` (session): a fresh user without home (``useradd -M -U``) and
    its private group; ``.run(*cmd)`` runs a command as that user through
    runuser.  Deleted at teardown.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
BUS_POLICY = ROOT / "dbus" / "org.kvmnuma1.conf"
POLKIT_POLICY = ROOT / "dbus" / "org.kvmnuma1.policy"
POLKIT_ACTIONS_DIR = Path("/usr/share/polkit-1/actions")
POLKIT_RULES_DIR = Path("/etc/polkit-1/rules.d")
JOURNAL_SOCKET = "/run/systemd/journal/socket"


def _terminate(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after 5 s; always reaped."""
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _kill(pid: int, timeout: float = 5.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            # A forked daemon is not our child: once it is a zombie it is gone for us.
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except (FileNotFoundError, ProcessLookupError):
            return
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# --- users -----------------------------------------------------------------------------------------


@dataclass
class User:
    name: str
    uid: int
    gid: int

    @property
    def group(self) -> str:
        return self.name  # useradd -U: the user's private group has its name

    def run(self, *cmd: str, env: dict[str, str] | None = None, check: bool = False,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` as this user (runuser -u), environment cleared to ``env``."""
        prefix = ["runuser", "-u", self.name, "--", "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
        prefix += [f"{k}={v}" for k, v in (env or {}).items()]
        return subprocess.run([*prefix, *cmd], capture_output=True, text=True, check=check, timeout=timeout)


@pytest.fixture(scope="session")
def unpriv_user() -> Iterator[User]:
    name = "kvmnt" + secrets.token_hex(4)
    subprocess.run(["useradd", "-M", "-U", "-s", "/usr/sbin/nologin", name], check=True)
    try:
        pw = pwd.getpwnam(name)
        yield User(name, pw.pw_uid, pw.pw_gid)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)
        subprocess.run(["groupdel", name], check=False, capture_output=True)


# --- the system-like bus ---------------------------------------------------------------------------


@dataclass
class SystemBus:
    directory: Path
    pid: int
    address: str

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["DBUS_SYSTEM_BUS_ADDRESS"] = self.address
        return env

    def busctl(self, *args: str, user: User | None = None, check: bool = False,
               timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """``busctl --address=<bus> ARGS`` as root or as ``user``."""
        cmd = ["busctl", f"--address={self.address}", *args]
        if user is not None:
            return user.run(*cmd, check=check, timeout=timeout)
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout)

    def has_owner(self, name: str) -> bool:
        out = self.busctl("call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                          "NameHasOwner", "s", name)
        return out.stdout.strip() == "b true"


def system_bus_config(directory: Path, extra_policies: list[Path]) -> str:
    """The distribution's system.conf, moved to ``directory`` and with the project's policies."""
    text = Path("/usr/share/dbus-1/system.conf").read_text()
    text = re.sub(r"<listen>.*?</listen>", f"<listen>unix:path={directory}/sock</listen>", text)
    text = re.sub(r"<pidfile>.*?</pidfile>", "", text)
    # A relative includedir is resolved against the config file: pin it to the real one.
    text = text.replace("<includedir>system.d</includedir>",
                        "<includedir>/usr/share/dbus-1/system.d</includedir>")
    text = text.replace("<standard_system_servicedirs/>", f"<servicedir>{directory}/services</servicedir>")
    system_d = directory / "system.d"
    system_d.mkdir(exist_ok=True)
    (directory / "services").mkdir(exist_ok=True)
    for policy in extra_policies:
        shutil.copy(policy, system_d / policy.name)
    return text.replace("</busconfig>", f"  <includedir>{system_d}</includedir>\n</busconfig>")


@contextlib.contextmanager
def start_system_bus(extra_policies: list[Path] | None = None) -> Iterator[SystemBus]:
    """A system-like dbus-daemon for the duration of the block (see the module docstring)."""
    directory = Path(tempfile.mkdtemp(prefix="kvmnuma-sysbus-"))
    directory.chmod(0o755)  # the bus drops to messagebus; unprivileged clients reach the socket
    try:
        config = directory / "system.conf"
        config.write_text(system_bus_config(directory, [BUS_POLICY] if extra_policies is None
                                            else extra_policies))
        out = subprocess.run(["dbus-daemon", f"--config-file={config}", "--fork", "--print-pid=1"],
                             check=True, capture_output=True, text=True, timeout=30)
        pid = int(out.stdout.split()[0])
        try:
            yield SystemBus(directory, pid, f"unix:path={directory}/sock")
        finally:
            _kill(pid)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def system_bus() -> Iterator[SystemBus]:
    with start_system_bus() as bus:
        yield bus


@pytest.fixture
def fresh_system_bus() -> Iterator[SystemBus]:
    """A system-like bus of its own for one test (nothing else, no polkitd, on it)."""
    with start_system_bus() as bus:
        yield bus


# --- polkitd ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def installed_file(source: Path, target: Path, mode: int = 0o644) -> Iterator[Path]:
    """Put ``source`` at ``target`` for the block; restore what was there before."""
    previous = target.read_bytes() if target.exists() else None
    if previous != source.read_bytes():
        shutil.copy(source, target)
        target.chmod(mode)
    try:
        yield target
    finally:
        if previous is None:
            target.unlink(missing_ok=True)
        elif previous != source.read_bytes():
            target.write_bytes(previous)


@dataclass
class Polkitd:
    bus: SystemBus
    pid: int
    rules: list[Path] = field(default_factory=list)

    def check(self, subject_pid: int, action_id: str) -> bool:
        """pkcheck for a process (as a cross-check of the daemon's own CheckAuthorization)."""
        out = subprocess.run(["pkcheck", "--action-id", action_id, "--process", str(subject_pid)],
                             check=False, env=self.bus.env(), capture_output=True, text=True,
                             timeout=30)
        return out.returncode == 0

    @contextlib.contextmanager
    def grant(self, group: str, *action_ids: str,
              probe: Callable[[], object] | None = None) -> Iterator[Path]:
        """A rules file saying YES to ``action_ids`` for members of ``group``, for the block.

        polkitd re-reads its rules on an inotify event, in its own time.  A
        process of an unprivileged member of ``group`` is kept for the block, and
        pkcheck asked about it: the block starts once polkitd says yes to every
        action (and ``probe()``, if given, holds too), and ends once polkitd says
        no to every one again, so the next test meets the rules as they were.
        """
        member = _unprivileged_member(group)
        holder = subprocess.Popen(["sleep", "infinity"], user=member.pw_uid, group=member.pw_gid,
                                  extra_groups=os.getgrouplist(member.pw_name, member.pw_gid),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        ids = json.dumps(list(action_ids))
        rule = POLKIT_RULES_DIR / f"60-kvmnuma-test-{group}.rules"
        try:
            rule.write_text(
                "polkit.addRule(function(action, subject) {\n"
                f"    if ({ids}.indexOf(action.id) >= 0 && subject.isInGroup({json.dumps(group)}))\n"
                "        return polkit.Result.YES;\n"
                "});\n"
            )
            shutil.chown(rule, "polkitd", "root")
            rule.chmod(0o644)
            try:
                wait_until(lambda: all(self.check(holder.pid, a) for a in action_ids),
                           f"polkitd to load {rule} (pkcheck says yes to {ids} for {member.pw_name})",
                           timeout=10, interval=0.2)
                if probe is not None:
                    wait_until(probe, f"the grant of {rule} to show through the probe",
                               timeout=10, interval=0.2)
                yield rule
            finally:
                rule.unlink(missing_ok=True)
                wait_until(lambda: not any(self.check(holder.pid, a) for a in action_ids),
                           f"polkitd to drop {rule} (pkcheck says no to {ids} for {member.pw_name})",
                           timeout=10, interval=0.2)
        finally:
            holder.kill()
            holder.wait()


def _unprivileged_member(group: str) -> pwd.struct_passwd:
    """A user other than root whose groups (as polkit computes them) include ``group``."""
    gid = grp.getgrnam(group).gr_gid
    for user in pwd.getpwall():
        if user.pw_uid != 0 and gid in os.getgrouplist(user.pw_name, user.pw_gid):
            return user
    raise LookupError(f"group {group} has no unprivileged member to ask polkit about")


@pytest.fixture(scope="session")
def polkitd(system_bus: SystemBus) -> Iterator[Polkitd]:
    with installed_file(POLKIT_POLICY, POLKIT_ACTIONS_DIR / POLKIT_POLICY.name):
        proc = subprocess.Popen(["/usr/lib/polkit-1/polkitd", "--no-debug"], env=system_bus.env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_until(lambda: system_bus.has_owner("org.freedesktop.PolicyKit1") or proc.poll() is not None,
                       "polkitd on the bus", timeout=20)
            if proc.poll() is not None:
                raise RuntimeError(f"polkitd exited with {proc.returncode}")
            yield Polkitd(system_bus, proc.pid)
        finally:
            _terminate(proc)


# --- journald --------------------------------------------------------------------------------------


def journal_listening() -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(JOURNAL_SOCKET)
        except OSError:
            return False
    return True


@dataclass
class Journal:
    started_here: bool

    def entries(self, *matches: str, wait_for: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
        """``journalctl -o json MATCH...`` entries, polled until at least ``wait_for`` are there."""

        def read() -> list[dict[str, Any]]:
            out = subprocess.run(["journalctl", "--no-pager", "-o", "json", *matches],
                                 check=False, capture_output=True, text=True, timeout=30)
            return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]

        found: list[dict[str, Any]] = []

        def enough() -> bool:
            nonlocal found
            found = read()
            return len(found) >= wait_for

        if wait_for:
            wait_until(enough, f"{wait_for} journal entries for {matches}", timeout=timeout, interval=0.1)
        else:
            found = read()
        return found


@pytest.fixture(scope="session")
def journald() -> Iterator[Journal]:
    if journal_listening():
        yield Journal(started_here=False)
        return
    Path("/run/systemd/journal").mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["/lib/systemd/systemd-journald"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: journal_listening() or proc.poll() is not None, "systemd-journald's socket",
                   timeout=10)
        if proc.poll() is not None:
            raise RuntimeError(f"systemd-journald exited with {proc.returncode}")
        yield Journal(started_here=True)
    finally:
        _terminate(proc)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
