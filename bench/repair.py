"""Issue 14's repair figure: how long a misplaced guest stays misplaced.

``python -m bench.guest --topology 2node --only repair [--quick]`` (needs 2+
host nodes with CPUs; the host has one).  One misplacement, three repairers,
each as an administrator would run it, one after the other in the same guest:

- **kvmnumad**: a local-first VM (2 vCPUs, one guest node of 320 MiB, every
  page resident, AutoBalance on by its policy) in the daemon, run as the unit
  runs it with its default periods (sample 5 s, balance 10 s).  Its vCPUs halt
  after one pass: the balancer has no CPU use to follow, only numa_maps.
- **numad** (Debian's numad, ``-S 0 -p PID``, its default 5-15 s scan), started
  once the memory has moved (its freshest look at the process), on a plain
  process of the same shape: 2 threads, 2 x 160 MiB anonymous (over numad's
  300 MB floor), its threads pinned to node A's CPUs as the vCPUs are.  numad
  ignores a process under half a CPU, so each thread keeps rewriting its share
  (``bench/in_guest/workload.py``).
- **the kernel's automatic NUMA balancing** (``kernel.numa_balancing=1``, its
  default scan rates; off in the guest otherwise): the same busy plain process,
  its threads unpinned and the knob turned on once the memory has moved.

The misplacement is the same for all three: every page of the memory moved
off its threads' node by ``migratepages PID A B`` (numa_maps shows it before
and after).  The figure runs from the end of that migratepages, when all three
face the same whole misplacement: migratepages' own time is the
administrator's, not a repairer's, and it differs by what it moves (the
daemon's memfd pages and its own heap, the plain process's anonymous pages).
The time from its start is in the notes; kvmnumad's balancer already works
during it (it follows the pages as they move).  Repaired
means, observed from outside with the kernel's own views, three samples in a
row (0.2 s apart): every thread's memory has >= 99 % of its pages (numa_maps)
on the thread's node, where a thread's node is the node of its affinity
(sched_getaffinity) when that lies in one node, else the node of the CPU it
last ran on (/proc/PID/task/TID/stat).  A VM's vCPUs share their guest node's
memory; each thread of the plain process has its own share, in a mapping of
its own.  A repairer that does not repair within REPAIR_LIMIT after the
misplacement counts as "> REPAIR_LIMIT s, not repaired", a figure too (numad leaves a process alone
for minutes by design).  Times are TCG times; only the ratios mean something.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.daemonproc import Daemon
from bench.report import Row, median
from kvmnumad import cpulist

MiB = 1 << 20
SIZE_MIB = 320  # over numad's 300 MB floor
VCPUS = 2
REPAIR_LIMIT = 90.0  # seconds from the end of migratepages
SAMPLE = 0.2
STREAK = 3  # samples in a row
LOCAL = 0.99
BUS = "org.kvmnuma1"
WORKLOAD_START = 180.0  # seconds for it to touch its memory and start its threads (TCG: a few)
WORKLOAD = Path(__file__).resolve().parent / "in_guest" / "workload.py"
NUMAD_LOG = Path("/var/log/numad.log")
NUMAD_PIDFILE = Path("/var/run/numad.pid")
_NUMAD_DATE = re.compile(r"^\w{3} \w{3} +\d+ [\d:]+ \d{4}: ")  # "Tue Dec  1 18:04:02 2026: "
KNOB = Path("/proc/sys/kernel/numa_balancing")
Nodes = dict[int, frozenset[int]]


def _nodes_with_cpus() -> Nodes:
    out: Nodes = {}
    for d in sorted(Path("/sys/devices/system/node").glob("node[0-9]*")):
        cpus = cpulist.parse(d.joinpath("cpulist").read_text())
        if cpus:
            out[int(d.name[4:])] = cpus
    return out


def _node_of(cpus: frozenset[int], nodes: Nodes) -> int | None:
    hit = [n for n, c in nodes.items() if cpus & c]
    return hit[0] if len(hit) == 1 else None


def _thread_node(pid: int, tid: int, nodes: Nodes) -> int | None:
    """The node a thread runs on, as the kernel says: its affinity's, else its last CPU's."""
    try:
        node = _node_of(frozenset(os.sched_getaffinity(tid)), nodes)
        if node is not None:
            return node
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except OSError:
        return None
    last = int(stat.rsplit(")", 1)[1].split()[36])  # field 39, "processor" (fields 3.. follow the comm)
    return _node_of(frozenset({last}), nodes)


@dataclass
class Subject:
    """A process whose threads each use some of its memory: ``parts`` pairs threads with the
    numa_maps lines (picked by ``match``) of the memory they use."""

    pid: int
    nodes: Nodes
    parts: list[tuple[list[int], Callable[[list[str]], bool]]] = field(default_factory=list)

    def state(self) -> list[tuple[int | None, dict[int, int]]]:
        """Per part: the one node its threads are on (None: none or several), its pages per node."""
        with open(f"/proc/{self.pid}/numa_maps") as f:
            lines = [line.split() for line in f]
        out: list[tuple[int | None, dict[int, int]]] = []
        for tids, match in self.parts:
            pages: dict[int, int] = {}
            for parts in lines:
                if match(parts):
                    for tok in parts[2:]:
                        if tok.startswith("N") and "=" in tok:
                            node, n = tok[1:].split("=")
                            pages[int(node)] = pages.get(int(node), 0) + int(n)
            where = {_thread_node(self.pid, t, self.nodes) for t in tids}
            out.append((where.pop() if len(where) == 1 else None, pages))
        return out

    def repaired(self) -> bool:
        return all(_local(pages, node) for node, pages in self.state())

    def pages_on(self, node: int) -> float:
        """The share of all its pages on ``node``."""
        total = on = 0
        for _n, pages in self.state():
            total += sum(pages.values())
            on += pages.get(node, 0)
        return on / total if total else 0.0

    def describe(self) -> str:
        said = []
        for node, pages in self.state():
            total = sum(pages.values()) or 1
            where = "threads on no one node" if node is None else (
                f"threads on node {node}, {pages.get(node, 0) / total:.0%} of pages there")
            said.append(f"{where} {dict(sorted(pages.items()))}")
        return "; ".join(said)


def _local(pages: dict[int, int], node: int | None) -> bool:
    total = sum(pages.values())
    return node is not None and total > 0 and pages.get(node, 0) / total >= LOCAL


@dataclass
class Outcome:
    """One repairer's run: seconds from the end of migratepages (None: not within the limit)."""

    took: float | None
    moved: float  # migratepages' own time
    misplaced: float  # share of the pages on the destination node right after migratepages
    end: str  # where it left the subject
    extra: str = ""


def _misplace(subject: Subject, src: int, dst: int) -> tuple[float, float, float]:
    """migratepages PID src dst: (when it ended, its own seconds, share of pages on dst just after)."""
    if not subject.repaired():
        raise RuntimeError(f"not placed on one node to begin with: {subject.describe()}")
    t0 = time.monotonic()
    subprocess.run(["migratepages", str(subject.pid), str(src), str(dst)], check=True,
                   capture_output=True, timeout=300)
    end = time.monotonic()
    return end, end - t0, subject.pages_on(dst)


def _wait_repaired(subject: Subject, t0: float) -> float | None:
    """Seconds from ``t0`` to the first of STREAK repaired samples in a row; None past the limit."""
    seen, first = 0, 0.0
    while time.monotonic() - t0 < REPAIR_LIMIT:
        now = time.monotonic()
        if subject.repaired():
            first = first if seen else now
            seen += 1
            if seen >= STREAK:
                return first - t0
        else:
            seen = 0
        time.sleep(SAMPLE)
    return None


# ------------------------------------------------------------------ kvmnumad
def _busctl(address: str, *args: str) -> object:
    # busctl's own method call timeout is 25 s: a 320 MiB prealloc under TCG can take longer
    out = subprocess.run(
        ["busctl", f"--address={address}", "--json=short", "--timeout=300", *args],
        check=True, capture_output=True, text=True, timeout=330,
    )  # fmt: skip
    return json.loads(out.stdout)["data"] if out.stdout.strip() else None


def _kvmnumad_once(daemon: Daemon, name: str, nodes: Nodes) -> Outcome:
    a = daemon.address
    reply = _busctl(
        a, "call", BUS, "/org/kvmnuma1", "org.kvmnuma1.Manager", "CreateVM", "suta{sv}",
        name, str(VCPUS), str(SIZE_MIB * MiB), "4",
        "numa_nodes", "u", "1", "policy", "s", "local-first", "prealloc", "b", "true", "passes", "u", "1",
    )  # fmt: skip
    assert isinstance(reply, list)
    path = str(reply[0])
    try:
        _busctl(a, "call", BUS, path, "org.kvmnuma1.VM", "Start")
        threads = _busctl(a, "get-property", BUS, path, "org.kvmnuma1.VM", "VcpuThreads")
        assert isinstance(threads, list)
        mark = f"memfd:kvmnumad-{name}-node"
        vm = Subject(daemon.pid, nodes, [([int(t) for _v, t in threads],
                                          lambda parts: any(mark in p for p in parts))])
        home = vm.state()[0][0]
        if home is None:
            raise RuntimeError(f"the VM's vCPUs are not on one node: {vm.describe()}")
        end, moved, misplaced = _misplace(vm, home, next(n for n in nodes if n != home))
        took = _wait_repaired(vm, end)
        return Outcome(took, moved, misplaced, vm.describe())
    finally:
        _busctl(a, "call", BUS, "/org/kvmnuma1", "org.kvmnuma1.Manager", "DestroyVM", "s", name)


# ------------------------------------------------------------- plain process
@contextlib.contextmanager
def _workload(cpus: frozenset[int], nodes: Nodes) -> Iterator[Subject]:
    """The plain process, started on ``cpus`` (so its memory is first touched there), once every
    page is resident: each thread with its own share."""
    proc = subprocess.Popen(
        ["taskset", "-c", cpulist.format(cpus), sys.executable, str(WORKLOAD), str(SIZE_MIB), str(VCPUS)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        # A bounded wait: a stuck workload would otherwise hang the guest until its timeout, the
        # heartbeat keeping the launcher's silence watch quiet.
        ready, _w, _x = select.select([proc.stdout], [], [], WORKLOAD_START)
        line = proc.stdout.readline() if ready else ""
        if not line.strip():
            raise RuntimeError(f"the workload did not start within {WORKLOAD_START:.0f} s "
                               f"(status {proc.poll()})")

        def starts_at(addr: int) -> Callable[[list[str]], bool]:
            return lambda parts: int(parts[0], 16) == addr

        yield Subject(proc.pid, nodes, [([tid], starts_at(addr)) for tid, addr, _size in json.loads(line)])
    finally:
        proc.kill()
        proc.wait()


def _numad_pid() -> int | None:
    try:
        pid = int(NUMAD_PIDFILE.read_text().split()[0])
        return pid if Path(f"/proc/{pid}/comm").read_text().strip() == "numad" else None
    except (OSError, ValueError, IndexError):
        return None


def _numad_once(nodes: Nodes) -> Outcome:
    a, b = list(nodes)[:2]
    if _numad_pid() is not None:
        raise RuntimeError(f"a numad is running already (pid {_numad_pid()}): not ours to drive")
    log_from = NUMAD_LOG.stat().st_size if NUMAD_LOG.exists() else 0
    with _workload(nodes[a], nodes) as proc:
        end, moved, misplaced = _misplace(proc, a, b)
        # -l 7 (debug) only says more in its log, why it left the process alone; it decides the same
        started = subprocess.run(["numad", "-S", "0", "-p", str(proc.pid), "-l", "7"], capture_output=True,
                                 text=True, timeout=60, check=False)
        try:
            if started.returncode != 0:
                raise RuntimeError(f"numad did not start: {started.stderr.strip()[:200]}")
            took = _wait_repaired(proc, end)
            return Outcome(took, moved, misplaced, proc.describe(),
                           f"numad.log: {_numad_log(log_from, proc.pid)}")
        finally:
            _stop_numad()


def _stop_numad() -> None:
    """``numad -i 0`` (its way to end the daemon), then SIGTERM to the one we started if it lingers."""
    pid = _numad_pid()
    subprocess.run(["numad", "-i", "0"], capture_output=True, timeout=60, check=False)
    deadline = time.monotonic() + 20
    while pid is not None and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid is not None and Path(f"/proc/{pid}").exists():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def _numad_log(offset: int, pid: int) -> str:
    """What numad logged in this run that says what it made of the process: its last view of each
    node, its last line on the process, and its first and last decisions."""
    try:
        with NUMAD_LOG.open("rb") as f:
            f.seek(offset)
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return f"no {NUMAD_LOG}"
    picked: dict[str, str] = {}
    for line in lines:
        text = _NUMAD_DATE.sub("", line)
        if text.startswith("Node "):
            picked[text.split(":", 1)[0]] = text  # "Node 0: MBs_total ..., CPUs_free ..."
        elif f"PID {pid}:" in text:
            picked["process"] = text
        elif any(w in text for w in ("Skipping", "Advising", "insignificant", "Moving", "migrat", "bind")):
            picked.setdefault("first decision", text)  # the one that stamped the process, often
            picked["decision"] = text
    if picked.get("first decision") == picked.get("decision"):
        picked.pop("first decision", None)
    said = " | ".join(" ".join(v.split()) for v in picked.values())
    return said[:700] or f"nothing on pid {pid} ({len(lines)} lines)"


def _autonuma_once(nodes: Nodes) -> Outcome:
    a, b = list(nodes)[:2]
    before = KNOB.read_text().strip()
    with _workload(nodes[a], nodes) as proc:
        end, moved, misplaced = _misplace(proc, a, b)
        every = cpulist.format(frozenset().union(*nodes.values()))
        subprocess.run(["taskset", "-a", "-p", "-c", every, str(proc.pid)], check=True, capture_output=True)
        KNOB.write_text("1\n")
        try:
            took = _wait_repaired(proc, end)
            return Outcome(took, moved, misplaced, proc.describe())
        finally:
            KNOB.write_text(f"{before}\n")


# --------------------------------------------------------------------- figure
def unavailable(why: str) -> list[Row]:
    return [Row("repair a misplaced guest: kvmnumad vs numad / numa_balancing", None, None, "s", why)]


def _attempt(run: Callable[[], Outcome]) -> Outcome | str:
    """One run, or why it could not be measured (said in the row, and the other repairers still run)."""
    try:
        return run()
    except Exception as e:  # a broken repairer must not lose the others' figures
        return f"{type(e).__name__}: {e}"[:600]


@dataclass
class Figure:
    name: str
    runs: list[Outcome | str]

    @property
    def outcomes(self) -> list[Outcome]:
        return [r for r in self.runs if isinstance(r, Outcome)]

    @property
    def value(self) -> float | None:
        """The median repair time, a run that did not repair counting as infinite (the upper median
        of an even count); None when that median did not repair, or nothing was measured."""
        times = sorted(o.took if o.took is not None else math.inf for o in self.outcomes)
        mid = times[len(times) // 2] if times else math.inf
        return None if math.isinf(mid) else mid

    def _since_start(self) -> str:
        """With migratepages' own time: from its start (median of the repaired runs)."""
        since = [o.took + o.moved for o in self.outcomes if o.took is not None]
        return f"{median(since):.1f} s from migratepages' start; " if since else ""

    def said(self) -> str:
        """"median X s" or "> LIMIT s, not repaired", with how many runs did and the last run's end."""
        runs = self.outcomes
        failed = [r for r in self.runs if isinstance(r, str)]
        if not runs:
            return f"{self.name}: not measured: {failed[-1] if failed else 'no run'}"
        done = [o.took for o in runs if o.took is not None]
        head = (f"{self.value:.1f} s after migratepages ended" if self.value is not None
                else f"> {REPAIR_LIMIT:.0f} s, not repaired")
        last = runs[-1]
        text = (f"{self.name}: {head} ({len(done)}/{len(runs)} repaired within {REPAIR_LIMIT:.0f} s"
                f"{', times ' + ', '.join(f'{t:.1f}' for t in done) if len(runs) > 1 and done else ''}; "
                f"{self._since_start()}migratepages {median([o.moved for o in runs]):.1f} s, after it "
                f"{min(o.misplaced for o in runs):.0%} of pages off the threads' node; "
                f"last run ended: {last.end}{'; ' + last.extra if last.extra else ''})")
        return text + (f"; {len(failed)} run(s) failed: {failed[-1]}" if failed else "")


def _row(title: str, ours: Figure, theirs: Figure, how: str) -> Row:
    k, b = ours.value, theirs.value
    if k is not None and b is None and theirs.outcomes:
        bound = f"ratio < {k / REPAIR_LIMIT:.2g} (kvmnumad / the bound); "
    else:
        bound = ""
    return Row(title, k, b, "s", f"{bound}{theirs.said()}; {how}")


def repair(runs: int) -> list[Row]:
    nodes = _nodes_with_cpus()
    if len(nodes) < 2:
        return unavailable("needs 2 host nodes with CPUs (python -m bench.guest --topology 2node)")
    ours = Figure("kvmnumad", [])
    started = ""
    try:
        t = time.monotonic()
        with Daemon(log_level="info") as daemon:
            started = f"daemon up in {time.monotonic() - t:.1f} s"
            for i in range(runs):
                ours.runs.append(_attempt(functools.partial(_kvmnumad_once, daemon, f"repair{i}", nodes)))
    except RuntimeError as e:  # the daemon did not come up: Daemon says why, with its log
        ours.runs.append(f"{e}"[:1500])
    numad = Figure("numad", [_attempt(lambda: _numad_once(nodes)) for _ in range(runs)])
    auto = Figure("numa_balancing", [])
    if KNOB.exists():
        auto.runs += [_attempt(lambda: _autonuma_once(nodes)) for _ in range(runs)]
    else:
        auto.runs.append("no /proc/sys/kernel/numa_balancing in this kernel")
    shape = (f"{SIZE_MIB} MiB, {VCPUS} threads; the same misplacement (migratepages of all its memory off "
             f"its threads' node), timed from migratepages' end until every thread's memory is >= 99 % "
             f"on its node for {STREAK} samples")
    return [
        Row("repair a misplaced guest: kvmnumad, median", ours.value, None, "s",
            f"{ours.said()}; local-first VM, AutoBalance on, balance period 10 s, {started}; {shape}"),
        _row("repair a misplaced guest: kvmnumad vs numad, median", ours, numad,
             "numad -S 0 -p PID (default 5-15 s scan), started after migratepages, on a busy plain process "
             "of the same shape, threads pinned to the first node"),
        _row("repair a misplaced guest: kvmnumad vs the kernel's numa_balancing=1, median", ours, auto,
             "the same busy plain process, threads unpinned and the knob set after migratepages"),
    ]
