"""The baselines, by hand: the bare ioctl/syscall sequence with ctypes, no kvmnumad code.

Numbers are written out here on purpose instead of imported from
kvmnumad.kvm.ioctls: a baseline that shared kvmnumad's layer would measure
part of kvmnumad.  ctypes releases the GIL for each call, as kvmnumad's does.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_ioctl.restype = ctypes.c_int
_mmap = _libc.mmap
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_mmap.restype = ctypes.c_void_p
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_munmap.restype = ctypes.c_int
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# linux/kvm.h, x86-64: _IO(0xAE, nr), _IOW/_IOR with the struct size in bits 16-29.
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46  # struct kvm_userspace_memory_region: 32 bytes
KVM_RUN = 0xAE80
KVM_SET_REGS = 0x4090AE82  # struct kvm_regs: 144 bytes
KVM_GET_SREGS = 0x8138AE83  # struct kvm_sregs: 312 bytes
KVM_SET_SREGS = 0x4138AE84
KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_EXIT_HLT = 5
SYS_MBIND = 237  # x86-64
MPOL_BIND = 2
MPOL_MF_STRICT = 1
MPOL_MF_MOVE = 2
PROT_RW = 0x3
MAP_SHARED = 0x1
MAP_FAILED = ctypes.c_void_p(-1).value
ENTRY = 0x1000
BOOT_SIZE = 1 << 20
SPIN = b"\xeb\xfe"  # jmp $: the guest never leaves KVM_RUN on its own
KICK = signal.SIGUSR1


def ioctl(fd: int, request: int, arg: int = 0) -> int:
    ret: int = _ioctl(fd, request, arg)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ioctl {request:#x}: {os.strerror(err)}")
    return ret


def mmap_shared(fd: int, size: int) -> int:
    addr = _mmap(None, size, PROT_RW, MAP_SHARED, fd, 0)
    if addr is None or addr == MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap: {os.strerror(err)}")
    return int(addr)


def munmap(addr: int, size: int) -> None:
    if _munmap(addr, size) != 0:
        raise OSError(ctypes.get_errno(), "munmap")


def mbind(addr: int, size: int, node: int, flags: int = 0) -> None:
    """MPOL_BIND to one node; maxnode is one more than the mask's bits (the kernel drops the last)."""
    mask = ctypes.c_ulong(1 << node)
    ret = _syscall(SYS_MBIND, ctypes.c_void_p(addr), ctypes.c_ulong(size), ctypes.c_int(MPOL_BIND),
                   ctypes.byref(mask), ctypes.c_ulong(65), ctypes.c_uint(flags))
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mbind: {os.strerror(err)}")


def set_memory_region(vm: int, slot: int, gpa: int, size: int, hva: int, *, flags: int) -> None:
    region = ctypes.create_string_buffer(struct.pack("<IIQQQ", slot, flags, gpa, size, hva), 32)
    ioctl(vm, KVM_SET_USER_MEMORY_REGION, ctypes.addressof(region))


def setup_flat32(vcpu: int, regs: dict[int, int] | None = None) -> None:
    """32-bit flat protected mode at ENTRY, as kvmnumad's setup_flat32 does, by raw bytes:
    kvm_segment is base Q, limit I, selector H, then type present dpl db s l g avl unusable padding."""
    sregs = ctypes.create_string_buffer(312)
    ioctl(vcpu, KVM_GET_SREGS, ctypes.addressof(sregs))
    for i in range(6):  # cs ds es fs gs ss, 24 bytes each
        selector, seg_type = (8, 11) if i == 0 else (16, 3)
        struct.pack_into("<QIHBBBBBBBBBB", sregs, i * 24, 0, 0xFFFFFFFF, selector, seg_type, 1, 0, 1, 1, 0, 1,
                         0, 0, 0)
    (cr0,) = struct.unpack_from("<Q", sregs, 224)
    struct.pack_into("<Q", sregs, 224, cr0 | 1)
    ioctl(vcpu, KVM_SET_SREGS, ctypes.addressof(sregs))
    buf = ctypes.create_string_buffer(144)  # kvm_regs: 18 x u64, rax rbx rcx rdx rsi rdi ... rip rflags
    for index, value in (regs or {}).items():
        struct.pack_into("<Q", buf, index * 8, value)
    struct.pack_into("<QQ", buf, 16 * 8, ENTRY, 2)  # rip, rflags (bit 1 reserved)
    ioctl(vcpu, KVM_SET_REGS, ctypes.addressof(buf))


@dataclass
class RawVm:
    """KVM_CREATE_VM, memfd+mmap+mbind+KVM_SET_USER_MEMORY_REGION per region,
    KVM_CREATE_VCPU+mmap(kvm_run) per vCPU; ``close`` undoes all of it."""

    kvm: int
    vm: int = -1
    regions: list[tuple[int, int, int]] = field(default_factory=list)  # memfd, hva, size
    vcpus: list[tuple[int, int]] = field(default_factory=list)  # fd, kvm_run address
    run_size: int = 0
    threads: list[threading.Thread] = field(default_factory=list)
    quit: bool = False

    @classmethod
    def create(cls, kvm: int, vcpus: int, region_size: int, nodes: list[int], boot: bytes = b"",
               *, bind: bool = True) -> RawVm:
        """``boot``: guest code for a 1 MiB slot 0 at ENTRY (none when empty); one region per entry of
        ``nodes``, mbound to it (``bind=False``: left to the kernel's first touch)."""
        raw = cls(kvm)
        try:
            raw.vm = ioctl(kvm, KVM_CREATE_VM, 0)
            raw.run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
            gpa = BOOT_SIZE
            if boot:
                raw._add_region(0, 0, BOOT_SIZE, None, 0)
                ctypes.memmove(raw.regions[0][1] + ENTRY, boot, len(boot))
            for i, node in enumerate(nodes):
                raw._add_region(i + 1, gpa, region_size, node if bind else None, KVM_MEM_LOG_DIRTY_PAGES)
                gpa += region_size
            for i in range(vcpus):
                fd = ioctl(raw.vm, KVM_CREATE_VCPU, i)
                try:
                    raw.vcpus.append((fd, mmap_shared(fd, raw.run_size)))
                except BaseException:
                    os.close(fd)
                    raise
        except BaseException:
            raw.close()
            raise
        return raw

    def _add_region(self, slot: int, gpa: int, size: int, node: int | None, flags: int) -> None:
        fd = os.memfd_create(f"raw-slot{slot}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            hva = mmap_shared(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self.regions.append((fd, hva, size))
        if node is not None:
            mbind(hva, size, node)
        set_memory_region(self.vm, slot, gpa, size, hva, flags=flags)

    def start(self, regs: Callable[[int], dict[int, int]] | None = None, idle: float = 0.05) -> None:
        """One thread per vCPU in a KVM_RUN loop until close() kicks it: I/O exits
        re-enter at once, HLT sleeps ``idle`` s first (what kvmnumad's runner does)."""
        for i, (fd, run) in enumerate(self.vcpus):
            setup_flat32(fd, regs(i) if regs else None)
            t = threading.Thread(target=self._loop, args=(fd, run, idle), daemon=True)
            t.start()
            self.threads.append(t)

    def _loop(self, fd: int, run: int, idle: float) -> None:
        exit_reason = ctypes.c_uint32.from_address(run + 8)
        while not self.quit:
            if _ioctl(fd, KVM_RUN, 0) < 0:
                if ctypes.get_errno() != errno.EINTR:
                    return
            elif exit_reason.value == KVM_EXIT_HLT:
                time.sleep(idle)

    def close(self) -> None:
        self.quit = True
        for _fd, run in self.vcpus:  # kvm_run.immediate_exit: covers a thread just before KVM_RUN
            ctypes.c_uint8.from_address(run + 1).value = 1
        for t in self.threads:
            if t.ident is not None and t.is_alive():
                signal.pthread_kill(t.ident, KICK)
        for t in self.threads:
            t.join()
        for fd, run in self.vcpus:
            munmap(run, self.run_size)
            os.close(fd)
        self.vcpus.clear()
        if self.vm >= 0:
            os.close(self.vm)
            self.vm = -1
        for fd, hva, size in self.regions:
            munmap(hva, size)
            os.close(fd)
        self.regions.clear()


class RawKicker:
    """One raw vCPU thread on ``jmp $``; ``kick()`` measures pthread_kill until
    KVM_RUN has returned EINTR in that thread and the kicker heard of it."""

    def __init__(self, kvm: int) -> None:
        self.raw = RawVm.create(kvm, 1, 0, [], boot=SPIN)
        setup_flat32(self.raw.vcpus[0][0])
        self._go = threading.Event()
        self._back = threading.Event()
        self._returned_ns = 0
        self._quit = False
        self.entering = False
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        fd = self.raw.vcpus[0][0]
        while True:
            self._go.wait()
            self._go.clear()
            if self._quit:
                return
            self.entering = True
            ret = _ioctl(fd, KVM_RUN, 0)
            self._returned_ns = time.perf_counter_ns()
            if ret >= 0 or ctypes.get_errno() != errno.EINTR:
                self._returned_ns = -1  # the guest exited by itself: not a kick
            self._back.set()

    def kick(self, settle: float) -> tuple[float, float]:
        """(one way, round trip) in microseconds; the vCPU runs ``settle`` s first.

        Only this thread writes immediate_exit: cleared before the go, set before
        the signal, so a vCPU thread late to enter KVM_RUN returns at once too.
        """
        immediate_exit = ctypes.c_uint8.from_address(self.raw.vcpus[0][1] + 1)
        immediate_exit.value = 0
        self._back.clear()
        self.entering = False
        self._go.set()
        wait_for(lambda: self.entering)
        time.sleep(settle)
        t0 = time.perf_counter_ns()
        immediate_exit.value = 1
        signal.pthread_kill(self._thread.ident or 0, KICK)
        self._back.wait()
        t1 = time.perf_counter_ns()
        if self._returned_ns < 0:
            raise RuntimeError("raw vCPU left KVM_RUN without the kick")
        return (self._returned_ns - t0) / 1000, (t1 - t0) / 1000

    def close(self) -> None:
        self._quit = True
        self._go.set()
        self._thread.join()
        self.raw.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Bounded wait in 0.2 ms sleeps: the thread it waits for needs the CPU more than we do."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout} s: {predicate}")
        time.sleep(0.0002)


def install_kick_handler() -> None:
    """A no-op Python handler: delivery alone makes KVM_RUN return EINTR (main thread only)."""
    signal.signal(KICK, lambda signum, frame: None)
