"""The KVM kernel ABI in one table: ioctl numbers, structs, capabilities, exit reasons.

Everything here mirrors ``linux/kvm.h`` and ``asm/kvm.h`` (x86-64); the test
``tests/test_kvm_abi.py`` compiles a C program against those headers and
checks every number and every ``sizeof``/``offsetof`` used below.  The
callers (system.py, vm.py, vcpu.py) go through :func:`ioctl`, which calls
libc's ``ioctl`` through ctypes: ctypes drops the GIL for the call, so a
blocking ``KVM_RUN`` never stalls the other Python threads.
"""

from __future__ import annotations

import ctypes
import enum

from kvmnumad import libc
from kvmnumad.kvm.errors import KvmError

# asm-generic/ioctl.h: dir(2) | size(14) | type(8) | nr(8), from the top bit down.
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2

KVMIO = 0xAE
KVM_API_VERSION = 12
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, struct: type[ctypes.Structure]) -> int:
    return _IOC(_IOC_READ, type_, nr, ctypes.sizeof(struct))


def _IOW(type_: int, nr: int, struct: type[ctypes.Structure]) -> int:
    return _IOC(_IOC_WRITE, type_, nr, ctypes.sizeof(struct))


def _IOWR(type_: int, nr: int, struct: type[ctypes.Structure]) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, ctypes.sizeof(struct))


# --- structs (x86-64 layout; natural alignment matches the kernel's) -------------------


class KvmRegs(ctypes.Structure):
    """struct kvm_regs: general-purpose registers (KVM_GET_REGS / KVM_SET_REGS)."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]  # fmt: skip


class KvmSegment(ctypes.Structure):
    """struct kvm_segment: a segment register with its hidden descriptor part."""

    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    ]


class KvmDtable(ctypes.Structure):
    """struct kvm_dtable: GDTR/IDTR."""

    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
    ]


KVM_NR_INTERRUPTS = 256


class KvmSregs(ctypes.Structure):
    """struct kvm_sregs: segment, control and descriptor-table registers."""

    _fields_ = [
        *((name, KvmSegment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        *((name, ctypes.c_uint64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")),
        ("interrupt_bitmap", ctypes.c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """struct kvm_userspace_memory_region (KVM_SET_USER_MEMORY_REGION)."""

    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


class KvmDirtyLog(ctypes.Structure):
    """struct kvm_dirty_log: ``dirty_bitmap`` is a user pointer the kernel fills."""

    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("padding1", ctypes.c_uint32),
        ("dirty_bitmap", ctypes.c_uint64),  # union { void *; __u64 padding2; }
    ]


class KvmRunIo(ctypes.Structure):
    """kvm_run.io (KVM_EXIT_IO): the data sit in the kvm_run mapping at data_offset."""

    _fields_ = [
        ("direction", ctypes.c_uint8),
        ("size", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("count", ctypes.c_uint32),
        ("data_offset", ctypes.c_uint64),
    ]


class KvmRunMmio(ctypes.Structure):
    """kvm_run.mmio (KVM_EXIT_MMIO)."""

    _fields_ = [
        ("phys_addr", ctypes.c_uint64),
        ("data", ctypes.c_uint8 * 8),
        ("len", ctypes.c_uint32),
        ("is_write", ctypes.c_uint8),
    ]


class KvmRunFailEntry(ctypes.Structure):
    """kvm_run.fail_entry (KVM_EXIT_FAIL_ENTRY)."""

    _fields_ = [
        ("hardware_entry_failure_reason", ctypes.c_uint64),
        ("cpu", ctypes.c_uint32),
    ]


class KvmRunInternal(ctypes.Structure):
    """kvm_run.internal (KVM_EXIT_INTERNAL_ERROR)."""

    _fields_ = [
        ("suberror", ctypes.c_uint32),
        ("ndata", ctypes.c_uint32),
        ("data", ctypes.c_uint64 * 16),
    ]


class KvmRunExit(ctypes.Union):
    """The exit union of kvm_run: only the members kvmnumad reads, padded to 256 bytes."""

    _fields_ = [
        ("hardware_exit_reason", ctypes.c_uint64),  # hw (KVM_EXIT_UNKNOWN)
        ("io", KvmRunIo),
        ("mmio", KvmRunMmio),
        ("fail_entry", KvmRunFailEntry),
        ("internal", KvmRunInternal),
        ("padding", ctypes.c_char * 256),
    ]


class KvmRun(ctypes.Structure):
    """The head of struct kvm_run, shared with the kernel through the vCPU fd's mmap."""

    _fields_ = [
        ("request_interrupt_window", ctypes.c_uint8),
        ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6),
        ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8),
        ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("cr8", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("exit", KvmRunExit),
    ]


# --- vCPU state that a handover saves and restores (KVM_GET_* / KVM_SET_*) ---------------


class KvmFpu(ctypes.Structure):
    """struct kvm_fpu: x87 and SSE state (the legacy view; XSAVE covers it and more)."""

    _fields_ = [
        ("fpr", (ctypes.c_uint8 * 16) * 8),
        ("fcw", ctypes.c_uint16),
        ("fsw", ctypes.c_uint16),
        ("ftwx", ctypes.c_uint8),
        ("pad1", ctypes.c_uint8),
        ("last_opcode", ctypes.c_uint16),
        ("last_ip", ctypes.c_uint64),
        ("last_dp", ctypes.c_uint64),
        ("xmm", (ctypes.c_uint8 * 16) * 16),
        ("mxcsr", ctypes.c_uint32),
        ("pad2", ctypes.c_uint32),
    ]


class KvmXsave(ctypes.Structure):
    """struct kvm_xsave: the 4 KiB XSAVE area (KVM_GET_XSAVE; larger AMX areas need XSAVE2)."""

    _fields_ = [("region", ctypes.c_uint32 * 1024)]


KVM_MAX_XCRS = 16


class KvmXcr(ctypes.Structure):
    """struct kvm_xcr: one extended control register (XCR0 is the only one today)."""

    _fields_ = [("xcr", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("value", ctypes.c_uint64)]


class KvmXcrs(ctypes.Structure):
    """struct kvm_xcrs (KVM_GET_XCRS / KVM_SET_XCRS)."""

    _fields_ = [
        ("nr_xcrs", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("xcrs", KvmXcr * KVM_MAX_XCRS),
        ("padding", ctypes.c_uint64 * 16),
    ]


class KvmMsrEntry(ctypes.Structure):
    """struct kvm_msr_entry."""

    _fields_ = [("index", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("data", ctypes.c_uint64)]


class KvmMsrs(ctypes.Structure):
    """struct kvm_msrs, the header: ``nmsrs`` kvm_msr_entry follow it in the same buffer."""

    _fields_ = [("nmsrs", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


KVM_APIC_REG_SIZE = 0x400


class KvmLapicState(ctypes.Structure):
    """struct kvm_lapic_state: the in-kernel local APIC's register page."""

    _fields_ = [("regs", ctypes.c_char * KVM_APIC_REG_SIZE)]


class KvmMpState(ctypes.Structure):
    """struct kvm_mp_state: KVM_MP_STATE_RUNNABLE (0), HALTED (3), ..."""

    _fields_ = [("mp_state", ctypes.c_uint32)]


class KvmVcpuEventsException(ctypes.Structure):
    _fields_ = [("injected", ctypes.c_uint8), ("nr", ctypes.c_uint8), ("has_error_code", ctypes.c_uint8),
                ("pending", ctypes.c_uint8), ("error_code", ctypes.c_uint32)]


class KvmVcpuEventsInterrupt(ctypes.Structure):
    _fields_ = [("injected", ctypes.c_uint8), ("nr", ctypes.c_uint8), ("soft", ctypes.c_uint8),
                ("shadow", ctypes.c_uint8)]


class KvmVcpuEventsNmi(ctypes.Structure):
    _fields_ = [("injected", ctypes.c_uint8), ("pending", ctypes.c_uint8), ("masked", ctypes.c_uint8),
                ("pad", ctypes.c_uint8)]


class KvmVcpuEventsSmi(ctypes.Structure):
    _fields_ = [("smm", ctypes.c_uint8), ("pending", ctypes.c_uint8), ("smm_inside_nmi", ctypes.c_uint8),
                ("latched_init", ctypes.c_uint8)]


class KvmVcpuEvents(ctypes.Structure):
    """struct kvm_vcpu_events: pending/injected exception, interrupt, NMI, SMI
    and the interrupt shadow (an instruction after ``mov ss``/``sti``)."""

    _fields_ = [
        ("exception", KvmVcpuEventsException),
        ("interrupt", KvmVcpuEventsInterrupt),
        ("nmi", KvmVcpuEventsNmi),
        ("sipi_vector", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("smi", KvmVcpuEventsSmi),
        ("triple_fault", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 26),
        ("exception_has_payload", ctypes.c_uint8),
        ("exception_payload", ctypes.c_uint64),
    ]


# --- ioctl numbers -------------------------------------------------------------------------


class Ioctl(enum.IntEnum):
    """Every request kvmnumad sends; the member name is the kernel's, used in error messages."""

    KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
    KVM_CREATE_VM = _IO(KVMIO, 0x01)
    KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
    KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
    KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
    KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, KvmDirtyLog)
    KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, KvmUserspaceMemoryRegion)
    KVM_RUN = _IO(KVMIO, 0x80)
    KVM_GET_REGS = _IOR(KVMIO, 0x81, KvmRegs)
    KVM_SET_REGS = _IOW(KVMIO, 0x82, KvmRegs)
    KVM_GET_SREGS = _IOR(KVMIO, 0x83, KvmSregs)
    KVM_SET_SREGS = _IOW(KVMIO, 0x84, KvmSregs)
    KVM_GET_MSRS = _IOWR(KVMIO, 0x88, KvmMsrs)
    KVM_SET_MSRS = _IOW(KVMIO, 0x89, KvmMsrs)
    KVM_GET_FPU = _IOR(KVMIO, 0x8C, KvmFpu)
    KVM_SET_FPU = _IOW(KVMIO, 0x8D, KvmFpu)
    KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, KvmLapicState)
    KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, KvmLapicState)
    KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, KvmMpState)
    KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, KvmMpState)
    KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, KvmVcpuEvents)
    KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, KvmVcpuEvents)
    KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, KvmXsave)
    KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, KvmXsave)
    KVM_GET_XCRS = _IOR(KVMIO, 0xA6, KvmXcrs)
    KVM_SET_XCRS = _IOW(KVMIO, 0xA7, KvmXcrs)


class Cap(enum.IntEnum):
    """KVM_CAP_* numbers for KVM_CHECK_EXTENSION."""

    IRQCHIP = 0
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    MP_STATE = 14
    VCPU_EVENTS = 41
    XSAVE = 55
    XCRS = 56
    SYNC_MMU = 16
    DESTROY_MEMORY_REGION_WORKS = 21
    JOIN_MEMORY_REGIONS_WORKS = 30
    MAX_VCPUS = 66
    READONLY_MEM = 81
    MAX_VCPU_ID = 128
    IMMEDIATE_EXIT = 136
    MANUAL_DIRTY_LOG_PROTECT2 = 168
    DIRTY_LOG_RING = 192


class ExitReason(enum.IntEnum):
    """KVM_EXIT_* as found in kvm_run.exit_reason.

    ``INTR`` is also what :meth:`VcpuFd.run` returns when KVM_RUN fails with
    EINTR (a signal or ``immediate_exit``); the kernel writes it to kvm_run
    only for a signal, not for ``immediate_exit``.
    """

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    S390_SIEIC = 13
    S390_RESET = 14
    DCR = 15
    NMI = 16
    INTERNAL_ERROR = 17
    OSI = 18
    PAPR_HCALL = 19
    S390_UCONTROL = 20
    WATCHDOG = 21
    S390_TSCH = 22
    EPR = 23
    SYSTEM_EVENT = 24
    S390_STSI = 25
    IOAPIC_EOI = 26
    HYPERV = 27
    ARM_NISV = 28
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    AP_RESET_HOLD = 32
    X86_BUS_LOCK = 33
    XEN = 34
    RISCV_SBI = 35
    RISCV_CSR = 36
    NOTIFY = 37


# --- the call ---------------------------------------------------------------------------------

_ioctl = libc.libc.ioctl


def ioctl(fd: int, request: Ioctl, arg: int = 0) -> int:
    """Issue one KVM ioctl; ``arg`` is an integer or the address of a ctypes object.

    The caller keeps the object at ``arg`` alive for the duration of the call
    (a local variable in every wrapper).  Raises KvmError naming the request.
    """
    ret: int = _ioctl(fd, request, arg)
    if ret < 0:
        raise KvmError(ctypes.get_errno(), request.name)
    return ret


def ioctl_ptr(fd: int, request: Ioctl, obj: ctypes.Structure) -> int:
    """ioctl with a pointer to ``obj``, which the caller's reference keeps alive."""
    return ioctl(fd, request, ctypes.addressof(obj))
