"""Inside the numa guest: flip, once and on one CPU, every static key the
tests would flip, and hold them on for the whole session.

A static key is flipped when its count goes 0 -> 1 or 1 -> 0.  Each flip
patches the key's jump sites with text_poke_bp: it writes int3 into code
that other CPUs may be running, then waits three times for an IPI answer
from every CPU.  The tests flip three keys at every boundary where the
guest's last VM or cpuset goes or its first comes, because each test
destroys its VM before the next one makes its own:

- ``preempt_notifier_key``: the first or last KVM VM of the system
  (kvm_create_vm / kvm_destroy_vm).  One of its sites is in
  finish_task_switch, which every CPU runs on every context switch.
- ``kvm_has_noapic_vcpu``: a vCPU without an in-kernel irqchip (kvmnumad's
  have none) created or destroyed.
- ``cpusets_enabled_key`` and ``cpusets_pre_enable_key``: the first or last
  non-root cpuset (the daemon's per-VM cpusets).  Their sites are in the
  page allocator.

Under multi-threaded TCG this has hung the guest.  Every silent freeze in
the kept consoles came within about 10 s of such a boundary.  On
2026-12-01 a 4-node guest froze at the very first flip, the holder's own,
made with all 4 CPUs online: an RCU stall, and then soft lockups on every
CPU with RIPs in asm_exc_int3 and at finish_task_switch+0x9f (console
4node-20261201T210908).

So the guest boots with one CPU (``maxcpus=1``), and this process runs
before the others are brought online (guest-run.sh).  It makes the flips
while no other CPU can be running the patched code or miss an IPI.  It
holds a KVM VM with one vCPU (never run, so it costs no CPU) and a cpuset
cgroup, which keeps every count >= 1 until the session ends.  No later
create or destroy then patches anything.

    python key_holder.py     # prints "key-holder: holding ..." and sleeps until the guest powers off
    python key_holder.py --kvm-only   # the systemd guest: no cpuset, systemd owns the cgroup tree there
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
from pathlib import Path

KVM_CREATE_VM = 0xAE01
KVM_CREATE_VCPU = 0xAE41
CGROUP = Path("/sys/fs/cgroup")
HOLD = CGROUP / "numa-guest-keys"  # a cpuset of its own, outside every test's and the daemon's


def _hold_cpuset() -> str:
    try:
        (CGROUP / "cgroup.subtree_control").write_text("+cpuset")
        HOLD.mkdir(exist_ok=True)
    except OSError as e:
        return f"no cpuset held ({e.strerror})"
    return f"cpuset {HOLD}"


def main() -> None:
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    cpuset = "no cpuset (--kvm-only)" if "--kvm-only" in sys.argv[1:] else _hold_cpuset()
    print(f"key-holder: holding a KVM VM (fd {vm}) with a vCPU without irqchip (fd {vcpu}) and {cpuset}, "
          f"pid {os.getpid()}", flush=True)
    while True:  # until the guest powers off: an exit would flip the keys back, with every CPU online
        signal.pause()


if __name__ == "__main__":
    main()
