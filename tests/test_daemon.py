"""The daemon as a process: what `make run` prints works, sd_notify, restart after kill -9.

Each test starts ``python -m kvmnumad`` as a real subprocess and checks it
only from outside: busctl, taskset, the notify socket it writes to.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.busfixtures import BusDaemon, busctl, start_bus_daemon
from tests.observe import taskset_affinity
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent


def _start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kvmnumad", "--log-target", "stderr", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, **(env or {})},
    )


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> str:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


def _name_owned(address: str) -> bool:
    out = busctl(address, "list", "--acquired", json_=False, check=False)
    return "org.kvmnuma1" in out.stdout


def test_make_run_prints_lines_that_work() -> None:
    """`make run` = kvmnumad.demo: a private bus, a demo VM, and busctl lines to paste."""
    proc = subprocess.Popen([sys.executable, "-m", "kvmnumad.demo", "--log-target", "stderr"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        text = "".join(lines)
        calls = [ln.strip() for ln in lines if ln.strip().startswith("busctl --address=")]
        assert calls, text
        listing = next(c for c in calls if "ListVMs" in c)
        out = subprocess.run(shlex.split(listing), check=True, capture_output=True, text=True).stdout
        assert '"demo" "running" "/org/kvmnuma1/vm/demo"' in out, out
        affinity = next(c for c in calls if "VcpuAffinity" in c)
        out = subprocess.run(shlex.split(affinity), check=True, capture_output=True, text=True).stdout
        assert out.startswith("a(uau) 4 "), out
        ctl = next(ln.strip() for ln in lines if "kvmnumactl" in ln and ln.strip().endswith(" list"))
        address = re.search(r"--bus '([^']+)'", ctl)
        assert address is not None
        out = subprocess.run([sys.executable, "-m", "kvmnumad.cli", "--bus", address.group(1), "list"],
                             check=True, capture_output=True, text=True).stdout
        assert "demo" in out and "running" in out
        bus_socket = re.search(r"unix:path=([^,]+)", address.group(1))
        assert bus_socket is not None
    finally:
        rest = _stop(proc, signal.SIGINT)
    assert proc.returncode == 0, "".join(lines) + rest
    assert not os.path.exists(bus_socket.group(1)), "the private bus outlived the daemon"


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    path = tempfile.mktemp(prefix="kvmnumad-notify-")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    try:
        yield sock, path
    finally:
        sock.close()
        os.unlink(path)


def test_sd_notify_ready_watchdog_stopping(bus_daemon: BusDaemon,
                                           notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    proc = _start("--bus", bus_daemon.address,
                  env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
    try:
        got: list[tuple[float, str]] = []
        while not any(m.startswith("READY=1") for _, m in got):
            got.append((time.monotonic(), sock.recv(4096).decode()))
        # READY only once the name is owned (a bus-activated client must find it)
        assert _name_owned(bus_daemon.address)
        pings: list[float] = []
        while len(pings) < 4:
            msg = sock.recv(4096).decode()
            if "WATCHDOG=1" in msg:
                pings.append(time.monotonic())
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert all(0.1 < g < 0.4 for g in gaps), gaps  # every usec/2 = 0.2 s
        proc.send_signal(signal.SIGTERM)
        rest: list[str] = []
        while not any("STOPPING=1" in m for m in rest):
            rest.append(sock.recv(4096).decode())
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out
    assert any(m.startswith("STATUS=") for _, m in got), got


def test_kill_9_restart_restores_vms_and_declared_placement(bus_daemon: BusDaemon, tmp_path: Path) -> None:
    address = bus_daemon.address
    proc = _start("--bus", address, "--state-dir", str(tmp_path))
    try:
        wait_until(lambda: _name_owned(address), "kvmnumad to own org.kvmnuma1", timeout=20)
        busctl(address, "call", "org.kvmnuma1", "/org/kvmnuma1", "org.kvmnuma1.Manager", "CreateVM",
               "suta{sv}", "keep", "2", str(8 << 20), "2", "numa_nodes", "u", "2", "start", "b", "true")
        vm_path = "/org/kvmnuma1/vm/keep"
        busctl(address, "call", "org.kvmnuma1", vm_path, "org.kvmnuma1.VM", "SetVcpuAffinity",
               "uau", "1", "1", "1")
        busctl(address, "call", "org.kvmnuma1", vm_path, "org.kvmnuma1.VM", "BindVcpuToNumaNode",
               "uu", "0", "1")
    finally:
        proc.kill()  # no clean shutdown: what survives is what was saved on the way
        proc.communicate()
    assert list(tmp_path.glob("keep*")), "no saved definition"
    proc = _start("--bus", address, "--state-dir", str(tmp_path))
    try:
        wait_until(lambda: _name_owned(address), "kvmnumad to own org.kvmnuma1", timeout=20)
        vms = busctl(address, "call", "org.kvmnuma1", "/org/kvmnuma1", "org.kvmnuma1.Manager", "ListVMs")
        assert [v[0] for v in vms["data"][0]] == ["keep"], vms
        threads = busctl(address, "get-property", "org.kvmnuma1", vm_path, "org.kvmnuma1.VM", "VcpuThreads")
        tids = dict(threads["data"])
        assert taskset_affinity(tids[1]) == {1}
        declared = busctl(address, "get-property", "org.kvmnuma1", vm_path, "org.kvmnuma1.VM",
                          "DeclaredVcpuAffinity")
        assert [1, [1]] in declared["data"], declared
        nodes = busctl(address, "call", "org.kvmnuma1", vm_path, "org.kvmnuma1.VM", "GetVcpuNumaNode",
                       "u", "0")
        assert nodes["data"] == [[True, 1]], nodes
        state = busctl(address, "get-property", "org.kvmnuma1", vm_path, "org.kvmnuma1.VM", "State")
        assert state["data"] == "running"
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out


# mov eax, 0xC0DE; mov dx, 0x510; out dx, eax; hlt; jmp back to the hlt: reports 0xC0DE as
# its progress, which the built-in payload (a pass count) never does in a test's time.
MARKER_PAYLOAD = bytes([0xB8, 0xDE, 0xC0, 0, 0, 0x66, 0xBA, 0x10, 0x05, 0xEF, 0xF4, 0xEB, 0xFD])


def _progress(address: str, vm_path: str) -> int:
    stats = busctl(address, "call", "org.kvmnuma1", vm_path, "org.kvmnuma1.VM", "GetStats")
    return int(stats["data"][1][0][5])  # vCPU 0's progress


def test_kill_9_restart_runs_the_vms_own_payload(bus_daemon: BusDaemon, tmp_path: Path) -> None:
    """A custom payload used to be lost at restart: the VM came back running
    the built-in one (issue 12 finding 12).  Its bytes are kept beside the
    definition, named by hash, and the restarted VM runs them again."""
    address = bus_daemon.address
    code = tmp_path / "code.bin"
    code.write_bytes(MARKER_PAYLOAD)
    state = tmp_path / "state"
    vm_path = "/org/kvmnuma1/vm/own"
    proc = _start("--bus", address, "--state-dir", str(state))
    try:
        wait_until(lambda: _name_owned(address), "kvmnumad to own org.kvmnuma1", timeout=20)
        out = subprocess.run([str(ROOT / ".venv/bin/kvmnumactl"), "--bus", address, "create", "own",
                              "--vcpus", "1", "--memory", "0", "--payload", str(code), "--start"],
                             capture_output=True, text=True, timeout=30, check=False)
        assert out.returncode == 0, out.stderr
        wait_until(lambda: _progress(address, vm_path) == 0xC0DE, "the VM to run its own payload", timeout=10)
    finally:
        proc.kill()
        proc.communicate()
    code.unlink()  # the daemon must not need the caller's file any more
    assert (state / "own.payload").read_bytes() == MARKER_PAYLOAD
    assert '"payload_sha256"' in (state / "own.json").read_text()
    proc = _start("--bus", address, "--state-dir", str(state))
    try:
        wait_until(lambda: _name_owned(address), "kvmnumad to own org.kvmnuma1", timeout=20)
        wait_until(lambda: _progress(address, vm_path) == 0xC0DE, "the restored VM to run its own payload",
                   timeout=10)
    finally:
        out_text = _stop(proc)
    assert proc.returncode == 0, out_text


def test_sighup_keeps_the_daemon_serving(bus_daemon: BusDaemon) -> None:
    """SIGHUP used to kill the daemon (and its VMs) without the orderly stop."""
    address = bus_daemon.address
    proc = _start("--bus", address)
    try:
        wait_until(lambda: _name_owned(address), "kvmnumad to own org.kvmnuma1", timeout=20)
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)  # what is tested: that it is still there a while after the signal
        assert proc.poll() is None, "kvmnumad died of SIGHUP"
        assert _name_owned(address)
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out
    assert "SIGHUP" in out, out


def test_losing_the_bus_exits_non_zero() -> None:
    """A daemon whose bus died used to live on unreachable, watchdog passing."""
    with start_bus_daemon() as bus:
        proc = _start("--bus", bus.address)
        try:
            wait_until(lambda: _name_owned(bus.address), "kvmnumad to own org.kvmnuma1", timeout=20)
            os.kill(bus.pid, signal.SIGKILL)  # the bus dies under the daemon
            wait_until(lambda: proc.poll() is not None, "kvmnumad to exit after losing its bus", timeout=20)
        finally:
            out = _stop(proc)
    assert proc.returncode == 1, out
    assert "lost the connection to the bus" in out, out
