"""Does a vCPU's saved state come back whole, under nested KVM on TCG?

The systemd guest's handover checks have failed about 1 in 3 boots on
2026-12-01: a resumed vCPU refused by KVM_SET_SREGS (EINVAL), or stopping by
a triple fault (KVM_EXIT_SHUTDOWN) seconds after the resume; host runs (real
KVM) never did.  This separates what the save and restore do from what the
nested vCPU does by itself, with kvmnumad's own kvm/ layer and payload and
no daemon:

- ``in-place``: the vCPUs of one VM run, are parked (kicked out of KVM_RUN,
  as a handover parks them) and run again, on the same vCPU fds;
- ``migrate``: as in-place, while the main thread moves every page of the
  VM to the other host node and back (move_pages) for the whole run;
- ``handover``: each cycle parks them, saves every vCPU's state
  (VcpuFd.save_state), makes a new VM fd on the same memfd and new vCPUs,
  loads the state (restore_state) and runs those.

Each cycle runs the vCPUs for ``--run`` seconds; a fault (SHUTDOWN, a
refused ioctl) is counted, printed with the vCPU's registers, and that arm
starts over from entry.  Run by ``python -m tests.numa_guest --topology
2node --state-cycles N`` (inside the guest), or directly on the host as
the control: ``python tests/numa_guest/state_cycles.py N``.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvmnumad.kvm.errors import KvmError
from kvmnumad.kvm.payload import TOUCH_PAYLOAD, touch_payload_regs
from kvmnumad.kvm.runner import VcpuRunner, install_kick_signal
from kvmnumad.kvm.system import Kvm
from kvmnumad.kvm.vcpu import VcpuFd
from kvmnumad.kvm.vm import VmFd
from kvmnumad.libc import PAGE_SIZE
from kvmnumad.numa.memory import move_range_to_node
from tests.observe import host_nodes

MiB = 1 << 20
ENTRY = 0x1000
SLICE = 4 * MiB  # each vCPU's pages, after the first MiB


class Guest:
    def __init__(self, kvm: Kvm, vcpus: int) -> None:
        self.size = MiB + vcpus * SLICE
        self.fd = os.memfd_create("state-cycles")
        os.ftruncate(self.fd, self.size)
        self.mem = mmap.mmap(self.fd, self.size)
        self.mem[ENTRY:ENTRY + len(TOUCH_PAYLOAD)] = TOUCH_PAYLOAD
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        self.kvm = kvm
        self.n = vcpus
        self.vm: VmFd | None = None
        self.fds: list[VcpuFd] = []
        self.runners: list[VcpuRunner] = []
        self.moves = 0
        self.nodes = sorted(host_nodes())

    def make(self) -> None:
        self.vm = self.kvm.create_vm()
        self.vm.set_user_memory_region(0, 0, self.size, self.addr)
        self.fds = [self.vm.create_vcpu(i) for i in range(self.n)]

    def entry(self) -> None:
        for i, v in enumerate(self.fds):
            v.setup_flat32(ENTRY, **touch_payload_regs(MiB + i * SLICE, SLICE, i, 0))

    def passes(self) -> list[int]:
        """Each vCPU's pass number in its slice's first page: the guest's own record."""
        return [int.from_bytes(self.mem[MiB + i * SLICE:MiB + i * SLICE + 4], "little")
                for i in range(self.n)]

    def run(self, seconds: float, migrate: bool = False) -> list[str]:
        before = self.passes()
        self.runners = [VcpuRunner(v, i) for i, v in enumerate(self.fds)]
        for r in self.runners:
            r.start()
        end = time.monotonic() + seconds
        node = 0
        while migrate and time.monotonic() < end:
            # every page of the VM to the other node while its vCPUs write them (as a live
            # migration, the balancer or the kernel's NUMA balancing moves a running VM's pages)
            node = self.nodes[(self.nodes.index(node) + 1) % len(self.nodes)]
            move_range_to_node(self.addr, self.size, node)
            self.moves += 1
        time.sleep(max(0.0, end - time.monotonic()))
        for r in self.runners:
            r.stop(timeout=10)
        bad = [f"vCPU {r.index}: {r.fault}" for r in self.runners if r.fault]
        after = self.passes()
        bad += [f"vCPU {i}: pass {b} -> {a}"
                for i, (b, a) in enumerate(zip(before, after, strict=True)) if a < b]
        bad += self.stale()
        return bad

    def stale(self) -> list[str]:
        """Pages the guest has passed over without its write reaching the memfd: after P
        passes every page of a vCPU's slice holds P-1 or more (the payload writes the pass
        index first, then reports the pass done)."""
        out = []
        for r in self.runners:
            base = MiB + r.index * SLICE
            behind = [off for off in range(0, SLICE, PAGE_SIZE)
                      if int.from_bytes(self.mem[base + off:base + off + 4], "little") + 1 < r.progress]
            if behind:
                out.append(f"vCPU {r.index}: {len(behind)} of {SLICE // PAGE_SIZE} pages behind its "
                           f"{r.progress} passes (first at +{behind[0]:#x})")
        return out

    def unmake(self) -> None:
        for r in self.runners:
            r.close(timeout=10)
        self.runners = []
        for v in self.fds:
            v.close()
        self.fds = []
        if self.vm is not None:
            self.vm.close()
            self.vm = None


def _arm(kvm: Kvm, name: str, cycles: int, vcpus: int, seconds: float) -> int:
    g = Guest(kvm, vcpus)
    g.make()
    g.entry()
    faults = 0
    t0 = time.monotonic()
    for c in range(cycles):
        try:
            bad = g.run(seconds, migrate=name == "migrate")
            if bad:
                raise RuntimeError("; ".join(bad))
            if name == "handover":
                states = [v.save_state() for v in g.fds]
                g.unmake()
                g.make()
                for v, s in zip(g.fds, states, strict=True):
                    v.restore_state(s)
            else:
                for r in g.runners:
                    r.close(timeout=10)
                g.runners = []
        except (KvmError, RuntimeError) as e:
            faults += 1
            print(f"state-cycles: {name}: cycle {c}: FAULT {e}", flush=True)
            for i, v in enumerate(g.fds):
                print(f"state-cycles: {name}:   vCPU {i} {v.describe_state()}", flush=True)
            g.unmake()
            g.make()
            g.entry()
        if c % 25 == 24:
            print(f"state-cycles: {name}: {c + 1} cycles, {faults} fault(s), "
                  f"{time.monotonic() - t0:.0f} s", flush=True)
    passes = g.passes()
    g.unmake()
    print(f"state-cycles: {name}: passes at the end {passes}", flush=True)
    print(f"state-cycles: {name}: {cycles} cycles of {vcpus} vCPUs x {seconds} s: {faults} fault(s), "
          f"{time.monotonic() - t0:.0f} s, {g.moves} whole-VM page moves", flush=True)
    return faults


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("cycles", type=int)
    p.add_argument("--vcpus", type=int, default=4)
    p.add_argument("--run", type=float, default=0.3)
    p.add_argument("--arms", default="in-place,handover")
    a = p.parse_args()
    install_kick_signal()
    with Kvm() as kvm:
        faults = sum(_arm(kvm, arm, a.cycles, a.vcpus, a.run) for arm in a.arms.split(","))
    return 1 if faults else 0


if __name__ == "__main__":
    sys.exit(main())
