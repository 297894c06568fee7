"""Untrusted arrays are bounded before parsing (issue 12 finding 8).

One SetVcpuAffinity with an 8 MB ``au`` from an unprivileged user, refused
for want of authorization, raised the daemon's memory by 182 MiB: dbus-fast
had unmarshalled two million ints before our dispatch could say no.  Now a
body over bus/framing.py's bound is skipped unread and answered
LimitReached.  Observed from outside: the daemon's VmHWM (its peak
resident memory, so a transient peak counts too) and fd count in
/proc/PID/status and /proc/PID/fd, a second client's ListVMs meanwhile,
the replies' names through a dbus-fast client and busctl.  Each daemon
runs twice: on the .venv's dbus-fast 5.x and as the .deb runs it, on
/usr/bin/python3 with Debian's python3-dbus-fast 1.84.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dbus_fast import Message
from dbus_fast.aio import MessageBus

from kvmnumad.bus.framing import LARGEST_CALL, MAX_BODY, MAX_CPUS
from kvmnumad.bus.service import BUS_NAME
from tests.busfixtures import (
    VM_IFACE,
    BusClient,
    BusDaemon,
    MiB,
    options,
    start_bus_daemon,
)
from tests.sysfixtures import User
from tests.waiting import wait_until

pytest_plugins = ["tests.busfixtures", "tests.sysfixtures"]

ROOT = Path(__file__).resolve().parent.parent
RAWDBUS = ROOT / "tests" / "clients" / "rawdbus.py"
LIMIT = "org.kvmnuma1.Error.LimitReached"
VM = "/org/kvmnuma1/vm/bounds"
INTERPRETERS = {"dbus-fast-5": sys.executable, "dbus-fast-1.84": "/usr/bin/python3"}


@dataclass
class Daemon:
    bus: BusDaemon
    pid: int
    log: Path


def status(pid: int) -> dict[str, int]:
    """VmHWM and VmRSS (KiB) and the open fds of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"hwm_kib": int(fields["VmHWM"].split()[0]), "rss_kib": int(fields["VmRSS"].split()[0]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


@pytest.fixture(scope="module", params=sorted(INTERPRETERS))
def daemon(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """kvmnumad on a bus of its own (root-only mutations), one VM of 1 vCPU, its memory settled."""
    python = INTERPRETERS[request.param]
    tmp = tmp_path_factory.mktemp("bounds")
    address_file, log = tmp / "address", tmp / "daemon.log"
    with start_bus_daemon() as bus, log.open("w") as out:
        proc = subprocess.Popen(
            [python, "-m", "kvmnumad", "--bus", bus.address, "--address-file", str(address_file),
             "--log-target", "stderr", "--config-dir", str(tmp)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_until(lambda: proc.poll() is not None or address_file.is_file(), f"kvmnumad on {python}",
                       timeout=60)
            assert proc.poll() is None, log.read_text()
            c = BusClient(bus.address)
            try:
                c.manager("CreateVM", "suta{sv}", "bounds", 1, 4 * MiB, options())
                for _ in range(20):  # the paths every test below takes, warmed up: their first use allocates
                    c.call(BUS_NAME, VM, VM_IFACE, "SetVcpuAffinity", "uau", [0, [0]])
                    c.manager("ListVMs")
            finally:
                c.close()
            yield Daemon(bus, proc.pid, log)
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_a_denied_8_mb_cpu_list_from_an_unprivileged_user_costs_no_memory(daemon: Daemon,
                                                                           unpriv_user: User) -> None:
    """The finding's call, as it was made: 8 MiB of CPU list from a user who
    may not place the VM.  The daemon's peak RSS must not move by more than
    4 MiB (it grew by 182 MiB), the call gets a reply, root's ListVMs is
    answered all along, and the daemon says why in its log."""
    base = status(daemon.pid)
    root = BusClient(daemon.bus.address)
    answered: list[float] = []
    try:
        big = subprocess.Popen(
            ["runuser", "-u", unpriv_user.name, "--", "env", "-i", "PATH=/usr/bin:/bin", "/usr/bin/python3",
             str(RAWDBUS), daemon.bus.address, "big-affinity", VM, "8"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while big.poll() is None:
            t = time.perf_counter()
            root.manager("ListVMs")
            answered.append(time.perf_counter() - t)
            time.sleep(0.01)
        out, err = big.communicate()
    finally:
        root.close()
    after = status(daemon.pid)
    assert big.returncode == 0, err
    sent, got = (int(v) for v in out.split())
    print(f"\n{sent} bytes of SetVcpuAffinity from uid {unpriv_user.uid}: {got} bytes of reply; daemon "
          f"before {base}, after {after}; root's ListVMs meanwhile: {len(answered)} calls, "
          f"max {1000 * max(answered, default=0):.1f} ms")
    assert sent > 8 * MiB and got > 0, daemon.log.read_text()[-2000:]  # refused, and answered
    assert after["hwm_kib"] - base["hwm_kib"] < 4 * 1024, (base, after)
    assert after["rss_kib"] - base["rss_kib"] < 4 * 1024, (base, after)
    assert answered, "root's ListVMs was never answered while the big call was under way"
    wait_until(lambda: "over the size bound" in daemon.log.read_text(), "the refusal in the daemon's log")


def test_an_over_long_call_is_answered_limit_reached_and_the_next_one_normally(daemon: Daemon) -> None:
    """Root's too: the bound is on the message, before anyone is known.  The
    error names the bound; the connection goes on (framing kept in step)."""
    c = BusClient(daemon.bus.address)
    try:
        too_long = list(range(MAX_BODY // 4))  # one element over: 4 + 4 + MAX_BODY bytes of body
        name, text = c.error(BUS_NAME, VM, VM_IFACE, "SetVcpuAffinity", "uau", [0, too_long])
        assert name == LIMIT, (name, text)
        assert str(MAX_BODY) in text, text
        assert c.manager("ListVMs")[0][0][0] == "bounds"
        # a signal and a call that expects no reply are dropped: the next call still gets its own answer
        c.send(Message.new_signal(VM, VM_IFACE, "Noise", "au", [too_long]))
        assert [row[0] for row in c.manager("ListVMs")[0]] == ["bounds"]
    finally:
        c.close()


def test_the_largest_legitimate_call_passes_the_bound(daemon: Daemon) -> None:
    """SetVcpuAffinity naming every CPU a kernel can have (the bound's reason):
    refused by the core for naming offline CPUs, not by the bound.  busctl,
    an independent client, shows the name."""
    cpus = [str(c) for c in range(MAX_CPUS)]
    out = subprocess.run(["busctl", f"--address={daemon.bus.address}", "call", BUS_NAME, VM, VM_IFACE,
                          "SetVcpuAffinity", "uau", "0", str(MAX_CPUS), *cpus],
                         check=False, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "LimitReached" not in out.stderr and "CPU" in out.stderr, out.stderr
    assert 4 + 4 + 4 * MAX_CPUS == LARGEST_CALL <= MAX_BODY


def test_fds_sent_with_an_over_long_call_are_closed(daemon: Daemon) -> None:
    """A refused message is never unmarshalled, so bus/fds.py never sees its
    fds: framing closes them.  The daemon's fd count is back where it was."""
    base = status(daemon.pid)["fds"]
    c = BusClient(daemon.bus.address)
    r, w = os.pipe()
    try:
        payload = [0, list(range(MAX_BODY // 4))]
        for _ in range(20):
            msg = Message(destination=BUS_NAME, path=VM, interface=VM_IFACE, member="SetVcpuAffinity",
                          signature="uauh", body=[*payload, 0], unix_fds=[r])
            reply = c._loop.run(c.bus.call(msg), 30)
            assert reply is not None and reply.error_name == LIMIT, reply
    finally:
        c.close()
        os.close(r)
        os.close(w)
    wait_until(lambda: status(daemon.pid)["fds"] <= base, "the daemon's fds back at the baseline", timeout=10)


def test_a_reply_larger_than_the_bound_still_reaches_a_client() -> None:
    """Only calls and signals are bounded: a client built on connect() (the
    tests', the bench's) may well get a large reply.  The peer answering is a
    plain dbus-fast MessageBus owning the name on a bus of its own, the caller a BusClient (a ServiceBus)."""
    with start_bus_daemon() as bus:
        c = BusClient(bus.address)
        server: MessageBus | None = None

        async def serve() -> MessageBus:
            peer = await MessageBus(bus_address=bus.address).connect()

            def on_call(msg: Message) -> bool:
                if msg.member != "Big":
                    return False
                peer.send(Message.new_method_return(msg, "ay", [bytes(4 * MAX_BODY)]))
                return True

            peer.add_message_handler(on_call)
            await peer.request_name(BUS_NAME)  # the one name the bus policy lets callers call
            return peer

        try:
            server = c._loop.run(serve())
            reply = c.call(BUS_NAME, "/", "test.Bounds", "Big")
            assert reply.error_name is None, reply.body
            assert len(reply.body[0]) == 4 * MAX_BODY
        finally:
            if server is not None:
                server.disconnect()
            c.close()
