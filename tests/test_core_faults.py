"""Regression tests of issue 10's review: faults that used to vanish or answer Internal.

Each fault is real: a real uevent burst, a real fd or address-space limit
(setrlimit in a child process, so the test process keeps its own).
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType, Variant

from kvmnumad.hotplug import HotplugMonitor, RepinQueue
from tests.busfixtures import BusClient, RunningService, busctl
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent


def test_repins_run_one_at_a_time_and_bursts_coalesce() -> None:
    """Two bursts used to re-pin concurrently from different topology reads."""
    running = 0
    overlap = False
    calls: list[str] = []
    lock = threading.Lock()

    def handler(reason: str) -> None:
        nonlocal running, overlap
        with lock:
            running += 1
            overlap = overlap or running > 1
        time.sleep(0.1)  # a re-pin that takes a while, as a real one over many VMs does
        calls.append(reason)
        with lock:
            running -= 1

    async def main() -> None:
        queue = RepinQueue(handler)
        queue.request("cpu1 offline")
        await asyncio.sleep(0.02)  # the first run is under way
        for i in range(5):
            queue.request(f"burst {i}")
        await queue.drain()

    asyncio.run(main())
    assert not overlap
    # the first run, then exactly one more for everything that came meanwhile
    assert calls == ["cpu1 offline", "burst 0, burst 1, burst 2, burst 3, burst 4"]


def test_a_failed_repin_is_logged_not_lost(caplog: pytest.LogCaptureFixture) -> None:
    """Its future used to be dropped: the exception vanished."""

    def handler(reason: str) -> None:
        raise RuntimeError(f"cannot re-pin after {reason}")

    async def main() -> None:
        queue = RepinQueue(handler)
        queue.request("cpu1 offline")
        await queue.drain()
        queue.request("cpu1 online")  # the queue still serves after a failure
        await queue.drain()

    with caplog.at_level(logging.ERROR, logger="kvmnumad.hotplug"):
        asyncio.run(main())
    failures = [r for r in caplog.records if "re-pinning after" in r.getMessage()]
    assert [r.exc_info is not None for r in failures] == [True, True], caplog.text
    assert "cannot re-pin after cpu1 offline" in caplog.text


def test_real_uevents_reach_the_queue_in_order() -> None:
    """The monitor feeds the queue from real kernel uevents (a harmless
    'change' on cpu0, as kvm-notes.md says), never two handlers at once."""
    seen: list[str] = []
    active = threading.Semaphore(1)

    def handler(reason: str) -> None:
        assert active.acquire(blocking=False), "two re-pins at once"
        try:
            time.sleep(0.05)
            seen.append(reason)
        finally:
            active.release()

    async def main() -> None:
        queue = RepinQueue(handler)
        monitor = HotplugMonitor(queue.request, source="kernel")
        monitor.start()
        try:
            for _ in range(3):
                Path("/sys/devices/system/cpu/cpu0/uevent").write_text("change\n")
                await asyncio.sleep(0.01)
            deadline = time.monotonic() + 10
            while not seen and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await queue.drain()
        finally:
            monitor.stop()

    asyncio.run(main())
    assert seen and all("cpu0 change" in r for r in seen), seen


CHILD = textwrap.dedent("""
    import json, os, resource, sys
    from kvmnumad import errors
    from kvmnumad.kvm.runner import install_kick_signal
    from kvmnumad.manager import Manager
    from kvmnumad.model import CreateOptions
    install_kick_signal()
    m = Manager(cpusets=False)
    m.max_vcpus()  # /dev/kvm is open before the limit bites
    which = sys.argv[1]
    def fds(): return sorted(os.listdir("/proc/self/fd"))
    def threads(): return len(os.listdir("/proc/self/task"))
    before = (fds(), threads())
    if which == "fds":
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(before[0]) + 6, len(before[0]) + 6))
        args = ("fds", 64, 0, CreateOptions())
    else:
        with open("/proc/self/status") as f:
            vmsize = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vmsize + (256 << 20), resource.RLIM_INFINITY))
        args = ("mem", 1, 4 << 30, CreateOptions())
    try:
        m.create_vm(*args)
        result = "created"
    except errors.KvmnumaError as e:
        result = type(e).__name__
    except Exception as e:
        result = "untyped " + type(e).__name__ + ": " + str(e)
    print(json.dumps({"result": result, "same": (fds(), threads()) == before, "vms": len(m.list_vms())}))
""")


@pytest.mark.parametrize(("limit", "expected"), [("fds", "ResourceExhausted"), ("mem", "InsufficientMemory")])
def test_kernel_resource_limits_give_typed_errors_and_change_nothing(limit: str, expected: str) -> None:
    """KVM_CREATE_VCPU at the fd limit (EMFILE) and mmap beyond RLIMIT_AS
    (ENOMEM) used to answer Internal."""
    out = subprocess.run([sys.executable, "-c", CHILD, limit], check=False, cwd=ROOT, capture_output=True,
                         text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"result": expected, "same": True, "vms": 0}, (result, out.stderr[-2000:])



def test_a_vcpu_that_stops_by_itself_shows_in_the_vm_state(service: RunningService, tmp_path: Path) -> None:
    """A crashed vCPU used to leave its VM reporting "running".  The fault is
    real: ud2 with no IDT is a triple fault, which KVM reports as SHUTDOWN."""
    payload = tmp_path / "ud2.bin"
    payload.write_bytes(b"\x0f\x0b")
    path = "/org/kvmnuma1/vm/crash"
    client = BusClient(service.address)
    try:
        with payload.open("rb") as f:  # the payload travels as an fd the caller opened (type h)
            msg = Message(destination="org.kvmnuma1", path="/org/kvmnuma1", interface="org.kvmnuma1.Manager",
                          member="CreateVM", signature="suta{sv}",
                          body=["crash", 1, 0, {"payload": Variant("h", 0), "start": Variant("b", True)}],
                          unix_fds=[f.fileno()])
            reply = client._loop.run(client.bus.call(msg), 30)
        assert reply is not None and reply.message_type == MessageType.METHOD_RETURN, reply and reply.body
    finally:
        client.close()

    def state() -> str:
        return str(busctl(service.address, "get-property", "org.kvmnuma1", path, "org.kvmnuma1.VM",
                          "State")["data"])

    wait_until(lambda: state() == "failed", "the VM's State to say failed", timeout=20)
    # and it cannot be resumed as if nothing happened
    busctl(service.address, "call", "org.kvmnuma1", path, "org.kvmnuma1.VM", "Stop")
    assert state() == "stopped"
    err = busctl(service.address, "call", "org.kvmnuma1", path, "org.kvmnuma1.VM", "Start", check=False,
                 json_=False)
    assert err.returncode != 0 and "stopped by themselves" in err.stderr, err
