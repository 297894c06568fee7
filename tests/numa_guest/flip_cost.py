"""Inside the numa guest: what flipping KVM's static keys costs, and whether it hangs (key_holder.py).

Each iteration creates a VM and one vCPU without an in-kernel irqchip and
closes both, as every test's VM does at its start and end.  With another
VM and vCPU held, the counts of ``preempt_notifier_key`` and
``kvm_has_noapic_vcpu`` never reach 0 and nothing is patched.  With none
held, every iteration flips both keys twice (0 -> 1 and 1 -> 0), each flip
a text_poke_bp of their sites on every online CPU.  Each case runs with the
other guest CPUs idle, then with a busy loop pinned to each of them.  Times
per iteration (p50, p99, max) go to stdout; a guest that hangs in the
flipping half is the freeze reproduced.  Run by
``python -m tests.numa_guest --topology 2node --flip-cost N``.

guest-run.sh's holder (KEY_HOLDER_PID) is killed for the flipping half,
so that half is what the tests did before the holder; its cpuset stays.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

KVM_CREATE_VM = 0xAE01
KVM_CREATE_VCPU = 0xAE41


def _iteration(kvm: int) -> float:
    t0 = time.perf_counter()
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    os.close(vcpu)
    os.close(vm)  # the vCPU is destroyed with its VM: the 1 -> 0 flip, when nothing else holds one
    return time.perf_counter() - t0


@contextlib.contextmanager
def _busy_others() -> Iterator[None]:
    here = min(os.sched_getaffinity(0))
    others = sorted(set(range(os.cpu_count() or 1)) - {here})
    procs = [subprocess.Popen(["taskset", "-c", str(c), "/bin/sh", "-c", "while :; do :; done"])
             for c in others]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _measure(kvm: int, label: str, n: int) -> None:
    times = sorted(_iteration(kvm) for _ in range(n))
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    print(f"flip-cost: {label}: {n} iterations, p50 {statistics.median(times) * 1e3:.2f} ms, "
          f"p99 {p99 * 1e3:.2f} ms, max {times[-1] * 1e3:.2f} ms, total {sum(times):.1f} s", flush=True)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    os.sched_setaffinity(0, {0})
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    held_vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    held = fcntl.ioctl(held_vm, KVM_CREATE_VCPU, 0)
    _measure(kvm, "held (no flip), others idle", n)
    with _busy_others():
        _measure(kvm, "held (no flip), others busy", n)
    os.close(held)
    os.close(held_vm)
    holder = int(os.environ.get("KEY_HOLDER_PID") or 0)
    if holder:
        os.kill(holder, signal.SIGTERM)
        time.sleep(1)
    _measure(kvm, "flipping (2 flips each), others idle", n)
    with _busy_others():
        _measure(kvm, "flipping (2 flips each), others busy", n)
    print("flip-cost: done", flush=True)


if __name__ == "__main__":
    main()
