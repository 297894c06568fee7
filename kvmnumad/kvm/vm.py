"""A KVM VM fd: memory slots, dirty log, and the only maker of vCPU fds."""

from __future__ import annotations

import ctypes
import errno
import os
from types import TracebackType

from kvmnumad.kvm.errors import KvmError
from kvmnumad.kvm.ioctls import (
    KVM_MEM_LOG_DIRTY_PAGES,
    Ioctl,
    KvmDirtyLog,
    KvmUserspaceMemoryRegion,
    ioctl,
    ioctl_ptr,
)
from kvmnumad.kvm.vcpu import VcpuFd
from kvmnumad.libc import PAGE_SIZE

_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


def _check_range(name: str, value: int, top: int) -> None:
    """ctypes would silently truncate an out-of-range field: refuse it as the kernel would."""
    if not 0 <= value <= top:
        raise KvmError(errno.EINVAL, "KVM_SET_USER_MEMORY_REGION", f"{name}={value:#x} out of range")


def dirty_bitmap_size(memory_size: int) -> int:
    """Bytes of a slot's dirty bitmap: one bit per page, in whole 64-bit words as the kernel writes."""
    pages = (memory_size + PAGE_SIZE - 1) // PAGE_SIZE
    return (pages + 63) // 64 * 8


class VmFd:
    """A VM made by :meth:`Kvm.create_vm`; owns its fd, closes it once.

    Built from a raw number only by Kvm (and by tests, to check that a bad fd
    fails with EBADF rather than doing something worse).
    """

    def __init__(self, fd: int, run_size: int) -> None:
        self._fd = fd
        self._run_size = run_size

    def fileno(self) -> int:
        return self._fd

    def set_user_memory_region(
        self,
        slot: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        flags: int = KVM_MEM_LOG_DIRTY_PAGES,
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION: map ``memory_size`` bytes at host ``userspace_addr``
        into the guest at ``guest_phys_addr``; ``memory_size`` 0 deletes the slot.

        The caller keeps the host mapping alive until the slot is deleted or the VM closed.
        """
        _check_range("slot", slot, _U32)
        _check_range("flags", flags, _U32)
        _check_range("guest_phys_addr", guest_phys_addr, _U64)
        _check_range("memory_size", memory_size, _U64)
        _check_range("userspace_addr", userspace_addr, _U64)
        region = KvmUserspaceMemoryRegion(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        ioctl_ptr(self._fd, Ioctl.KVM_SET_USER_MEMORY_REGION, region)

    def get_dirty_log(self, slot: int, memory_size: int) -> bytes:
        """KVM_GET_DIRTY_LOG: the slot's bitmap (bit n = page n written since the last call).

        Reading clears the log. The slot must have KVM_MEM_LOG_DIRTY_PAGES (else ENOENT).
        """
        _check_range("slot", slot, _U32)
        bitmap = ctypes.create_string_buffer(dirty_bitmap_size(memory_size))
        log = KvmDirtyLog(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        ioctl_ptr(self._fd, Ioctl.KVM_GET_DIRTY_LOG, log)  # `bitmap` is alive until return
        return bitmap.raw

    def count_dirty(self, slot: int, memory_size: int) -> int:
        """Pages of the slot written since the last read (reads, hence clears, the log)."""
        return int.from_bytes(self.get_dirty_log(slot, memory_size), "little").bit_count()

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        """KVM_CREATE_VCPU and the mmap of its kvm_run; on a failed mmap the fd is closed."""
        fd = ioctl(self._fd, Ioctl.KVM_CREATE_VCPU, vcpu_id)
        try:
            return VcpuFd(fd, self._run_size)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        """Close the VM fd once (the kernel frees the VM when its vCPU fds are closed too)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> VmFd:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
