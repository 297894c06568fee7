"""Memory migration as a job on a real multi-node kernel (issue 14 acceptance: the migration job).

kvmnumad runs as its own process on a private bus.  A VM with one 256 MiB
guest node bound to host node A runs its payload (every vCPU pass writes
every page of the node) while a job moves the node to host node B.  The
job's progress is watched by a separate D-Bus client (dbus-fast, subscribed
to the job's PropertiesChanged); where the pages are is read from
/proc/PID/numa_maps of the daemon; the payload's pass counter, from GetStats,
shows the guest ran on.

The half-way cancel is no race against the clock: the watching client sends
Cancel from its PropertiesChanged handler once PagesMoved passes half, and
the daemon's chunk is 128 pages (512 chunks for the node), so the job is
still far from its end when the Cancel arrives; whatever moved by then is
what numa_maps and Residency must both show, to the page.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType

from tests.busfixtures import BusClient, busctl
from tests.numa.conftest import JOB_CHUNK_PAGES
from tests.observe import host_nodes, numa_maps_of_slot
from tests.waiting import wait_until

pytestmark = pytest.mark.numa

ROOT = Path(__file__).resolve().parents[2]
BUS, MGR, MGR_IFACE, VM_IFACE = "org.kvmnuma1", "/org/kvmnuma1", "org.kvmnuma1.Manager", "org.kvmnuma1.VM"
JOB_IFACE = "org.kvmnuma1.Job"
MiB = 1 << 20
SIZE = 256 * MiB
PAGES = SIZE // 4096
CHUNK = JOB_CHUNK_PAGES  # pages per chunk of the daemon's jobs


BALANCING = Path("/proc/sys/kernel/numa_balancing")


@pytest.fixture(scope="module")
def no_numa_balancing() -> Iterator[None]:
    """The kernel's automatic NUMA balancing off while these VMs run (and back after).

    With it on, the guest's 6.1 kernel panicked twice in this module's 2-node run,
    "corrupted stack end detected inside scheduler" in a nested vCPU thread, as it did
    in the systemd guest with task_numa_fault on the stack (commit f1ef87f); a guest
    whose payload runs for minutes meets it.  It is not what is tested here: the VM's
    memory is MPOL_BIND, which the balancer leaves alone anyway."""
    before = BALANCING.read_text() if BALANCING.exists() else None
    if before is not None:
        BALANCING.write_text("0")
    try:
        yield
    finally:
        if before is not None:
            BALANCING.write_text(before)


@pytest.fixture(scope="module")
def daemon(no_numa_balancing: None, sampling_daemon: tuple[int, str]) -> tuple[int, str]:
    return sampling_daemon


def call(address: str, path: str, iface: str, method: str, sig: str = "", *args: str) -> Any:
    reply = busctl(address, "call", BUS, path, iface, method, *([sig, *args] if sig else []))
    return None if reply is None else reply["data"]


def prop(address: str, path: str, iface: str, name: str) -> Any:
    return busctl(address, "get-property", BUS, path, iface, name)["data"]


def free_mib(node: int) -> int:
    for line in Path(f"/sys/devices/system/node/node{node}/meminfo").read_text().splitlines():
        if "MemFree:" in line:
            return int(line.split()[-2]) // 1024
    return 0


def two_nodes() -> tuple[int, int]:
    """The two host nodes with the most free memory: source, destination."""
    src, dst = sorted(host_nodes(), key=free_mib, reverse=True)[:2]
    return src, dst


def on_nodes(pid: int, name: str, address: str, path: str) -> dict[int, int]:
    """Resident pages of the VM's guest-node memory per host node, by numa_maps."""
    pages: dict[int, int] = {}
    for slot, *_ in prop(address, path, VM_IFACE, "MemoryRegions"):
        for node, n in numa_maps_of_slot(name, slot, pid).pages_per_node.items():
            pages[node] = pages.get(node, 0) + n
    return pages


def passes(address: str, path: str) -> int:
    """The payload's passes, summed over vCPUs (GetStats: (vcpu, tid, cpu ns, cpu, exits, progress))."""
    vcpus = call(address, path, VM_IFACE, "GetStats")[1]
    return sum(int(v[5]) for v in vcpus)


def make_vm(address: str, name: str, src: int) -> str:
    path: str = call(address, MGR, MGR_IFACE, "CreateVM", "suta{sv}", name, "1", str(SIZE), "4",
                     "numa_nodes", "u", "1", "policy", "s", "manual", "host_nodes", "au", "1", str(src),
                     "prealloc", "b", "true")[0]
    call(address, path, VM_IFACE, "Start")
    wait_until(lambda: passes(address, path) >= 1, "the payload's first pass over the node", timeout=300)
    return path


class Watcher:
    """A D-Bus client of its own: every PropertiesChanged of every job object,
    in order, by path (so none is missed between a job's start and its
    reply); with ``cancel_at``, it sends Cancel (from its signal handler, no
    round trip through the test) the first time a job's PagesMoved reaches
    that many pages."""

    def __init__(self, address: str, cancel_at: int | None = None) -> None:
        self.client = BusClient(address)
        self.cancel_at = cancel_at
        self.cancel_sent_at: dict[str, int] = {}
        self._seen: dict[str, dict[str, list[Any]]] = {}
        self._lock = threading.Lock()
        self.client.bus.add_message_handler(self._on)

    def _on(self, msg: Message) -> bool:
        path = msg.path or ""
        if msg.message_type != MessageType.SIGNAL or msg.member != "PropertiesChanged" or \
                not path.startswith("/org/kvmnuma1/job/"):
            return False
        with self._lock:
            seen = self._seen.setdefault(path, {})
            for key, value in msg.body[1].items():
                seen.setdefault(key, []).append(value.value)
            seen.setdefault("time", []).append(time.monotonic())
            moved = msg.body[1].get("PagesMoved")
            if (moved is not None and self.cancel_at is not None and path not in self.cancel_sent_at
                    and moved.value >= self.cancel_at):
                self.cancel_sent_at[path] = int(moved.value)
                cancel = Message(destination=BUS, path=path, interface=JOB_IFACE, member="Cancel")
                self.client.bus.send(cancel)
        return False

    def seen(self, job: str, key: str) -> list[Any]:
        with self._lock:
            return list(self._seen.get(job, {}).get(key, []))

    def removed(self, job: str, timeout: float = 600) -> list[Any]:
        msg = self.client.wait_signal(lambda m: m.member == "JobRemoved" and m.body[1] == job,
                                      timeout=timeout)
        return list(msg.body)

    def close(self) -> None:
        self.client.close()


def test_a_node_moves_while_the_payload_runs(daemon: tuple[int, str]) -> None:
    pid, address = daemon
    src, dst = two_nodes()
    name = "mover"
    path = make_vm(address, name, src)
    watcher = Watcher(address)
    try:
        assert on_nodes(pid, name, address, path) == {src: PAGES}
        before = passes(address, path)
        (job,) = call(address, path, VM_IFACE, "MigrateNumaNode", "uu", "0", str(dst))
        job_id, _, vm, result = watcher.removed(job)
        assert (job, vm, result) == (f"/org/kvmnuma1/job/{job_id}", path, "done")

        # Progress rose monotonically to the total, as an outside client saw it
        moved, totals = watcher.seen(job, "PagesMoved"), watcher.seen(job, "PagesTotal")
        assert totals == [PAGES], totals  # counted once, at the start
        assert moved == sorted(moved), moved
        assert moved[-1] == PAGES, moved[-5:]
        assert len(moved) >= 3, moved  # published while it ran, not only at the end
        times = watcher.seen(job, "time")  # at most every 100 ms (+ the count and the end)
        assert len(times) <= (times[-1] - times[0]) / 0.1 + 5, (len(times), times[-1] - times[0])
        assert watcher.seen(job, "State") == ["done"]
        print(f"moved {PAGES} pages from host node {src} to {dst} in {times[-1] - times[0]:.2f} s, "
              f"{len(moved)} progress updates")

        # >= 99 % on the destination by numa_maps; the map and policy follow it
        pages = on_nodes(pid, name, address, path)
        assert pages.get(dst, 0) >= 0.99 * sum(pages.values()), pages
        assert prop(address, path, VM_IFACE, "NodeMap") == [dst]
        assert numa_maps_of_slot(name, 1, pid).policy == f"bind:{dst}"
        # the guest ran on through the move
        wait_until(lambda: passes(address, path) > before, "the payload to pass again", timeout=300)
        decisions = {row[0]: row for row in call(address, path, VM_IFACE, "GetDecisions")[0]}
        assert decisions["guest node 0"][1:4] == ["caller", "caller-migrate", f"host node {dst}"]
    finally:
        watcher.close()
        call(address, MGR, MGR_IFACE, "DestroyVM", "s", name)


def test_cancel_half_way_leaves_the_vm_running_and_the_pages_split(daemon: tuple[int, str]) -> None:
    pid, address = daemon
    src, dst = two_nodes()
    name = "halfway"
    path = make_vm(address, name, src)
    watcher = Watcher(address, cancel_at=PAGES // 2)
    try:
        (job,) = call(address, path, VM_IFACE, "MigrateNumaNode", "uu", "0", str(dst))
        *_, result = watcher.removed(job)
        progress = watcher.seen(job, "PagesMoved")
        assert result == "cancelled", (progress[-5:], watcher.cancel_sent_at)
        moved = progress[-1]  # the last PropertiesChanged, sent as the job ended
        assert PAGES // 2 <= watcher.cancel_sent_at[job] <= moved < PAGES, (watcher.cancel_sent_at, moved)
        assert progress == sorted(progress)
        assert watcher.seen(job, "State") == ["cancelled"]
        print(f"Cancel sent at {watcher.cancel_sent_at[job]} pages moved, the job stopped at {moved} "
              f"of {PAGES}")

        # The split, to the page: what moved is on the destination, the rest where it was
        assert on_nodes(pid, name, address, path) == {src: PAGES - moved, dst: moved}
        # The definition keeps the old map (the job did not finish) and the policy points back there
        assert prop(address, path, VM_IFACE, "NodeMap") == [src]
        assert numa_maps_of_slot(name, 1, pid).policy == f"bind:{src}"
        # Residency says the same, measured (the next sample, within a period or two)
        expected = [[0, src, PAGES - moved, moved, pytest.approx((PAGES - moved) / PAGES)]]
        wait_until(lambda: prop(address, path, VM_IFACE, "Residency") == expected,
                   f"Residency to show {expected}", timeout=60)
        # The VM runs on
        assert prop(address, path, VM_IFACE, "State") == "running"
        before = passes(address, path)
        wait_until(lambda: passes(address, path) > before, "the payload to pass again", timeout=300)
        assert on_nodes(pid, name, address, path) == {src: PAGES - moved, dst: moved}  # nothing drifted

        # A second job may then finish the move
        watcher.cancel_at = None
        (job,) = call(address, path, VM_IFACE, "MigrateNumaNode", "uu", "0", str(dst))
        assert watcher.removed(job)[3] == "done"
        assert watcher.seen(job, "PagesTotal") == [PAGES - moved]  # only what was left off the destination
        pages = on_nodes(pid, name, address, path)
        assert pages.get(dst, 0) >= 0.99 * sum(pages.values()), pages
    finally:
        watcher.close()
        call(address, MGR, MGR_IFACE, "DestroyVM", "s", name)
