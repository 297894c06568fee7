"""``/dev/kvm``: the system fd, the only maker of VM fds."""

from __future__ import annotations

import errno
import os
from types import TracebackType

from kvmnumad.kvm.errors import KvmError
from kvmnumad.kvm.ioctls import KVM_API_VERSION, Cap, Ioctl, ioctl
from kvmnumad.kvm.vm import VmFd


class Kvm:
    """An open ``/dev/kvm``.

    >>> with Kvm() as kvm, kvm.create_vm() as vm:
    ...     vcpu = vm.create_vcpu(0)
    """

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(e.errno or errno.ENODEV, "open", path) from e
        try:
            version = ioctl(self._fd, Ioctl.KVM_GET_API_VERSION)
            if version != KVM_API_VERSION:
                raise KvmError(errno.EINVAL, "KVM_GET_API_VERSION", f"{version}, need {KVM_API_VERSION}")
            self._run_size = ioctl(self._fd, Ioctl.KVM_GET_VCPU_MMAP_SIZE)
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    def fileno(self) -> int:
        return self._fd

    def check_extension(self, cap: Cap) -> int:
        """KVM_CHECK_EXTENSION: 0 when absent, else 1 or a capability-specific number."""
        return ioctl(self._fd, Ioctl.KVM_CHECK_EXTENSION, int(cap))

    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes of each vCPU's kvm_run mapping (read once at open)."""
        return self._run_size

    def create_vm(self) -> VmFd:
        """KVM_CREATE_VM (machine type 0). The VmFd is independent of this fd's lifetime."""
        return VmFd(ioctl(self._fd, Ioctl.KVM_CREATE_VM, 0), self._run_size)

    def close(self) -> None:
        """Close /dev/kvm once; later calls do nothing."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Kvm:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
