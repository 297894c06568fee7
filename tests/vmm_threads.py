"""A process shaped as cloud-hypervisor or Firecracker are, for adoption tests.

Neither ships in Debian 12 nor on PyPI, so their binaries cannot run here.
What kvmnumad's discovery relies on can be reproduced for real: this process
opens /dev/kvm and makes a real KVM VM fd (KVM_CREATE_VM), maps guest memory
as a shared memfd as both VMMs do, and names one thread per vCPU the way each
names them (prctl PR_SET_NAME, which is what Rust's thread::Builder::name sets
on Linux: "vcpu{N}" in cloud-hypervisor, "fc_vcpu {N}" in Firecracker).  The
threads sleep; it prints "ready" once all exist, and runs until killed.

    python -m tests.vmm_threads cloud-hypervisor 4 16   # kind, vCPUs, MiB of guest memory
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import sys
import threading

KVM_CREATE_VM = 0xAE01
PR_SET_NAME = 15
NAMES = {"cloud-hypervisor": "vcpu{}", "firecracker": "fc_vcpu {}"}


def main() -> None:
    kind, vcpus, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    vm_fd = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    mem_fd = os.memfd_create(kind, 0)
    os.ftruncate(mem_fd, mib << 20)
    memory = mmap.mmap(mem_fd, mib << 20, mmap.MAP_SHARED)
    memory[:: mmap.PAGESIZE] = b"\1" * ((mib << 20) // mmap.PAGESIZE)  # touched, as a running guest's is
    libc = ctypes.CDLL(None, use_errno=True)
    started = threading.Barrier(vcpus + 1)
    forever = threading.Event()

    def vcpu(i: int) -> None:
        libc.prctl(PR_SET_NAME, NAMES[kind].format(i).encode(), 0, 0, 0)
        started.wait()
        forever.wait()

    for i in range(vcpus):
        threading.Thread(target=vcpu, args=(i,), daemon=True).start()
    started.wait()
    print("ready", vm_fd, flush=True)
    forever.wait()
    del memory


if __name__ == "__main__":
    main()
