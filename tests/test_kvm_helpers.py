"""Shared pieces of the tests/test_kvm_*.py files (no tests here).

Guest memory is the caller's in the KVM layer, so the tests make their own:
a memfd mapped with mmap, as the VM layer does.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager

from kvmnumad.kvm.system import Kvm
from kvmnumad.kvm.vcpu import VcpuFd
from kvmnumad.kvm.vm import VmFd

ENTRY = 0x1000
BOOT_SIZE = 0x10000
DATA_GPA = 0x100000
SPIN = b"\xeb\xfe"  # jmp $: never exits by itself


class GuestMemory:
    """A memfd mapping; ``hva`` stays valid until close()."""

    def __init__(self, size: int, name: str = "kvmtest") -> None:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        # The c_char view pins the mmap (close() would raise BufferError while it exists).
        self._view: ctypes.c_char | None = ctypes.c_char.from_buffer(self.map)
        self.hva = ctypes.addressof(self._view)
        self.size = size

    def close(self) -> None:
        self._view = None
        self.map.close()


@contextmanager
def guest(kvm: Kvm, code: bytes, data_size: int = 0) -> Iterator[tuple[VmFd, VcpuFd, GuestMemory | None]]:
    """A VM with ``code`` at ENTRY (slot 0) and optionally ``data_size`` bytes at DATA_GPA (slot 1)."""
    boot = GuestMemory(BOOT_SIZE)
    boot.map[ENTRY : ENTRY + len(code)] = code
    data = GuestMemory(data_size) if data_size else None
    vm = kvm.create_vm()
    vcpu: VcpuFd | None = None
    try:
        vm.set_user_memory_region(0, 0, BOOT_SIZE, boot.hva)
        if data is not None:
            vm.set_user_memory_region(1, DATA_GPA, data.size, data.hva)
        vcpu = vm.create_vcpu(0)
        yield vm, vcpu, data
    finally:
        if vcpu is not None:
            vcpu.close()
        vm.close()
        boot.close()
        if data is not None:
            data.close()
