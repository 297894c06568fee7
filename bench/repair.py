"""Issue 14's repair figure: how long a misplaced guest stays misplaced.

``python -m bench --only repair`` (needs 2+ host nodes with CPUs: the NUMA
guest of ``python -m bench.guest``).  One misplacement, three repairers, each
with its own defaults, as an administrator would run them:

- **kvmnumad**: a local-first VM (2 vCPUs, one guest node of 320 MiB, every
  page resident, AutoBalance on by its policy) whose memory is moved to the
  other host node from outside (``migratepages DAEMON_PID A B``); the daemon
  runs with its default balancing period (10 s).  Repaired when the vCPU
  threads' affinity (sched_getaffinity) and >= 99 % of the slot's pages
  (numa_maps) are on one host node, whichever way the balancer chose.
- **numad** (Debian's numad, ``-S 0 -p PID``, its default 5-15 s scan): a plain
  process of the same shape (2 threads, 320 MiB anonymous, over numad's
  300 MB floor), its threads pinned to node A's CPUs and its memory moved to
  node B by the same migratepages.  numad ignores processes under half a CPU,
  so the threads keep rewriting their memory (ctypes.memset, without the
  GIL); the VM's vCPUs are idle (they halt after one pass), which only makes
  the balancer's job no easier: it has no CPU use to follow.
- **the kernel's automatic NUMA balancing** (``kernel.numa_balancing=1``, its
  default scan rates): the same busy plain process, its threads unpinned once
  the memory is moved.  Repaired when >= 99 % of the pages are on the node of
  the CPU every thread last ran on, for three samples in a row.

Each repairer is given REPAIR_LIMIT seconds; one that does not repair in that
time counts as not repaired (the figure says how many runs).  Times are TCG
times; only the ratios mean something.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.daemonproc import Daemon
from bench.report import Row, median

MiB = 1 << 20
SIZE_MIB = 320  # over numad's 300 MB floor
VCPUS = 2
REPAIR_LIMIT = 90.0
SAMPLE = 0.2
BUS = "org.kvmnuma1"
WORKLOAD = Path(__file__).resolve().parent / "in_guest" / "workload.py"


def _nodes_with_cpus() -> dict[int, frozenset[int]]:
    out: dict[int, frozenset[int]] = {}
    for d in sorted(Path("/sys/devices/system/node").glob("node[0-9]*")):
        cpus = _cpulist(d.joinpath("cpulist").read_text())
        if cpus:
            out[int(d.name[4:])] = cpus
    return out


def _cpulist(text: str) -> frozenset[int]:
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(cpus)


def _pages(pid: int, match: Callable[[list[str]], bool]) -> dict[int, int]:
    """Pages per node of the numa_maps lines ``match`` picks."""
    pages: dict[int, int] = {}
    with open(f"/proc/{pid}/numa_maps") as f:
        for line in f:
            parts = line.split()
            if not match(parts):
                continue
            for tok in parts[2:]:
                if tok.startswith("N") and "=" in tok:
                    node, n = tok[1:].split("=")
                    pages[int(node)] = pages.get(int(node), 0) + int(n)
    return pages


def _node_of(cpus: frozenset[int], nodes: dict[int, frozenset[int]]) -> int | None:
    hit = [n for n, c in nodes.items() if cpus & c]
    return hit[0] if len(hit) == 1 else None


def _local(pages: dict[int, int], node: int | None) -> bool:
    total = sum(pages.values())
    return node is not None and total > 0 and pages.get(node, 0) / total >= 0.99


def _wait_repaired(repaired: Callable[[], bool], t0: float, streak: int = 1) -> float | None:
    """Seconds from ``t0`` until ``repaired()`` holds ``streak`` samples in a row; None past the limit."""
    seen = 0
    while time.monotonic() - t0 < REPAIR_LIMIT:
        seen = seen + 1 if repaired() else 0
        if seen >= streak:
            return time.monotonic() - t0
        time.sleep(SAMPLE)
    return None


def _migratepages(pid: int, src: int, dst: int) -> None:
    subprocess.run(
        ["migratepages", str(pid), str(src), str(dst)], check=True, capture_output=True, timeout=120
    )


# ------------------------------------------------------------------ kvmnumad
def _busctl(address: str, *args: str) -> object:
    out = subprocess.run(
        ["busctl", f"--address={address}", "--json=short", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return json.loads(out.stdout)["data"] if out.stdout.strip() else None


def _kvmnumad_once(daemon: Daemon, name: str, nodes: dict[int, frozenset[int]]) -> float | None:
    a = daemon.address
    reply = _busctl(
        a,
        "call",
        BUS,
        "/org/kvmnuma1",
        "org.kvmnuma1.Manager",
        "CreateVM",
        "suta{sv}",
        name,
        str(VCPUS),
        str(SIZE_MIB * MiB),
        "4",
        "numa_nodes",
        "u",
        "1",
        "policy",
        "s",
        "local-first",
        "prealloc",
        "b",
        "true",
        "passes",
        "u",
        "1",
    )
    assert isinstance(reply, list)
    path = str(reply[0])
    try:
        _busctl(a, "call", BUS, path, "org.kvmnuma1.VM", "Start")
        threads = _busctl(a, "get-property", BUS, path, "org.kvmnuma1.VM", "VcpuThreads")
        assert isinstance(threads, list)
        tids = [int(t) for _v, t in threads]
        mark = f"memfd:kvmnumad-{name}-node"

        def pages() -> dict[int, int]:
            return _pages(daemon.pid, lambda parts: any(mark in p for p in parts))

        def vcpu_node() -> int | None:
            cpus = frozenset().union(*(os.sched_getaffinity(t) for t in tids))
            return _node_of(frozenset(cpus), nodes)

        home = vcpu_node()
        if home is None or not _local(pages(), home):
            raise RuntimeError(f"the VM was not placed on one node to begin with: {pages()}")
        other = next(n for n in nodes if n != home)
        t0 = time.monotonic()
        _migratepages(daemon.pid, home, other)
        _moved.append(time.monotonic() - t0)
        after = pages()  # the repair may have begun already: said, not judged
        took = _wait_repaired(lambda: _local(pages(), vcpu_node()), t0)
        _last["kvmnumad"] = (
            f"{_state(pages(), vcpu_node())}, right after migratepages {dict(sorted(after.items()))}"
        )
        return took
    finally:
        _busctl(a, "call", BUS, "/org/kvmnuma1", "org.kvmnuma1.Manager", "DestroyVM", "s", name)


# ------------------------------------------------------------- plain process
@contextlib.contextmanager
def _workload(cpus: frozenset[int]) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """The plain process, started on ``cpus`` (so its memory is first touched
    there); (process, address of its memory) once every page is resident."""
    proc = subprocess.Popen(
        [
            "taskset",
            "-c",
            ",".join(map(str, sorted(cpus))),
            sys.executable,
            str(WORKLOAD),
            str(SIZE_MIB),
            str(VCPUS),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        if not line:
            raise RuntimeError("the workload did not start")
        yield proc, int(line[0], 16)
    finally:
        proc.kill()
        proc.wait()


def _workload_state(
    pid: int, addr: int, nodes: dict[int, frozenset[int]]
) -> tuple[dict[int, int], int | None]:
    # The VMA holding the memory: an anonymous mapping may merge with its neighbours, so the
    # one starting at the highest address <= addr (it is dominated by our 320 MiB).
    with open(f"/proc/{pid}/numa_maps") as f:
        start = max((s for s in (int(line.split()[0], 16) for line in f) if s <= addr), default=addr)
    pages = _pages(pid, lambda parts: int(parts[0], 16) == start)
    last: set[int] = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        if int(tid) == pid:
            continue  # the main thread waits on stdin; the workers are the "vCPUs"
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            last.add(int(stat.rsplit(")", 1)[1].split()[37]))  # field 39: the CPU it last ran on
    return pages, _node_of(frozenset(last), nodes)


def _numad_once(nodes: dict[int, frozenset[int]]) -> float | None:
    a, b = list(nodes)[:2]
    with _workload(nodes[a]) as (proc, addr):
        t0 = time.monotonic()
        _migratepages(proc.pid, a, b)
        started = subprocess.run(
            ["numad", "-S", "0", "-p", str(proc.pid)], capture_output=True, text=True, timeout=30, check=False
        )
        try:
            if started.returncode != 0:
                raise RuntimeError(f"numad did not start: {started.stderr.strip()[:200]}")
            took = _wait_repaired(lambda: _local(*_workload_state(proc.pid, addr, nodes)), t0)
            _last["numad"] = _state(*_workload_state(proc.pid, addr, nodes))
            if took is None:
                _last["numad"] += f"; numad.log: {_numad_log_tail()}"
            return took
        finally:
            subprocess.run(["numad", "-i", "0"], capture_output=True, timeout=30, check=False)  # ends numad


def _autonuma_once(nodes: dict[int, frozenset[int]]) -> float | None:
    a, b = list(nodes)[:2]
    knob = Path("/proc/sys/kernel/numa_balancing")
    before = knob.read_text().strip()
    with _workload(nodes[a]) as (proc, addr):
        t0 = time.monotonic()
        _migratepages(proc.pid, a, b)
        every = ",".join(map(str, sorted(frozenset().union(*nodes.values()))))
        subprocess.run(["taskset", "-a", "-p", "-c", every, str(proc.pid)], check=True, capture_output=True)
        knob.write_text("1\n")
        try:
            took = _wait_repaired(lambda: _local(*_workload_state(proc.pid, addr, nodes)), t0, streak=3)
            _last["numa_balancing"] = _state(*_workload_state(proc.pid, addr, nodes))
            return took
        finally:
            knob.write_text(f"{before}\n")


_moved: list[float] = []  # migratepages' own time, in every figure
_last: dict[str, str] = {}  # where each repairer left the last run


def _state(pages: dict[int, int], node: int | None) -> str:
    total = sum(pages.values()) or 1
    where = "spread over nodes" if node is None else f"on node {node}"
    share = "" if node is None else f", {pages.get(node, 0) / total:.0%} of the pages there"
    return f"threads {where}{share} (pages per node {dict(sorted(pages.items()))})"


def _numad_log_tail() -> str:
    try:
        lines = Path("/var/log/numad.log").read_text(errors="replace").splitlines()
    except OSError:
        return "no /var/log/numad.log"
    return " | ".join(line.split(": ", 1)[-1] for line in lines[-3:])[:300]


def unavailable(why: str) -> list[Row]:
    return [Row("repair a misplaced guest: kvmnumad vs numad / numa_balancing", None, None, "s", why)]


def repair(runs: int) -> list[Row]:
    nodes = _nodes_with_cpus()
    if len(nodes) < 2:
        return unavailable("needs 2 host nodes with CPUs (python -m bench.guest)")
    ours: list[float | None] = []
    numad: list[float | None] = []
    auto: list[float | None] = []
    with Daemon(log_level="info") as daemon:
        for i in range(runs):
            ours.append(_kvmnumad_once(daemon, f"repair{i}", nodes))
    for _ in range(runs):
        numad.append(_numad_once(nodes))
    if Path("/proc/sys/kernel/numa_balancing").exists():
        for _ in range(runs):
            auto.append(_autonuma_once(nodes))

    def fig(times: list[float | None]) -> tuple[float | None, str]:
        done = [t for t in times if t is not None]
        return (
            median(done) if done else None
        ), f"{len(done)}/{len(times)} repaired within {REPAIR_LIMIT:.0f} s"

    k, k_note = fig(ours)
    n, n_note = fig(numad)
    moved = f"from the start of migratepages (itself {median(_moved):.1f} s)" if _moved else ""
    rows = [
        Row(
            "repair a misplaced guest (memory moved off its vCPUs' node): kvmnumad vs numad, median",
            k,
            n,
            "s",
            f"{moved}; kvmnumad {k_note} (balancing period 10 s), last: {_last.get('kvmnumad')}; "
            f"numad {n_note} (-S 0 -p PID, a busy plain process of the same shape, {SIZE_MIB} MiB, "
            f"{VCPUS} threads), last: {_last.get('numad')}",
        )
    ]
    if auto:
        x, x_note = fig(auto)
        rows.append(
            Row(
                "repair a misplaced guest: kvmnumad vs the kernel's numa_balancing=1, median",
                k,
                x,
                "s",
                f"numa_balancing {x_note} (unpinned threads of the same busy plain process), "
                f"last: {_last.get('numa_balancing')}",
            )
        )
    else:
        rows.append(
            Row(
                "repair a misplaced guest: kvmnumad vs numa_balancing",
                k,
                None,
                "s",
                "no /proc/sys/kernel/numa_balancing in this kernel",
            )
        )
    return rows
