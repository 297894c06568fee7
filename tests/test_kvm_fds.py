"""Kvm / VmFd / VcpuFd on the real /dev/kvm: capabilities, registers, error paths,
fd hygiene, KVM_RUN without the GIL and EINTR as its own result."""

from __future__ import annotations

import ctypes
import errno
import gc
import mmap
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from kvmnumad.kvm.errors import KvmError
from kvmnumad.kvm.ioctls import Cap, ExitReason, KvmRegs
from kvmnumad.kvm.runner import KICK_SIGNAL, VcpuRunner, install_kick_signal
from kvmnumad.kvm.system import Kvm
from kvmnumad.kvm.vm import VmFd
from tests.observe import open_fds, thread_ids
from tests.test_kvm_helpers import BOOT_SIZE, DATA_GPA, ENTRY, SPIN, GuestMemory, guest
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def kvm() -> Iterator[Kvm]:
    with Kvm() as k:
        yield k


def test_capabilities(kvm: Kvm) -> None:
    assert kvm.check_extension(Cap.USER_MEMORY) == 1
    assert kvm.check_extension(Cap.IMMEDIATE_EXIT) == 1
    assert kvm.check_extension(Cap.NR_VCPUS) >= 1
    assert kvm.check_extension(Cap.MAX_VCPUS) >= kvm.check_extension(Cap.NR_VCPUS)
    assert kvm.check_extension(Cap.NR_MEMSLOTS) >= 32
    size = kvm.vcpu_mmap_size()
    assert size % 4096 == 0 and size >= 4096


def test_the_memslot_capability_is_where_the_kernel_refuses(kvm: Kvm) -> None:
    """The daemon refuses a region once the VM's slots reach KVM_CAP_NR_MEMSLOTS
    (GuestMemory.check); this shows the kernel refuses exactly there: every
    slot id below the capability is taken and the next one is EINVAL.  (Through
    the daemon the fd limit comes first on this machine kind: one memfd per
    region and a hard RLIMIT_NOFILE of 20000 < 32764; test_exhaustion has it.)
    One shared page backs every slot, so 32764 slots cost about a second."""
    cap = kvm.check_extension(Cap.NR_MEMSLOTS)
    page = mmap.mmap(-1, 4096)
    hva = ctypes.addressof(ctypes.c_char.from_buffer(page))
    with kvm.create_vm() as vm:
        for slot in range(cap):
            vm.set_user_memory_region(slot, (1 << 32) + slot * 4096, 4096, hva, flags=0)
        with pytest.raises(KvmError) as refused:
            vm.set_user_memory_region(cap, (1 << 32) + cap * 4096, 4096, hva, flags=0)
        assert refused.value.errno == errno.EINVAL
    del hva
    gc.collect()
    page.close()


def test_open_missing_device_raises_kvm_error() -> None:
    before = open_fds()
    with pytest.raises(KvmError) as e:
        Kvm("/dev/does-not-exist-kvm")
    assert e.value.errno == errno.ENOENT
    assert open_fds() == before


def test_faulty_vm_fd_fails_with_ebadf() -> None:
    vm = VmFd(-2, 4096)
    calls: dict[str, Callable[[], object]] = {
        "KVM_CREATE_VCPU": lambda: vm.create_vcpu(0),
        "KVM_SET_USER_MEMORY_REGION": lambda: vm.set_user_memory_region(0, 0, 4096, 0),
        "KVM_GET_DIRTY_LOG": lambda: vm.get_dirty_log(0, 4096),
    }
    for name, call in calls.items():
        with pytest.raises(KvmError) as e:
            call()
        assert e.value.errno == errno.EBADF
        assert name in str(e.value)


def test_closed_fds_fail_with_ebadf_and_close_is_idempotent(kvm: Kvm) -> None:
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    vcpu.close()
    vcpu.close()
    with pytest.raises(KvmError) as e:
        vcpu.get_regs()
    assert e.value.errno == errno.EBADF
    vm.close()
    vm.close()
    with pytest.raises(KvmError) as e:
        vm.create_vcpu(1)
    assert e.value.errno == errno.EBADF


def test_bad_slot_arguments_raise_errno_and_leak_nothing(kvm: Kvm) -> None:
    mem = GuestMemory(2 * 4096)
    before = open_fds()
    with kvm.create_vm() as vm:
        slots = kvm.check_extension(Cap.NR_MEMSLOTS)
        bad = [
            ((0, 0x800, 4096, mem.hva), errno.EINVAL),  # unaligned guest address
            ((0, 0, 100, mem.hva), errno.EINVAL),  # unaligned size
            ((0, 0, 4096, mem.hva + 1), errno.EINVAL),  # unaligned host address
            ((slots, 0, 4096, mem.hva), errno.EINVAL),  # slot beyond the KVM limit
            ((1 << 32, 0, 4096, mem.hva), errno.EINVAL),  # does not fit the ABI's u32
            ((0, -4096, 4096, mem.hva), errno.EINVAL),
        ]
        for args, want in bad:
            with pytest.raises(KvmError) as e:
                vm.set_user_memory_region(*args)
            assert e.value.errno == want, args
            assert "KVM_SET_USER_MEMORY_REGION" in str(e.value)
        vm.set_user_memory_region(0, 0, 4096, mem.hva)
        with pytest.raises(KvmError) as e:  # overlaps slot 0
            vm.set_user_memory_region(1, 0, 4096, mem.hva + 4096)
        assert e.value.errno == errno.EEXIST
        with pytest.raises(KvmError) as e:  # no such slot
            vm.get_dirty_log(5, 4096)
        assert e.value.errno == errno.ENOENT
        vm.set_user_memory_region(0, 0, 0, mem.hva)  # size 0 deletes
        vm.set_user_memory_region(1, 0, 4096, mem.hva + 4096)  # so this no longer overlaps
        with pytest.raises(KvmError) as e:
            vm.create_vcpu(kvm.check_extension(Cap.MAX_VCPU_ID))
        assert e.value.errno == errno.EINVAL
        assert "KVM_CREATE_VCPU" in str(e.value)
    assert open_fds() == before
    mem.close()


def test_registers_round_trip_and_flat32_setup(kvm: Kvm) -> None:
    with kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        vcpu.set_regs(KvmRegs(rax=0x1234, rbx=0xDEAD, rip=0x2000, rflags=2))
        regs = vcpu.get_regs()
        assert (regs.rax, regs.rbx, regs.rip, regs.rflags) == (0x1234, 0xDEAD, 0x2000, 2)
        vcpu.setup_flat32(ENTRY, rbx=7, rdi=9)
        sregs, regs = vcpu.get_sregs(), vcpu.get_regs()
        assert sregs.cr0 & 1
        assert (sregs.cs.selector, sregs.cs.type, sregs.cs.db, sregs.cs.g) == (8, 11, 1, 1)
        assert (sregs.ds.selector, sregs.ss.type, sregs.ss.limit, sregs.ss.base) == (16, 3, 0xFFFFFFFF, 0)
        assert (regs.rip, regs.rbx, regs.rdi, regs.rax) == (ENTRY, 7, 9, 0)
        with pytest.raises(TypeError):
            vcpu.setup_flat32(ENTRY, ebx=1)


def test_immediate_exit_returns_intr(kvm: Kvm) -> None:
    with guest(kvm, SPIN) as (_, vcpu, _):
        vcpu.setup_flat32(ENTRY)
        vcpu.immediate_exit = True
        assert vcpu.run() is ExitReason.INTR
        assert vcpu.immediate_exit  # still set: clearing it is the caller's decision
        vcpu.immediate_exit = False
        assert not vcpu.immediate_exit


def test_kvm_run_releases_the_gil_and_a_signal_returns_intr(kvm: Kvm) -> None:
    install_kick_signal()
    with guest(kvm, SPIN) as (_, vcpu, _):
        vcpu.setup_flat32(ENTRY)
        counts = [0]
        stop = threading.Event()

        def count() -> None:
            while not stop.is_set():
                counts[0] += 1

        def kick() -> None:
            time.sleep(0.2)
            signal.pthread_kill(threading.main_thread().ident or 0, KICK_SIGNAL)

        counter = threading.Thread(target=count)
        kicker = threading.Thread(target=kick)
        counter.start()
        time.sleep(0.01)
        start_count = counts[0]
        kicker.start()
        t0 = time.monotonic()
        reason = vcpu.run()  # the guest spins forever: only the signal ends this
        elapsed = time.monotonic() - t0
        during = counts[0] - start_count
        stop.set()
        counter.join()
        kicker.join()
    assert reason is ExitReason.INTR
    assert 0.15 < elapsed < 2.0
    assert during > 10_000, f"counter thread advanced only {during} during a {elapsed:.2f} s KVM_RUN"


def test_dirty_log_counts_pages_written_by_the_host(kvm: Kvm) -> None:
    with guest(kvm, SPIN, data_size=4 << 20) as (vm, _, data):
        assert data is not None
        assert vm.count_dirty(1, data.size) == 0
        # Host writes through the mapping do not go through the guest's page tables:
        # the log counts only what the guest dirtied (payload tests count those).
        data.map[0:4] = b"abcd"
        assert len(vm.get_dirty_log(1, data.size)) == (4 << 20) // 4096 // 8
        assert vm.count_dirty(0, BOOT_SIZE) == 0


def test_create_and_close_200_vms_leaves_no_fd_or_thread(kvm: Kvm) -> None:
    install_kick_signal()
    mem = GuestMemory(BOOT_SIZE)  # made before counting: its mmap holds a dup of the memfd
    fds, threads = open_fds(), thread_ids()
    t0 = time.monotonic()
    for i in range(200):
        with kvm.create_vm() as vm:
            vm.set_user_memory_region(0, 0, BOOT_SIZE, mem.hva)
            vm.set_user_memory_region(1, DATA_GPA, 0x1000, mem.hva)  # aliasing the same memory is fine
            with vm.create_vcpu(0) as v0, vm.create_vcpu(1) as v1:
                runners = [VcpuRunner(v0, 0), VcpuRunner(v1, 1)]
                if i == 0:
                    assert len(thread_ids() - threads) == 2
                    assert len(open_fds() - fds) == 5  # vm, 2 vcpus, 2 mmap dups of vcpu fds
                for r in runners:
                    r.close()
    elapsed = time.monotonic() - t0
    assert open_fds() == fds
    # KVM's own per-VM worker (kvm-nx-lpage-recovery, a task of this process that a
    # VM's first KVM_RUN starts) ends after its VM fd is closed, on its own time.
    wait_until(lambda: thread_ids() == threads, "the last VM's KVM worker to end", timeout=10)
    assert elapsed < 30
    mem.close()
