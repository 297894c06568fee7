"""Issue 13 acceptance on the host, re-exec path: guests survive `Reexec()`.

The daemon runs as `make run` runs it (its own private bus, no state
directory, no systemd).  Everything is checked from outside the daemon: the
guest's memory is read through /proc/PID/fd/N (the memfd itself), counters
through GetStats and the pages the payload writes, placement with taskset and
/proc/PID/numa_maps, leftovers by counting /proc/PID/fd and /proc/PID/task,
the name by the bus driver.  A second part plays systemd's notify socket and
fd store, which this host has not got (PID 1 is not systemd), to drive the
FDSTORE / LISTEN_FDS path of a crash and of a graceful stop.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from tests.busfixtures import BusDaemon, DaemonProcess, busctl, daemon_process, start_bus_daemon
from tests.observe import numa_maps, taskset_affinity
from tests.sysfixtures import User
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
PAGE = 4096
MANAGER = ("org.kvmnuma1", "/org/kvmnuma1", "org.kvmnuma1.Manager")
VM_IFACE = "org.kvmnuma1.VM"


def _call(address: str, member: str, signature: str = "", *args: str) -> object:
    out = busctl(address, "call", *MANAGER, member, *((signature, *args) if signature else ()))
    return out["data"] if out else None


def _get(address: str, vm: str, prop: str) -> object:
    out = busctl(address, "get-property", "org.kvmnuma1", f"/org/kvmnuma1/vm/{vm}", VM_IFACE, prop)
    return out["data"]


def _progress(address: str, vm: str) -> list[int]:
    out = busctl(address, "call", "org.kvmnuma1", f"/org/kvmnuma1/vm/{vm}", VM_IFACE, "GetStats")
    return [v[5] for v in out["data"][1]]


def _owner(address: str) -> str | None:
    out = busctl(address, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                 "GetNameOwner", "s", "org.kvmnuma1", check=False)
    if out.returncode != 0:
        return None
    return str(json.loads(out.stdout)["data"][0])


def _memfds(pid: int) -> dict[str, int]:
    """memfd name -> fd number in the daemon, from /proc/PID/fd."""
    found: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("/memfd:"):
                found[target.removeprefix("/memfd:").removesuffix(" (deleted)")] = int(fd)
    return found


def _slot_digest(pid: int, fd: int) -> str:
    h = hashlib.sha256()
    with open(f"/proc/{pid}/fd/{fd}", "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _page_counters(pid: int, fd: int) -> list[int]:
    with open(f"/proc/{pid}/fd/{fd}", "rb") as f:
        data = f.read()
    return [struct.unpack_from("<I", data, off)[0] for off in range(0, len(data), PAGE)]


def _fd_kinds(pid: int) -> Counter[str]:
    """What the daemon's fds are, numbers and inodes left out (socket:[123] -> socket;
    the sampler's /proc/PID/task/TID/schedstat -> /proc/task/schedstat: new vCPU threads
    after an exec)."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            target = re.sub(r":\[\d+\]$", "", os.readlink(f"/proc/{pid}/fd/{fd}"))
            kinds[re.sub(r"^/proc/\d+/task/\d+/", "/proc/task/", target)] += 1
    return kinds


def _threads(pid: int) -> Counter[str]:
    names: Counter[str] = Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            names[Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()] += 1
    return names


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            found |= {int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()}
    return found


def _reexec(d: DaemonProcess, how: str) -> None:
    old = _owner(d.address)
    assert old is not None
    if how == "busctl":
        _call(d.address, "Reexec")  # the reply comes before the exec
    else:
        subprocess.run([sys.executable, "-m", "kvmnumad.cli", "--bus", d.address, "reexec"], cwd=ROOT,
                       check=True, capture_output=True, text=True, timeout=90)
    wait_until(lambda: _owner(d.address) not in (None, old), "org.kvmnuma1 owned again", timeout=60)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    with daemon_process("kvmnumad", tmp_path) as d:
        yield d


def _slots(pid: int, vm: str) -> dict[str, int]:
    return {name: fd for name, fd in _memfds(pid).items() if name.startswith(f"kvmnumad-{vm}-")}


def test_reexec_keeps_memory_counters_and_placement(daemon: DaemonProcess) -> None:
    a, pid = daemon.address, daemon.pid
    _call(a, "CreateVM", "suta{sv}", "acc", "4", str(256 * MiB), "3", "numa_nodes", "u", "2",
          "start", "b", "true", "policy", "s", "local-first")
    busctl(a, "call", "org.kvmnuma1", "/org/kvmnuma1/vm/acc", VM_IFACE, "SetVcpuAffinity", "uau",
           "1", "1", "1")
    wait_until(lambda: min(_progress(a, "acc")) >= 2, "two passes on every vCPU", timeout=60)
    slots = _slots(pid, "acc")
    assert sorted(slots) == ["kvmnumad-acc-boot", "kvmnumad-acc-node0-slot1", "kvmnumad-acc-node1-slot2"]
    declared = _get(a, "acc", "DeclaredVcpuAffinity")
    fds_before, threads_before, children_before = _fd_kinds(pid), _threads(pid), _children(pid)

    # --- 1: a running VM: its counters continue (GetStats, and the pages it writes)
    before = _progress(a, "acc")
    pages_before = {n: max(_page_counters(pid, fd)) for n, fd in slots.items() if "slot" in n}
    _reexec(daemon, "busctl")
    assert _owner(a) is not None
    assert _get(a, "acc", "Recovery") == "resumed"
    after = _progress(a, "acc")
    assert all(x >= y for x, y in zip(after, before, strict=True)), (before, after)
    wait_until(lambda: all(x >= y + 2 for x, y in zip(_progress(a, "acc"), before, strict=True)),
               "every vCPU two passes further", timeout=60)
    slots_after = _slots(pid, "acc")
    assert sorted(slots_after) == sorted(slots)  # the same memfds by name, and no other
    for n, fd in slots_after.items():
        if "slot" in n:
            assert min(_page_counters(pid, fd)) >= pages_before[n] - 1  # every page moved on, none reset
    # placement re-applied, per the kernel
    assert _get(a, "acc", "DeclaredVcpuAffinity") == declared
    tids = dict(cast("list[tuple[int, int]]", _get(a, "acc", "VcpuThreads")))
    assert taskset_affinity(tids[1]) == {1}
    for vcpu, cpus in declared:  # type: ignore[attr-defined]
        if cpus:
            assert taskset_affinity(tids[vcpu]) == set(cpus)
    for entry in numa_maps(pid):
        if entry.file and "kvmnumad-acc-node" in entry.file:
            assert entry.policy == "bind:0", entry.raw
            assert entry.pages_per_node.get(0, 0) > 0, entry.raw
    # nothing left over in the new process: the same fds by kind, no handover memfd, the same threads
    wait_until(lambda: _fd_kinds(pid) == fds_before, "the fd kinds of before", timeout=10)
    assert "kvmnumad-handover" not in _memfds(pid)
    # the holder of the old address space (kvmnumad/holder.py) is gone and reaped: no child, no zombie
    wait_until(lambda: _children(pid) == children_before, "no child left but those of before", timeout=30)
    assert _threads(pid)["vcpu1"] == threads_before["vcpu1"] == 1
    assert sum(n for name, n in _threads(pid).items() if name.startswith("vcpu")) == 4

    # --- 2: a paused VM: its memory is byte for byte the same, and it goes on when started
    busctl(a, "call", "org.kvmnuma1", "/org/kvmnuma1/vm/acc", VM_IFACE, "Stop")
    stopped = _progress(a, "acc")
    digests = {n: _slot_digest(pid, fd) for n, fd in _slots(pid, "acc").items()}
    _reexec(daemon, "kvmnumactl")
    assert _get(a, "acc", "State") == "stopped"
    assert {n: _slot_digest(pid, fd) for n, fd in _slots(pid, "acc").items()} == digests
    assert _progress(a, "acc") == stopped
    busctl(a, "call", "org.kvmnuma1", "/org/kvmnuma1/vm/acc", VM_IFACE, "Start")
    wait_until(lambda: min(_progress(a, "acc")) > max(stopped), "a pass past the saved counters", timeout=60)
    log = daemon.log.read_text()
    assert log.count("resumed after a daemon restart") == 2, log
    assert log.count("address space is released (holder") == 2, log
    assert "Traceback" not in log, log


def test_reexec_is_for_root_only(daemon: DaemonProcess, unpriv_user: User) -> None:
    out = unpriv_user.run("gdbus", "call", "--address", daemon.address, "--dest", "org.kvmnuma1",
                          "--object-path", "/org/kvmnuma1", "--method", "org.kvmnuma1.Manager.Reexec")
    assert out.returncode != 0
    assert "org.freedesktop.DBus.Error.AccessDenied" in out.stderr, out.stderr
    assert _owner(daemon.address) is not None
    assert "re-executing" not in daemon.log.read_text()


# ------------------------------------------------------------------ systemd's part, played here


class FakeFdStore:
    """systemd's notify socket and fd store (FDSTORE=1 / FDNAME= / FDSTOREREMOVE=1),
    since PID 1 here is not systemd.  A fake of the manager only: the fds it
    keeps are the daemon's real memfds, received with SCM_RIGHTS."""

    def __init__(self) -> None:
        self.path = tempfile.mktemp(prefix="kvmnumad-notify-")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.05)
        self.fds: dict[str, int] = {}
        self.messages: list[str] = []

    def drain(self) -> None:
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
            except TimeoutError:
                return
            fds: list[int] = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                    fds.extend(arr)
            text = data.decode()
            self.messages.append(text)
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            if fields.get("FDSTORE") == "1" and fds:
                name = fields.get("FDNAME", "stored")
                for fd in fds:  # systemd keeps one entry per name and inode; a name again replaces here
                    if name in self.fds:
                        os.close(self.fds[name])
                    self.fds[name] = fd
            else:
                for fd in fds:
                    os.close(fd)
            if fields.get("FDSTOREREMOVE") == "1" and fields.get("FDNAME") in self.fds:
                os.close(self.fds.pop(fields["FDNAME"]))

    def start(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        """Start the daemon as systemd would: the stored fds at 3, 4, ... in
        LISTEN_FDNAMES order, LISTEN_PID the daemon's own PID (a launcher
        places them, then execs the daemon in the same process)."""
        self.drain()
        names = list(self.fds)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        env["NOTIFY_SOCKET"] = self.path
        fds = [self.fds[n] for n in names]
        with log.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-c", _LAUNCHER, ",".join(map(str, fds)), ":".join(names),
                 "-m", "kvmnumad", "--log-target", "stderr", *args],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                pass_fds=fds)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.sock.close()
        os.unlink(self.path)


# systemd's part of sd_listen_fds(3): fds at 3.. (each first dup'ed above the range, so that no
# placement overwrites one still to be placed), LISTEN_* set, then exec in the same PID.
_LAUNCHER = """
import fcntl, os, sys
fds = [int(x) for x in sys.argv[1].split(",") if x]
temps = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(fds)) for fd in fds]
for i, t in enumerate(temps):
    os.dup2(t, 3 + i, inheritable=True)
if fds:
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=sys.argv[2])
os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
"""


@pytest.fixture
def fdstore() -> Iterator[FakeFdStore]:
    store = FakeFdStore()
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def bus() -> Iterator[BusDaemon]:
    with start_bus_daemon() as b:
        yield b


def _until_owned(address: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    wait_until(lambda: proc.poll() is not None or _owner(address) is not None, "org.kvmnuma1 owned",
               timeout=60)
    assert proc.poll() is None, log.read_text()


def _end(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_fd_store_keeps_memory_through_kill_9_and_releases_orphans(
        bus: BusDaemon, fdstore: FakeFdStore, tmp_path: Path) -> None:
    state, log = tmp_path / "state", tmp_path / "daemon.log"
    args = ("--bus", bus.address, "--state-dir", str(state))
    proc = fdstore.start(*args, log=log)
    try:
        _until_owned(bus.address, proc, log)
        for name in ("crash", "gone"):
            _call(bus.address, "CreateVM", "suta{sv}", name, "2", str(16 * MiB), "2", "numa_nodes", "u", "2",
                  "start", "b", "true")
        wait_until(lambda: min(_progress(bus.address, "crash")) >= 3, "three passes", timeout=60)
        fdstore.drain()
        assert {"crash.0", "crash.1", "crash.2", "gone.0", "gone.1", "gone.2"} <= set(fdstore.fds)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        _end(proc, signal.SIGKILL)
    fdstore.drain()
    kept = {n: hashlib.sha256(os.pread(fd, 16 * MiB, 0)).hexdigest() for n, fd in fdstore.fds.items()}
    (state / "gone.json").unlink()  # its definition is gone: its memory must be released
    for f in state.iterdir():  # never torn: every file a whole JSON document
        if f.suffix == ".json":
            assert f.read_text().rstrip().endswith("}")
    proc = fdstore.start(*args, log=log)
    try:
        _until_owned(bus.address, proc, log)
        assert _get(bus.address, "crash", "Recovery") == "restarted"
        names = [vm[0] for vm in _call(bus.address, "ListVMs")[0]]  # type: ignore[index]
        assert names == ["crash"]
        fdstore.drain()
        assert not any(n.startswith("gone.") for n in fdstore.fds), fdstore.fds  # FDSTOREREMOVE=1
        assert "kvmnumad-handover" not in fdstore.fds
        # the restarted VM's memory is the kept one (read before its vCPUs overwrite it: the boot slot
        # holds the code, which no pass touches)
        boot = _memfds(proc.pid)["kvmnumad-crash-boot"]
        with open(f"/proc/{proc.pid}/fd/{boot}", "rb") as image:
            assert hashlib.sha256(image.read()).hexdigest() == kept["crash.0"]
        wait_until(lambda: min(_progress(bus.address, "crash")) >= 1, "the vCPUs run again", timeout=60)
        assert "restarted its vCPUs from their entry state" in log.read_text()
    finally:
        _end(proc, signal.SIGKILL)


def test_fd_store_graceful_stop_resumes_the_guest(bus: BusDaemon, fdstore: FakeFdStore,
                                                  tmp_path: Path) -> None:
    """systemctl restart: SIGTERM pauses and saves into the store, the next process resumes."""
    state, log = tmp_path / "state", tmp_path / "daemon.log"
    args = ("--bus", bus.address, "--state-dir", str(state))
    proc = fdstore.start(*args, log=log)
    try:
        _until_owned(bus.address, proc, log)
        _call(bus.address, "CreateVM", "suta{sv}", "calm", "2", str(16 * MiB), "2", "numa_nodes", "u", "2",
              "start", "b", "true")
        wait_until(lambda: min(_progress(bus.address, "calm")) >= 3, "three passes", timeout=60)
        before = _progress(bus.address, "calm")
    finally:
        _end(proc, signal.SIGTERM)
    assert proc.returncode == 0, log.read_text()
    fdstore.drain()
    assert "kvmnumad-handover" in fdstore.fds
    proc = fdstore.start(*args, log=log)
    try:
        _until_owned(bus.address, proc, log)
        assert _get(bus.address, "calm", "Recovery") == "resumed"
        assert all(x >= y for x, y in zip(_progress(bus.address, "calm"), before, strict=True))
        fdstore.drain()
        assert "kvmnumad-handover" not in fdstore.fds  # FDSTOREREMOVE=1 once read: a crash won't reuse it
        time.sleep(0.2)
        assert all(x > y for x, y in zip(_progress(bus.address, "calm"), before, strict=True))
    finally:
        _end(proc, signal.SIGTERM)
    assert proc.returncode == 0, log.read_text()
