"""A KVM vCPU fd: its kvm_run mapping, registers and KVM_RUN."""

from __future__ import annotations

import base64
import ctypes
import errno
import mmap
import os
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from kvmnumad.kvm.errors import KvmError
from kvmnumad.kvm.ioctls import (
    KVM_EXIT_IO_OUT,
    ExitReason,
    Ioctl,
    KvmFpu,
    KvmLapicState,
    KvmMpState,
    KvmMsrEntry,
    KvmMsrs,
    KvmRegs,
    KvmRun,
    KvmSregs,
    KvmVcpuEvents,
    KvmXcrs,
    KvmXsave,
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


# MSRs a handover carries: what a flat 32/64-bit guest's kernel would set up
# (SYSENTER/SYSCALL entry points, PAT, the TSC and its aux value).  EFER is in
# the sregs.  KVM_GET_MSRS stops at the first MSR it does not know, so the
# list is read in order and only what the kernel returned is kept.
SAVED_MSRS: tuple[int, ...] = (
    0x10,  # IA32_TSC
    0x174, 0x175, 0x176,  # IA32_SYSENTER_CS/ESP/EIP
    0x277,  # IA32_PAT
    0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,  # STAR, LSTAR, CSTAR, FMASK
    0xC0000102,  # KERNEL_GS_BASE
    0xC0000103,  # TSC_AUX
)  # fmt: skip

_NO_APIC = frozenset({errno.ENXIO, errno.EINVAL, errno.ENOTTY, errno.EFAULT})


def _raw(obj: ctypes.Structure) -> bytes:
    return ctypes.string_at(ctypes.addressof(obj), ctypes.sizeof(obj))


def _from_raw(cls: type[ctypes.Structure], data: bytes) -> Any:
    if len(data) != ctypes.sizeof(cls):
        raise ValueError(f"{cls.__name__}: {len(data)} bytes saved, the struct has {ctypes.sizeof(cls)}")
    return cls.from_buffer_copy(data)


@dataclass(frozen=True)
class VcpuState:
    """Everything KVM lets user space read of one vCPU, as QEMU's CPR keeps it.

    The built-in payload depends on two of these only: ``regs`` (its counters
    live in EAX/EDX/EBP, its inputs in EBX/ECX/ESI/EDI, and RIP/RFLAGS) and
    ``sregs`` (CR0.PE and the hidden 32-bit flat segments: a fresh vCPU is in
    real mode).  The rest is kept because another guest depends on it: FPU and
    XSAVE/XCR0 (any SSE code), the MSRs above, MP state (a halted AP), vCPU
    events (an interrupt shadow or a pending exception) and the local APIC,
    which exists only with an in-kernel irqchip (``lapic`` None otherwise).
    Raw struct bytes, so the state round-trips exactly.
    """

    regs: bytes
    sregs: bytes
    fpu: bytes
    xsave: bytes | None
    xcrs: bytes | None
    msrs: tuple[tuple[int, int], ...]
    mp_state: int
    events: bytes
    lapic: bytes | None

    @property
    def rip(self) -> int:
        return int(_from_raw(KvmRegs, self.regs).rip)

    def to_dict(self) -> dict[str, Any]:
        def b64(data: bytes | None) -> str | None:
            return None if data is None else base64.b64encode(data).decode()

        return {"regs": b64(self.regs), "sregs": b64(self.sregs), "fpu": b64(self.fpu),
                "xsave": b64(self.xsave), "xcrs": b64(self.xcrs), "msrs": [list(m) for m in self.msrs],
                "mp_state": self.mp_state, "events": b64(self.events), "lapic": b64(self.lapic)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VcpuState:
        """Raises ValueError (or KeyError, TypeError) on a malformed record."""
        def raw(key: str, struct: type[ctypes.Structure]) -> bytes:
            data = base64.b64decode(d[key], validate=True)
            _from_raw(struct, data)  # size check
            return data

        def opt(key: str, struct: type[ctypes.Structure]) -> bytes | None:
            return None if d.get(key) is None else raw(key, struct)

        return cls(raw("regs", KvmRegs), raw("sregs", KvmSregs), raw("fpu", KvmFpu), opt("xsave", KvmXsave),
                   opt("xcrs", KvmXcrs), tuple((int(i), int(v)) for i, v in d["msrs"]), int(d["mp_state"]),
                   raw("events", KvmVcpuEvents), opt("lapic", KvmLapicState))


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

    # --- saved state (handover) -----------------------------------------------------------

    def complete_pending(self) -> None:
        """One KVM_RUN with ``immediate_exit`` set: the kernel finishes an I/O
        or MMIO exit user space has answered (api.rst, "KVM_RUN ... before
        saving state") and returns EINTR without running the guest.  Only on a
        paused vCPU; ``immediate_exit`` stays set (the runner clears it)."""
        self.immediate_exit = True
        try:
            ioctl(self._fd, Ioctl.KVM_RUN)
        except KvmError as e:
            if e.errno != errno.EINTR:
                raise

    def get_msrs(self, indices: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
        """KVM_GET_MSRS of ``indices`` in order; stops where the kernel stopped."""
        buf = _msr_buffer(indices)
        n = ioctl(self._fd, Ioctl.KVM_GET_MSRS, ctypes.addressof(buf))  # `buf` is alive until return
        return tuple((e.index, e.data) for e in buf.entries[:n])

    def set_msrs(self, msrs: tuple[tuple[int, int], ...]) -> None:
        """KVM_SET_MSRS; every MSR must be taken (EINVAL naming the first refused)."""
        buf = _msr_buffer(tuple(i for i, _ in msrs))
        for e, (_, value) in zip(buf.entries, msrs, strict=True):
            e.data = value
        n = ioctl(self._fd, Ioctl.KVM_SET_MSRS, ctypes.addressof(buf))
        if n != len(msrs):
            raise KvmError(errno.EINVAL, "KVM_SET_MSRS", f"MSR {msrs[n][0]:#x} refused")

    def save_state(self) -> VcpuState:
        """The whole vCPU, after completing a pending exit; only on a paused vCPU."""
        self.complete_pending()
        fpu, events, mp = KvmFpu(), KvmVcpuEvents(), KvmMpState()
        ioctl_ptr(self._fd, Ioctl.KVM_GET_FPU, fpu)
        ioctl_ptr(self._fd, Ioctl.KVM_GET_VCPU_EVENTS, events)
        ioctl_ptr(self._fd, Ioctl.KVM_GET_MP_STATE, mp)
        return VcpuState(
            regs=_raw(self.get_regs()), sregs=_raw(self.get_sregs()), fpu=_raw(fpu),
            xsave=self._get_optional(Ioctl.KVM_GET_XSAVE, KvmXsave),
            xcrs=self._get_optional(Ioctl.KVM_GET_XCRS, KvmXcrs),
            msrs=self.get_msrs(SAVED_MSRS), mp_state=mp.mp_state, events=_raw(events),
            lapic=self._get_optional(Ioctl.KVM_GET_LAPIC, KvmLapicState),
        )

    def _get_optional(self, request: Ioctl, struct: type[ctypes.Structure]) -> bytes | None:
        """None where this host or VM lacks the part (no in-kernel APIC, no XSAVE)."""
        obj = struct()
        try:
            ioctl_ptr(self._fd, request, obj)
        except KvmError as e:
            if e.errno in _NO_APIC:
                return None
            raise
        return _raw(obj)

    def restore_state(self, state: VcpuState) -> None:
        """Load ``state`` into this (new, never run) vCPU, in QEMU's order:
        registers, FPU/XSAVE, XCRs, sregs, MSRs, MP state, LAPIC, events last
        (setting sregs or the APIC may reset pending events)."""
        self.set_regs(_from_raw(KvmRegs, state.regs))
        ioctl_ptr(self._fd, Ioctl.KVM_SET_FPU, _from_raw(KvmFpu, state.fpu))
        if state.xsave is not None:
            ioctl_ptr(self._fd, Ioctl.KVM_SET_XSAVE, _from_raw(KvmXsave, state.xsave))
        if state.xcrs is not None:
            ioctl_ptr(self._fd, Ioctl.KVM_SET_XCRS, _from_raw(KvmXcrs, state.xcrs))
        sregs = _from_raw(KvmSregs, state.sregs)
        try:
            self.set_sregs(sregs)
        except KvmError as e:
            if e.errno != errno.EINVAL:
                raise
            # What KVM's kvm_is_valid_sregs and apic-base checks weigh, so a refusal names its field.
            # Seen (1 in 3 systemctl restarts in the systemd TCG guest, a VM paused while running, never
            # on real KVM): the saved state of one vCPU refused; its fields were not known then.
            raise KvmError(errno.EINVAL, "KVM_SET_SREGS", describe_sregs(sregs)) from e
        if state.msrs:
            self.set_msrs(state.msrs)
        ioctl_ptr(self._fd, Ioctl.KVM_SET_MP_STATE, KvmMpState(state.mp_state))
        if state.lapic is not None:
            ioctl_ptr(self._fd, Ioctl.KVM_SET_LAPIC, _from_raw(KvmLapicState, state.lapic))
        ioctl_ptr(self._fd, Ioctl.KVM_SET_VCPU_EVENTS, _from_raw(KvmVcpuEvents, state.events))

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

    def describe_state(self) -> str:
        """The registers, for the log of a triple fault: where the guest was is all
        a post-mortem has (QEMU dumps them too).  On the vCPU's own thread."""
        try:
            return describe_regs(self.get_regs()) + " " + describe_sregs(self.get_sregs())
        except KvmError as e:
            return f"registers unreadable: {e}"

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


def _msr_buffer(indices: tuple[int, ...]) -> Any:
    """struct kvm_msrs with ``len(indices)`` entries in one buffer (the kernel reads nmsrs first)."""

    class Buffer(ctypes.Structure):
        _fields_ = [("header", KvmMsrs), ("entries", KvmMsrEntry * len(indices))]

    buf = Buffer()
    buf.header.nmsrs = len(indices)
    for e, index in zip(buf.entries, indices, strict=True):
        e.index = index
    return buf


def describe_regs(r: KvmRegs) -> str:
    return " ".join(f"{name}={getattr(r, name):#x}" for name, *_ in KvmRegs._fields_)


def describe_sregs(s: KvmSregs) -> str:
    cs = s.cs
    pending = [i * 64 + b for i, word in enumerate(s.interrupt_bitmap) for b in range(64) if word >> b & 1]
    return (f"cr0={s.cr0:#x} cr3={s.cr3:#x} cr4={s.cr4:#x} cr8={s.cr8:#x} efer={s.efer:#x} "
            f"apic_base={s.apic_base:#x} cs.selector={cs.selector:#x} cs.type={cs.type} cs.s={cs.s} "
            f"cs.present={cs.present} cs.db={cs.db} cs.l={cs.l} cs.g={cs.g} cs.unusable={cs.unusable} "
            f"pending={pending}")
