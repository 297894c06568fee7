"""Figure 5: placement quality per policy, in a multi-node guest (needs 4 host nodes to mean much).

One VM at a time, 4 vCPUs and 4 guest nodes of 8 MiB, the built-in payload
touching its guest node's memory: each vCPU touches its own node's region.
Local share of a guest node = its pages (numa_maps) on the host node of the
CPU its vCPU thread last ran on (/proc/self/task/TID/stat); run delay from
/proc/self/task/TID/schedstat (time runnable but waiting for a CPU).

Baselines, same guest, same payload in 4 raw vCPU threads (rawkvm):
- the kernel default: no mbind (first touch), unpinned threads;
- the same with ``kernel.numa_balancing=1`` for a window of continuous touching;
- the same with numad running (``numad -i 1:1 -p PID``), if installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench import rawkvm
from bench.report import Row, median
from kvmnumad.kvm.payload import TOUCH_PAYLOAD
from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions, Policy
from tests.observe import numa_maps_at

MiB = 1 << 20
NODES = 4
SIZE = 8 * MiB
PAGES = SIZE // 4096
PASSES = 2
POLICIES = (Policy.LOCAL_FIRST, Policy.LOAD_BALANCED, Policy.PREFERRED, Policy.INTERLEAVE)
BALANCING = Path("/proc/sys/kernel/numa_balancing")
# kvm_regs indices of the payload's inputs: rbx base, rcx size, rsi vCPU index, rdi passes
RBX, RCX, RSI, RDI = 1, 2, 4, 5


def _cpu_node() -> dict[int, int]:
    out = {}
    for node in Path("/sys/devices/system/node").glob("node[0-9]*"):
        for cpu in node.glob("cpu[0-9]*"):
            out[int(cpu.name[3:])] = int(node.name[4:])
    return out


def _last_cpu(tid: int) -> int:
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[36])  # field 39, "processor"


def _run_delay_ms(tid: int) -> float:
    return int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[1]) / 1e6


def _measure(regions: list[int], tids: list[int]) -> tuple[list[float], list[float]]:
    """Local share per guest node (region i touched by vCPU i) and run delay per vCPU."""
    nodes = _cpu_node()
    shares = []
    for hva, tid in zip(regions, tids, strict=True):
        pages = numa_maps_at(hva).pages_per_node
        local = nodes[_last_cpu(tid)]
        shares.append(100 * pages.get(local, 0) / max(1, sum(pages.values())))
    return shares, [_run_delay_ms(t) for t in tids]


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def _policy(manager: Manager, policy: Policy) -> tuple[list[float], list[float]]:
    name = f"pq-{policy}"
    vm = manager.create_vm(name, NODES, NODES * SIZE, CreateOptions(numa_nodes=NODES, policy=policy,
                                                                    passes=PASSES, start=True))
    try:
        _wait(lambda: all(s == "halted" for s in vm.runner_states()), 300, f"{name} not halted")
        by_node = {r.guest_node: r.hva for r in vm.memory_regions()}
        tids = [tid for _i, tid in sorted(vm.vcpu_threads())]
        return _measure([by_node[g] for g in range(NODES)], tids)
    finally:
        manager.destroy_vm(name)


def _kernel(kvm_fd: int, window: float, setup: Callable[[], Callable[[], None]] | None = None
            ) -> tuple[list[float], list[float]]:
    """The raw VM, first touch, unpinned; ``window`` s of continuous touching (passes 0) after all
    pages are in; ``setup`` runs before the vCPUs start and returns its undo."""
    raw = rawkvm.RawVm.create(kvm_fd, NODES, SIZE, [0] * NODES, boot=TOUCH_PAYLOAD, bind=False)
    undo = setup() if setup is not None else None
    try:
        passes = 0 if window else PASSES
        raw.start(lambda i: {RBX: rawkvm.BOOT_SIZE + i * SIZE, RCX: SIZE, RSI: i, RDI: passes})
        hvas = [hva for _fd, hva, _size in raw.regions[1:]]
        _wait(lambda: all(numa_maps_at(h).total_pages == PAGES for h in hvas), 300,
              "raw VM pages not all touched")
        time.sleep(window)
        return _measure(hvas, [t.native_id or 0 for t in raw.threads])
    finally:
        if undo is not None:
            undo()
        raw.close()


def _balancing_on() -> Callable[[], None]:
    old = BALANCING.read_text().strip()
    BALANCING.write_text("1")

    def undo() -> None:
        BALANCING.write_text(old)

    return undo


def _numad_on() -> Callable[[], None]:
    exe = shutil.which("numad") or "numad"
    subprocess.run([exe, "-i", "1:1", "-l", "3", "-p", str(os.getpid())], check=True)

    def undo() -> None:
        subprocess.run([exe, "-i", "0"], check=False)

    return undo


def placement(manager: Manager, kvm_fd: int, window: float) -> list[Row]:
    if len(manager.host_nodes()) < NODES:
        return [Row("placement quality, local pages per guest node", None, None, "%",
                    f"needs {NODES} host nodes: run `python -m bench.guest` (boots the 4-node QEMU guest)")]
    base, base_delay = _kernel(kvm_fd, 0)
    rows = []
    how = (f"{NODES} vCPUs, {NODES} guest nodes x {SIZE // MiB} MiB, {PASSES} touch passes; local = pages on "
           "the node of the CPU the node's vCPU last ran on")
    def per_node(shares: list[float]) -> str:
        return ", ".join(f"{v:.0f}" for v in shares)

    for policy in POLICIES:
        shares, delay = _policy(manager, policy)
        goal = "; goal 100 %" if policy == Policy.LOCAL_FIRST else ""
        rows.append(Row(f"placement {policy}: local pages, worst guest node", min(shares), min(base), "%",
                        f"{how}; per guest node {per_node(shares)} (kernel default {per_node(base)}); "
                        f"run delay per vCPU median {median(delay):.1f} ms, max {max(delay):.1f} "
                        f"(kernel default {median(base_delay):.1f}){goal}",
                        higher_is_better=True))
    bal, bal_delay = _kernel(kvm_fd, window, _balancing_on)
    rows.append(Row("  kernel numa_balancing=1: local pages, worst guest node", min(bal), min(base), "%",
                    f"the raw VM after {window:.0f} s of continuous touching with numa_balancing on; "
                    f"per node {per_node(bal)}; run delay median {median(bal_delay):.1f} ms",
                    higher_is_better=True))
    if shutil.which("numad"):
        nd, nd_delay = _kernel(kvm_fd, window, _numad_on)
        rows.append(Row("  numad: local pages, worst guest node", min(nd), min(base), "%",
                        f"the raw VM after {window:.0f} s of continuous touching under "
                        "`numad -i 1:1 -p PID`; "
                        f"per node {per_node(nd)}; run delay median {median(nd_delay):.1f} ms",
                        higher_is_better=True))
    else:
        rows.append(Row("  numad: local pages, worst guest node", None, min(base), "%",
                        "numad not installed (make bench installs it)"))
    return rows
