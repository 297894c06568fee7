"""Issue 15's figure: from the adopt call to every vCPU thread pinned, on a real QEMU.

``python -m bench.adopt [--runs N]``.  QEMU (-accel kvm -S, 4 vCPUs, 256 MiB)
is started afresh for each run; Manager.adopt_process with policy
local-first discovers it from /proc and pins every vCPU thread to its guest
node's host CPUs, and the run ends when sched_getaffinity of each
``CPU n/KVM`` thread (read here) shows it.  The baseline, in the same run on
the same QEMU, is what a script does by hand: list /proc/PID/task, read each
comm, sched_setaffinity each vCPU thread.  The ratio says what discovery,
checks and bookkeeping cost on top of the syscalls.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.report import Row, median, percentile, table
from kvmnumad.adopt.discovery import AdoptOptions
from kvmnumad.manager import Manager
from kvmnumad.model import Policy

VCPUS = 4


def _qemu() -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "kvm", "-smp", str(VCPUS), "-m", "256",
         "-name", "bench,debug-threads=on", "-nodefaults", "-display", "none", "-S"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while len(_by_hand_tids(proc.pid)) < VCPUS:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("QEMU did not start its vCPU threads")
        time.sleep(0.02)
    return proc


def _by_hand_tids(pid: int) -> list[int]:
    tids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text()
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
            continue
        if comm.startswith("CPU ") and comm.rstrip().endswith("/KVM"):
            tids.append(int(tid))
    return tids


def adopt_to_pinned(runs: int) -> list[Row]:
    manager = Manager(cpusets=False)
    target = manager.topology().cpus_of_node(0)
    ours: list[float] = []
    floor: list[float] = []
    try:
        for i in range(runs):
            q = _qemu()
            try:
                t0 = time.perf_counter()
                vm = manager.adopt_process(q.pid, AdoptOptions(name=f"b{i}", policy=Policy.LOCAL_FIRST))
                tids = [tid for _v, tid in vm.vcpu_threads()]
                if not all(os.sched_getaffinity(t) == target for t in tids):
                    raise RuntimeError("adopt returned before every vCPU was pinned")
                ours.append((time.perf_counter() - t0) * 1e6)
                manager.release_vm(vm.name)
                t0 = time.perf_counter()
                for tid in _by_hand_tids(q.pid):
                    os.sched_setaffinity(tid, target)
                floor.append((time.perf_counter() - t0) * 1e6)
            finally:
                q.kill()
                q.wait()
    finally:
        manager.shutdown()
    note = (f"{runs} runs, QEMU -accel kvm -S with {VCPUS} vCPUs; "
            "baseline: /proc comm scan + sched_setaffinity")
    return [
        Row("adopt a QEMU to all vCPUs pinned, p50", median(ours), median(floor), "us", note, bench="adopt"),
        Row("adopt a QEMU to all vCPUs pinned, p99", percentile(ours, 99), percentile(floor, 99), "us", note,
            bench="adopt"),
    ]


# --------------------------------------------------------------- repair vs numad
NUMAD_WAIT = 60.0  # seconds numad is given to repair the same misplacement


def _backend_pages(pid: int) -> dict[int, int]:
    """Pages per node of QEMU's memfd backends, from its numa_maps."""
    out: dict[int, int] = {}
    for line in Path(f"/proc/{pid}/numa_maps").read_text().splitlines():
        if "memory-backend-memfd" in line:
            for f in line.split():
                if f.startswith("N") and "=" in f:
                    node, pages = f[1:].split("=")
                    out[int(node)] = out.get(int(node), 0) + int(pages)
    return out


def _repaired(pid: int, node_cpus: dict[int, frozenset[int]]) -> bool:
    """Every vCPU thread runs inside one node, and >= 99 % of the guest memory is on it."""
    pages = _backend_pages(pid)
    total = sum(pages.values())
    for node, cpus in node_cpus.items():
        if cpus and all(os.sched_getaffinity(t) <= cpus for t in _by_hand_tids(pid)):
            return total > 0 and pages.get(node, 0) >= 0.99 * total
    return False


def _misplaced_qemu(sock: Path, cpu_node: int, mem_node: int, mib: int) -> subprocess.Popen[bytes]:
    """vCPUs on ``cpu_node``, all guest memory (prealloc'd) on ``mem_node``:
    numactl, as a careless start does."""
    half = mib // 2
    proc = subprocess.Popen(
        ["numactl", f"--cpunodebind={cpu_node}", f"--membind={mem_node}",
         "qemu-system-x86_64", "-accel", "kvm", "-smp", "2", "-m", str(mib),
         "-name", "misplaced,debug-threads=on", "-nodefaults", "-display", "none", "-S",
         "-qmp", f"unix:{sock},server=on,wait=off",
         "-object", f"memory-backend-memfd,id=m0,size={half}M,prealloc=on",
         "-object", f"memory-backend-memfd,id=m1,size={half}M,prealloc=on",
         "-numa", "node,nodeid=0,cpus=0,memdev=m0", "-numa", "node,nodeid=1,cpus=1,memdev=m1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (sock.exists() and len(_by_hand_tids(proc.pid)) == 2):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("QEMU did not start")
        time.sleep(0.1)
    # Left paused (-S): with QMP cont, vCPU 0 spins in KVM_RUN on the BIOS, and in the TCG guest that
    # slowed everything so much that the run did not end within the guest's 25 min timeout.
    return proc


def repair_vs_numad(runs: int, mib: int = 320) -> list[Row]:
    """A QEMU whose memory sits on node 0 while its vCPUs run on node 1: the
    time until it is local again, by kvmnumad (adopt with QMP, MapNumaNode
    of both guest nodes to node 1), by kvmnumad's balancer alone (adopted
    with AutoBalance on and no placement; it decides which half moves) and
    by numad (-S 0 -p PID) in the same guest."""
    manager = Manager(cpusets=False)
    topo = manager.topology()
    node_cpus = {n: topo.cpus_of_node(n) for n in topo.node_ids()}
    if len([n for n, c in node_cpus.items() if c]) < 2:
        return [Row("repair a misplaced QEMU: kvmnumad vs numad", None, None, "ms",
                    "needs 2 host nodes with CPUs (python -m bench.guest)", bench="adopt-repair")]
    ours: list[float] = []
    balanced: list[float] = []
    theirs: list[float] = []
    what_numad_did = ""
    tmp = Path("/run/kvmnumad-bench-adopt")
    tmp.mkdir(exist_ok=True)
    try:
        for i in range(runs):
            sock = tmp / f"qmp{i}.sock"
            q = _misplaced_qemu(sock, 1, 0, mib)
            try:
                assert not _repaired(q.pid, node_cpus)
                t0 = time.perf_counter()
                vm = manager.adopt_process(q.pid, AdoptOptions(name=f"r{i}", qmp=str(sock)))
                for g in range(vm.numa_nodes):
                    vm.map_numa_node(g, 1)
                if not _repaired(q.pid, node_cpus):
                    raise RuntimeError(f"kvmnumad left {_backend_pages(q.pid)}")
                ours.append((time.perf_counter() - t0) * 1e3)
                manager.release_vm(vm.name)
            finally:
                q.kill()
                q.wait()
            sock.unlink(missing_ok=True)
            q = _misplaced_qemu(sock, 1, 0, mib)
            try:
                balanced.append(_auto_balanced(manager, q.pid, sock, node_cpus, f"b{i}"))
            finally:
                q.kill()
                q.wait()
            sock.unlink(missing_ok=True)
            q = _misplaced_qemu(sock, 1, 0, mib)
            try:
                t0 = time.perf_counter()
                started = subprocess.run(["numad", "-S", "0", "-p", str(q.pid), "-i", "1", "-l", "7"],
                                         capture_output=True, text=True, timeout=30, check=False)
                while time.perf_counter() - t0 < NUMAD_WAIT and not _repaired(q.pid, node_cpus):
                    time.sleep(0.25)
                if _repaired(q.pid, node_cpus):
                    theirs.append((time.perf_counter() - t0) * 1e3)
                else:
                    what_numad_did = (f"numad (exit {started.returncode}, {started.stderr.strip()[:80]!r}) "
                                      f"did not repair it in {NUMAD_WAIT:.0f} s: pages "
                                      f"{_backend_pages(q.pid)}, log: {_numad_log_tail()}")
            finally:
                subprocess.run(["numad", "-i", "0"], capture_output=True, timeout=30, check=False)
                q.kill()
                q.wait()
            sock.unlink(missing_ok=True)
    finally:
        manager.shutdown()
    note = f"{runs} runs, QEMU -accel kvm (nested) {mib} MiB on 2 memfd backends; " + (
        what_numad_did or "numad -S 0 -p PID -i 1")
    return [Row("repair a misplaced QEMU: kvmnumad vs numad, p50", median(ours) if ours else None,
                median(theirs) if theirs else None, "ms", note[:400], bench="adopt-repair"),
            Row("repair a misplaced QEMU: kvmnumad's balancer (AutoBalance) vs numad, p50",
                median(balanced) if balanced else None, median(theirs) if theirs else None, "ms",
                f"adopted with policy manual (nothing placed at adoption), auto_balance on; a pass at once "
                f"and one per {BALANCE_PERIOD:.0f} s, as the daemon's timer makes them",
                bench="adopt-repair")]


BALANCE_PERIOD = 1.0  # s between passes, as `kvmnumad --balance-interval 1` makes them


def _auto_balanced(manager: Manager, pid: int, sock: Path, node_cpus: dict[int, frozenset[int]],
                   name: str) -> float:
    """ms from the adopt call to repaired by balancing passes alone: the
    daemon runs one when a VM is added and then one per period."""
    t0 = time.perf_counter()
    vm = manager.adopt_process(pid, AdoptOptions(name=name, qmp=str(sock), policy=Policy.MANUAL,
                                                 auto_balance=True))
    try:
        deadline = t0 + NUMAD_WAIT
        while not _repaired(pid, node_cpus):
            if time.perf_counter() > deadline:
                raise RuntimeError(f"the balancer left {_backend_pages(pid)} in {NUMAD_WAIT:.0f} s")
            manager.rebalance()
            moving = [j for j in manager.jobs if j.vm == name]
            for j in moving:  # a memory move: repaired when its job is done
                j.wait(NUMAD_WAIT)
            if not moving and not _repaired(pid, node_cpus):
                time.sleep(BALANCE_PERIOD)
        return (time.perf_counter() - t0) * 1e3
    finally:
        manager.release_vm(vm.name)


def _numad_log_tail() -> str:
    try:
        lines = Path("/var/log/numad.log").read_text(errors="replace").splitlines()
    except OSError as e:
        return f"no log ({e.strerror})"
    return " | ".join(line.split(": ", 1)[-1] for line in lines[-4:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.adopt", description=__doc__)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--repair", action="store_true", help="the repair figure against numad (2+ host nodes)")
    args = p.parse_args(argv)
    print(table(repair_vs_numad(args.runs) if args.repair else adopt_to_pinned(args.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
