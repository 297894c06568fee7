"""Inside the numa guest: hammer the path the TCG guest froze on, for measuring mitigations.

The freezes came during nested-VM tests; one console showed a CPU stuck in
kvm_swap_active_memslots (KVM_SET_USER_MEMORY_REGION) while the others sat in
int3 text patching.  A vCPU made without an in-kernel irqchip flips the
kvm_has_noapic_vcpu static key (text patching on every guest CPU) and a VM's
memslots are swapped under SRCU, so this does both in a loop on every guest
CPU at once: one thread per CPU, pinned, each creating a VM, a memslot and a
vCPU, running a tiny payload to its HLT, toggling a second memslot, and
closing it all.  It prints a count every 5 s (the launcher's heartbeat) and
exits 0 after ``seconds``.  Run by ``python -m tests.numa_guest --repro``.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
import sys
import threading
import time

_KVM_GET_VCPU_MMAP_SIZE = 0xAE04
_KVM_CREATE_VM = 0xAE01
_KVM_CREATE_VCPU = 0xAE41
_KVM_RUN = 0xAE80
_KVM_SET_USER_MEMORY_REGION = 0x4020AE46
_KVM_GET_SREGS = 0x8138AE83
_KVM_SET_SREGS = 0x4138AE84
_KVM_SET_REGS = 0x4090AE82
_PAYLOAD = bytes([0xBA, 0xF8, 0x03, 0xB0, 0x41, 0xEE, 0xF4])  # mov dx,0x3f8; mov al,'A'; out dx,al; hlt
_SIZE = 0x10000

_libc = ctypes.CDLL(None, use_errno=True)  # its ioctl releases the GIL during KVM_RUN
_counts: list[int] = []


def _region(vm: int, slot: int, gpa: int, size: int, hva: int) -> None:
    fcntl.ioctl(vm, _KVM_SET_USER_MEMORY_REGION, struct.pack("IIQQQ", slot, 0, gpa, size, hva))


def _one_vm(kvm: int, run_size: int) -> None:
    vm = fcntl.ioctl(kvm, _KVM_CREATE_VM, 0)
    memfd = os.memfd_create("repro", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, 2 * _SIZE)
        mem = mmap.mmap(memfd, 2 * _SIZE)
        mem[0x1000 : 0x1000 + len(_PAYLOAD)] = _PAYLOAD
        hva = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        _region(vm, 0, 0, _SIZE, hva)
        vcpu = fcntl.ioctl(vm, _KVM_CREATE_VCPU, 0)
        try:
            run = mmap.mmap(vcpu, run_size)
            sregs = bytearray(0x138)
            fcntl.ioctl(vcpu, _KVM_GET_SREGS, sregs)
            struct.pack_into("QIH", sregs, 0, 0, 0xFFFF, 0)
            fcntl.ioctl(vcpu, _KVM_SET_SREGS, bytes(sregs))
            regs = bytearray(0x90)
            struct.pack_into("QQ", regs, 0x80, 0x1000, 2)
            fcntl.ioctl(vcpu, _KVM_SET_REGS, bytes(regs))
            for _ in range(2):
                if _libc.ioctl(vcpu, _KVM_RUN, 0) != 0:
                    raise OSError(ctypes.get_errno(), "KVM_RUN")
            for _ in range(4):  # memslot add and delete: kvm_swap_active_memslots each time
                _region(vm, 1, 0x100000, _SIZE, hva + _SIZE)
                _region(vm, 1, 0x100000, 0, hva + _SIZE)
            run.close()
        finally:
            os.close(vcpu)
        del hva
        mem.close()
    finally:
        os.close(memfd)
        os.close(vm)


def _worker(cpu: int, index: int, deadline: float) -> None:
    os.sched_setaffinity(0, {cpu})
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    run_size = fcntl.ioctl(kvm, _KVM_GET_VCPU_MMAP_SIZE)
    while time.monotonic() < deadline:
        _one_vm(kvm, run_size)
        _counts[index] += 1


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 180.0
    cpus = sorted(os.sched_getaffinity(0))
    _counts.extend(0 for _ in cpus)
    start = time.monotonic()
    deadline = start + seconds
    threads = [threading.Thread(target=_worker, args=(c, i, deadline), daemon=True)
               for i, c in enumerate(cpus)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(5)
        print(f"freeze-repro: {time.monotonic() - start:.0f} s, VMs made per CPU {_counts}", flush=True)
    print(f"freeze-repro: done, {sum(_counts)} VMs in {time.monotonic() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
