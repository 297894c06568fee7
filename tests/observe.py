"""Independent observers: what the kernel and the bus say, read without asking kvmnumad.

Rule 2 of DEVELOPERS.md: a placement is proven by /proc, taskset, numa_maps,
busctl or journalctl, never by the daemon's own bookkeeping.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import Any

from tests.waiting import wait_until


def parse_cpulist(text: str) -> set[int]:
    """Parse a kernel cpulist such as ``0-2,5``."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-")
            cpus.update(range(int(lo), int(hi) + 1))
        else:
            cpus.add(int(part))
    return cpus


def thread_affinity(pid: int, tid: int) -> set[int]:
    """Cpus_allowed_list of one thread, from /proc."""
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        for line in f:
            if line.startswith("Cpus_allowed_list:"):
                return parse_cpulist(line.split(":", 1)[1])
    raise LookupError(f"no Cpus_allowed_list for {pid}/{tid}")


def taskset_affinity(tid: int) -> set[int]:
    """Affinity as util-linux taskset prints it (``taskset -pc TID``)."""
    out = subprocess.run(["taskset", "-pc", str(tid)], check=True, capture_output=True, text=True).stdout
    # "pid 1234's current affinity list: 0,1"
    return parse_cpulist(out.rsplit(":", 1)[1])


def thread_ids(pid: int | None = None) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid or os.getpid()}/task")}


def open_fds(pid: int | None = None) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid or os.getpid()}/fd")}


@dataclass
class NumaMapsEntry:
    start: int
    policy: str
    pages_per_node: dict[int, int] = field(default_factory=dict)
    anon: int = 0
    file: str | None = None
    raw: str = ""

    @property
    def total_pages(self) -> int:
        return sum(self.pages_per_node.values())


_NODE_RE = re.compile(r"^N(\d+)=(\d+)$")


def numa_maps(pid: int | None = None) -> list[NumaMapsEntry]:
    entries: list[NumaMapsEntry] = []
    with open(f"/proc/{pid or os.getpid()}/numa_maps") as f:
        for line in f:
            parts = line.split()
            entry = NumaMapsEntry(start=int(parts[0], 16), policy=parts[1], raw=line.rstrip())
            for tok in parts[2:]:
                m = _NODE_RE.match(tok)
                if m:
                    entry.pages_per_node[int(m.group(1))] = int(m.group(2))
                elif tok.startswith("anon="):
                    entry.anon = int(tok[5:])
                elif tok.startswith("file="):
                    entry.file = tok[5:]
            entries.append(entry)
    return entries


def numa_maps_of_slot(vm: str, slot: int, pid: int | None = None) -> NumaMapsEntry:
    """The numa_maps line of a VM's memory slot, found by its memfd's name
    (kvmnumad-VM-nodeG-slotS): the bus does not say where guest memory is mapped."""
    name = re.compile(rf"memfd:kvmnumad-{re.escape(vm)}-node\d+-slot{slot}(?!\d)")
    found = [e for e in numa_maps(pid) if e.file and name.search(e.file)]
    if len(found) != 1:
        raise LookupError(f"{len(found)} numa_maps entries for {vm} slot {slot}: {[e.raw for e in found]}")
    return found[0]


def numa_maps_at(address: int, pid: int | None = None) -> NumaMapsEntry:
    """The numa_maps line of the mapping that starts at ``address`` (memfd
    regions are shmem, not anon: match them by start address)."""
    for entry in numa_maps(pid):
        if entry.start == address:
            return entry
    raise LookupError(f"no numa_maps entry starts at {address:#x}")


class BusMonitor:
    """``busctl monitor NAME`` on the bus at ``address``, as JSON lines read without blocking.

    Construction returns once the monitor is attached: a Peer.Ping is sent to
    ``name`` until the monitor shows one (a monitor installs its match rules
    in its own time, and misses what is sent before).  ``sync()`` does the same
    later: whatever the bus routed before it returns is in ``messages()``.
    """

    def __init__(self, address: str, name: str, *, timeout: float = 30) -> None:
        self.address, self.name = address, name
        self.proc = subprocess.Popen(["busctl", f"--address={address}", "--json=short", "monitor", name],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        os.set_blocking(self._fd, False)
        self._buf = b""
        self.seen: list[dict[str, Any]] = []
        try:
            self.sync(timeout=timeout, what=f"busctl monitor {name} to attach")
        except BaseException:
            self.close()
            raise

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        self.seen += [json.loads(ln) for ln in lines if ln.startswith(b"{")]

    def _pings(self) -> int:
        return len(self.calls("Ping", interface="org.freedesktop.DBus.Peer"))

    def sync(self, *, timeout: float = 30, what: str | None = None) -> None:
        """Return once a Ping sent now to ``name`` shows in the monitor's output."""
        before = self._pings()

        def ping_seen() -> bool:
            subprocess.run(["busctl", f"--address={self.address}", "--expect-reply=no", "call", self.name,
                            "/", "org.freedesktop.DBus.Peer", "Ping"],
                           capture_output=True, timeout=30, check=False)
            return self._pings() > before

        wait_until(ping_seen, what or f"busctl monitor {self.name} to show a Ping sent after the others",
                   timeout=timeout, interval=0.1)

    def messages(self) -> list[dict[str, Any]]:
        self._drain()
        return list(self.seen)

    def calls(self, member: str, *, interface: str | None = None) -> list[dict[str, Any]]:
        return [m for m in self.messages() if m.get("type") == "method_call" and m.get("member") == member
                and (interface is None or m.get("interface") == interface)]

    def signals(self, member: str) -> list[dict[str, Any]]:
        return [m for m in self.messages() if m.get("type") == "signal" and m.get("member") == member]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._drain()
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def __enter__(self) -> BusMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def online_cpus() -> set[int]:
    with open("/sys/devices/system/cpu/online") as f:
        return parse_cpulist(f.read())


def node_cpus(node: int) -> set[int]:
    with open(f"/sys/devices/system/node/node{node}/cpulist") as f:
        return parse_cpulist(f.read())


def host_nodes() -> set[int]:
    with open("/sys/devices/system/node/online") as f:
        return parse_cpulist(f.read())


# --- multi-NUMA guest observers (issue 5) ---


@dataclass
class NumactlHardware:
    """What ``numactl -H`` reports: a second opinion next to sysfs."""

    cpus: dict[int, set[int]]
    size_mb: dict[int, int]
    distances: dict[int, dict[int, int]]


def numactl_hardware() -> NumactlHardware:
    out = subprocess.run(["numactl", "-H"], check=True, capture_output=True, text=True).stdout
    hw = NumactlHardware({}, {}, {})
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if m := re.match(r"node (\d+) cpus:(.*)$", line):
            hw.cpus[int(m.group(1))] = {int(c) for c in m.group(2).split()}
        elif m := re.match(r"node (\d+) size: (\d+) MB", line):
            hw.size_mb[int(m.group(1))] = int(m.group(2))
        elif line.startswith("node distances:"):
            header = [int(n) for n in lines[i + 1].split()[1:]]
            for row in lines[i + 2 :]:
                node, *values = row.replace(":", " ").split()
                hw.distances[int(node)] = dict(zip(header, map(int, values), strict=True))
            break
    return hw


def node_distances(node: int) -> list[int]:
    """The kernel's SLIT row for ``node``, from sysfs (index = target node)."""
    with open(f"/sys/devices/system/node/node{node}/distance") as f:
        return [int(d) for d in f.read().split()]


def pages_per_node_in_range(start: int, end: int, pid: int | None = None) -> dict[int, int]:
    """Pages per node summed over the mappings that start in [start, end).

    A guest region can be split into several VMAs (different policies per
    part, mprotect, ...): sum them rather than expect one numa_maps line.
    """
    totals: dict[int, int] = {}
    for entry in numa_maps(pid):
        if start <= entry.start < end:
            for node, pages in entry.pages_per_node.items():
                totals[node] = totals.get(node, 0) + pages
    return totals
