"""A KVM vCPU fd: its kvm_run mapping, registers and KVM_RUN."""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass
from types import TracebackType

from kvmnumad.kvm.errors import KvmError
from kvmnumad.kvm.ioctls import (
    KVM_EXIT_IO_OUT,
    ExitReason,
    Ioctl,
    KvmRegs,
    KvmRun,
    KvmSregs,
    ioctl,
    ioctl_ptr,
)

CR0_PE = 1 << 0
RFLAGS_RESERVED = 1 << 1  # bit 1 of RFLAGS always reads 1
CODE_SELECTOR = 8
DATA_SELECTOR = 16
SEG_TYPE_CODE_RX_ACCESSED = 11  # execute/read, accessed
SEG_TYPE_DATA_RW_ACCESSED = 3  # read/write, accessed


@dataclass(frozen=True)
class IoExit:
    """kvm_run.io of the last KVM_EXIT_IO, with its data copied out of the mapping."""

    direction: int  # KVM_EXIT_IO_IN or KVM_EXIT_IO_OUT
    size: int  # bytes per access: 1, 2 or 4
    port: int
    count: int  # > 1 for rep ins/outs
    data: bytes  # size * count bytes (for an IN: what the guest will read, 0 until written)

    @property
    def is_out(self) -> bool:
        return self.direction == KVM_EXIT_IO_OUT

    @property
    def value(self) -> int:
        """The first access's data as a little-endian integer (what ``out dx, eax`` wrote)."""
        return int.from_bytes(self.data[: self.size], "little")


class VcpuFd:
    """A vCPU made by :meth:`VmFd.create_vcpu`; owns its fd and its kvm_run mapping.

    Takes ownership of ``fd`` only once the constructor returns: on a failed
    mmap the caller (VmFd) still closes it.  All methods except
    :attr:`immediate_exit` belong to one thread at a time (the vCPU thread
    while it runs); ``close`` only after that thread stopped using it.
    """

    def __init__(self, fd: int, run_size: int) -> None:
        # Python's mmap keeps a dup of the fd, closed with the mapping in close().
        self._mm = mmap.mmap(fd, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # A ctypes view into the mapping: it pins the mmap (close raises BufferError while it
        # exists), so it is dropped first in close(); nothing else keeps a reference to it.
        self._run: KvmRun | None = KvmRun.from_buffer(self._mm)
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def _kvm_run(self) -> KvmRun:
        """The live kvm_run header.  Private on purpose: a reference kept outside
        would pin the mapping and make close() fail with BufferError."""
        if self._run is None:
            raise KvmError(errno.EBADF, "kvm_run", "vCPU closed")
        return self._run

    # --- registers ------------------------------------------------------------------------

    def get_regs(self) -> KvmRegs:
        """KVM_GET_REGS."""
        regs = KvmRegs()
        ioctl_ptr(self._fd, Ioctl.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: KvmRegs) -> None:
        """KVM_SET_REGS."""
        ioctl_ptr(self._fd, Ioctl.KVM_SET_REGS, regs)

    def get_sregs(self) -> KvmSregs:
        """KVM_GET_SREGS."""
        sregs = KvmSregs()
        ioctl_ptr(self._fd, Ioctl.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: KvmSregs) -> None:
        """KVM_SET_SREGS."""
        ioctl_ptr(self._fd, Ioctl.KVM_SET_SREGS, sregs)

    def setup_flat32(self, entry: int, **regs: int) -> None:
        """Put the vCPU in 32-bit flat protected mode at ``entry``, by KVM_SET_SREGS alone.

        No GDT in guest memory: the hidden parts of the segment registers are
        loaded directly (code selector 8, data 16, base 0, limit 4 GiB, 32-bit,
        page granular) and CR0.PE set; paging stays off.  The guest must not
        reload a segment register.  ``regs`` are KvmRegs fields (``rbx=...``);
        the others start at 0.

        >>> vcpu.setup_flat32(0x1000, rbx=0x100000, rcx=0x400000)
        """
        sregs = self.get_sregs()
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            seg = getattr(sregs, name)
            seg.base = 0
            seg.limit = 0xFFFFFFFF
            seg.present = 1
            seg.dpl = 0
            seg.s = 1
            seg.db = 1
            seg.l = 0
            seg.g = 1
            seg.avl = 0
            seg.unusable = 0
            if name == "cs":
                seg.selector, seg.type = CODE_SELECTOR, SEG_TYPE_CODE_RX_ACCESSED
            else:
                seg.selector, seg.type = DATA_SELECTOR, SEG_TYPE_DATA_RW_ACCESSED
        sregs.cr0 |= CR0_PE
        self.set_sregs(sregs)
        fields = {field[0] for field in KvmRegs._fields_}
        unknown = set(regs) - fields
        if unknown:
            raise TypeError(f"setup_flat32: no register {sorted(unknown)}")
        values = {"rflags": RFLAGS_RESERVED, **regs, "rip": entry}
        self.set_regs(KvmRegs(**values))

    # --- running --------------------------------------------------------------------------

    def run(self) -> ExitReason:
        """KVM_RUN until the next exit to user space.

        Called through ctypes, so the GIL is released for the whole guest run.
        EINTR (a signal, or ``immediate_exit`` set) is not an error: it returns
        ``ExitReason.INTR``.  Other errnos raise KvmError, as does an exit
        reason this module does not know (EPROTO, with the number).
        """
        try:
            ioctl(self._fd, Ioctl.KVM_RUN)
        except KvmError as e:
            if e.errno == errno.EINTR:
                return ExitReason.INTR
            raise
        raw = self._kvm_run().exit_reason
        try:
            return ExitReason(raw)
        except ValueError:
            raise KvmError(errno.EPROTO, "KVM_RUN", f"unknown exit reason {raw}") from None

    @property
    def immediate_exit(self) -> bool:
        return bool(self._kvm_run().immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        """When set, KVM_RUN returns EINTR at once (or at its next entry): the kick's other half."""
        self._kvm_run().immediate_exit = 1 if value else 0

    def io_exit(self) -> IoExit:
        """The I/O exit just returned by run() (meaningful only after ExitReason.IO)."""
        io = self._kvm_run().exit.io
        length = io.size * io.count
        off = io.data_offset
        if off + length > len(self._mm):
            raise KvmError(errno.EPROTO, "KVM_RUN", f"io data {off:#x}+{length} beyond kvm_run")
        return IoExit(io.direction, io.size, io.port, io.count, self._mm[off : off + length])

    def exit_detail(self, reason: ExitReason) -> str:
        """What kvm_run says about a failure exit, for logs ("" when it says nothing)."""
        run = self._kvm_run()
        if reason == ExitReason.FAIL_ENTRY:
            fail = run.exit.fail_entry
            return f"hardware entry failure reason {fail.hardware_entry_failure_reason:#x} on cpu {fail.cpu}"
        if reason == ExitReason.INTERNAL_ERROR:
            return f"internal error suberror {run.exit.internal.suberror}"
        if reason == ExitReason.UNKNOWN:
            return f"hardware exit reason {run.exit.hardware_exit_reason:#x}"
        return ""

    def set_io_in_data(self, data: bytes) -> None:
        """Answer a KVM_EXIT_IO of direction IN: the guest reads ``data`` on the next run()."""
        io = self._kvm_run().exit.io
        if len(data) != io.size * io.count:
            raise ValueError(f"IN of {io.size}x{io.count} bytes needs that many, got {len(data)}")
        self._mm[io.data_offset : io.data_offset + len(data)] = data

    def close(self) -> None:
        """Unmap kvm_run and close the fd, once; later calls do nothing."""
        self._run = None  # release the buffer export before closing the mapping
        if not self._mm.closed:
            self._mm.close()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> VcpuFd:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
