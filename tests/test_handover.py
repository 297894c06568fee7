"""Issue 13, the mechanism in one process: pause, save, make the VM anew on
the same memfds, restore the vCPUs, resume.

Checked from outside the daemon's bookkeeping: the guest's memory is read
through /proc/self/fd (the memfd itself), its pass counter from the pages the
payload writes, placement by taskset and numa_maps.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import os
import struct

import pytest

from kvmnumad import handover
from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions
from kvmnumad.vm import Vm
from kvmnumad.vm.saved import Recovery, Resume
from tests.observe import numa_maps_of_slot, open_fds, taskset_affinity, thread_ids
from tests.waiting import wait_until

MiB = 1 << 20
PAGE = 4096


def _vm(manager: Manager, name: str = "ho", memory: int = 32 * MiB, *, start: bool = True) -> Vm:
    return manager.create_vm(name, 4, memory, CreateOptions(numa_nodes=2, start=start,
                                                            policy=None))


def memfd_digest(fd: int) -> str:
    """SHA-256 of a memfd's bytes, read through /proc (a new open of the file, not the daemon's mapping)."""
    h = hashlib.sha256()
    with open(f"/proc/self/fd/{fd}", "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def page_counters(fd: int, size: int) -> list[int]:
    """The pass number the payload wrote at the start of each page, read from the memfd."""
    with open(f"/proc/self/fd/{fd}", "rb") as f:
        data = f.read(size)
    return [struct.unpack_from("<I", data, off)[0] for off in range(0, size, PAGE)]


def _dups(vm: Vm) -> dict[int, int]:
    return {slot: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0) for slot, fd in vm.memory.memfds()}


def test_paused_vm_resumes_on_same_memory_with_its_vcpu_state(manager: Manager) -> None:
    vm = _vm(manager)
    vm.set_vcpu_affinity(1, [1])
    wait_until(lambda: min(vm.progress()) >= 3, "three passes on every vCPU", timeout=30)
    definition = vm.definition()
    saved = vm.pause_for_handover()
    assert all(s is not None for s in saved)
    progress_before = [s.progress for s in saved if s is not None]
    memfds = _dups(vm)
    counters = {slot: page_counters(fd, os.fstat(fd).st_size) for slot, fd in memfds.items() if slot}
    manager.shutdown()  # the old VM fd, vCPU fds and mappings are gone; only our dups hold the memory
    try:
        fresh = Manager()
        try:
            resume = Resume(dict(memfds), saved)
            back = fresh.restore_vm(definition, None, resume)
            assert resume.memfds == {}  # every slot adopted its memfd
            assert back.recovery == Recovery.RESUMED
            new_fds = dict(back.memory.memfds())
            # placement re-applied: the pin is the kernel's again, memory bound per numa_maps
            tids = dict(back.vcpu_threads())
            assert taskset_affinity(tids[1]) == {1}
            for r in back.memory_regions():
                entry = numa_maps_of_slot("ho", r.slot)
                assert entry.policy.startswith("bind:"), entry.raw
            # counters continue: progress never drops, and grows past where it was
            assert all(p >= b for p, b in zip(back.progress(), progress_before, strict=True))
            # two more passes: the pages hold the pass number from before its increment
            wait_until(lambda: all(p >= b + 2 for p, b in zip(back.progress(), progress_before, strict=True)),
                       "every vCPU to continue past its saved pass", timeout=30)
            for slot, before in counters.items():
                after = page_counters(new_fds[slot], len(before) * PAGE)
                assert all(a >= b for a, b in zip(after, before, strict=True)), slot
                assert max(after) > max(before)
        finally:
            fresh.shutdown()
    finally:
        pass  # every memfd was adopted: the new VM owned and closed it


def test_stopped_vm_memory_is_byte_for_byte_the_same(manager: Manager) -> None:
    vm = _vm(manager, "hs")
    wait_until(lambda: min(vm.progress()) >= 2, "two passes", timeout=30)
    vm.stop()
    definition = vm.definition()
    assert not definition.running
    saved = vm.pause_for_handover()
    memfds = _dups(vm)
    before = {slot: memfd_digest(fd) for slot, fd in memfds.items()}
    manager.shutdown()
    fresh = Manager()
    try:
        back = fresh.restore_vm(definition, None, Resume(dict(memfds), saved))
        after = {slot: memfd_digest(fd) for slot, fd in back.memory.memfds()}
        assert after == before
        assert back.progress() == [s.progress for s in saved if s is not None]
        back.start()  # continues from the saved registers, not from entry (pass 1)
        wait_until(lambda: min(back.progress()) > max(s.progress for s in saved if s is not None),
                   "a pass past the saved count", timeout=30)
    finally:
        fresh.shutdown()
        pass  # every memfd was adopted: the new VM owned and closed it


def test_without_vcpu_state_the_vm_restarts_from_entry_on_kept_memory(manager: Manager) -> None:
    """The crash path: the memfds survive, the vCPU state does not."""
    vm = _vm(manager, "hc")
    wait_until(lambda: min(vm.progress()) >= 3, "three passes", timeout=30)
    definition = dataclasses.replace(vm.definition(), running=False)  # made, looked at, then started
    vm.pause_for_handover()
    memfds = _dups(vm)
    before = {slot: memfd_digest(fd) for slot, fd in memfds.items()}
    manager.shutdown()
    fresh = Manager()
    try:
        back = fresh.restore_vm(definition, None, Resume(dict(memfds)))
        assert back.recovery == Recovery.RESTARTED
        assert {slot: memfd_digest(fd) for slot, fd in back.memory.memfds()} == before  # memory kept
        assert back.progress() == [0, 0, 0, 0]
        back.start()
        wait_until(lambda: min(back.progress()) >= 1, "a pass from entry", timeout=30)
        assert min(back.progress()) < 3  # from entry: the counter starts again at 1
    finally:
        fresh.shutdown()


def test_an_adopted_fd_must_be_a_memfd_of_the_slot_size(manager: Manager) -> None:
    vm = _vm(manager, "hz", start=False)
    definition = vm.definition()
    manager.shutdown()
    fresh = Manager()
    fresh.max_vcpus()  # opens /dev/kvm once, as the first restore would
    wrong = os.memfd_create("x", os.MFD_CLOEXEC)
    os.ftruncate(wrong, PAGE)
    before = open_fds()
    threads = thread_ids()
    try:
        with pytest.raises(ValueError, match="bytes, the slot"):
            fresh.restore_vm(definition, None, Resume({0: wrong}))
        assert fresh.list_vms() == []
        assert len(open_fds()) == len(before) - 1  # the refused fd is closed with everything else
        with pytest.raises(OSError):
            os.fstat(wrong)
        assert thread_ids() == threads
    finally:
        fresh.shutdown()


def test_fd_names_round_trip() -> None:
    assert handover.parse_fd_name(handover.fd_name("a.b-c", 12)) == ("a.b-c", 12)
    assert handover.parse_fd_name("kvmnumad-handover") is None
    assert handover.parse_fd_name("vm.") is None


def test_the_payload_needs_only_regs_and_sregs(manager: Manager) -> None:
    """Which vCPU state the built-in payload really depends on: a resume with
    only KVM_SET_REGS and KVM_SET_SREGS from the save (FPU, XSAVE, XCRs, MSRs,
    MP state and events as a fresh vCPU has them) continues the counters.
    (Without the sregs a fresh vCPU is in real mode and would run the 32-bit
    code as 16-bit code; the whole state is saved all the same, for guests
    that use the rest.)"""
    vm = _vm(manager, "hr")
    wait_until(lambda: min(vm.progress()) >= 2, "two passes", timeout=30)
    definition = vm.definition()
    saved = vm.pause_for_handover()
    memfds = _dups(vm)
    manager.shutdown()
    fresh = Manager()
    try:
        blank = fresh._kvm_handle().create_vm()  # a fresh vCPU's state, for every part but regs/sregs
        with blank, blank.create_vcpu(0) as v0:
            reset = v0.save_state()
        partial = [None if s is None else dataclasses.replace(
            s, state=dataclasses.replace(reset, regs=s.state.regs, sregs=s.state.sregs)) for s in saved]
        back = fresh.restore_vm(definition, None, Resume(dict(memfds), partial))
        floor = [s.progress for s in saved if s is not None]
        wait_until(lambda: all(p >= f + 2 for p, f in zip(back.progress(), floor, strict=True)),
                   "every vCPU two passes further", timeout=30)
        assert not back.faults
    finally:
        fresh.shutdown()


def test_a_refused_sregs_names_what_kvm_weighs(manager: Manager) -> None:
    """A saved state KVM refuses (here made so: CS.L set outside long mode,
    which kvm_is_valid_sregs rejects) fails with the fields its checks weigh
    in the error: the systemd TCG guest's 1-in-3 KVM_SET_SREGS EINVAL on a
    restart said nothing more than EINVAL."""
    from kvmnumad.kvm.errors import KvmError  # noqa: PLC0415
    from kvmnumad.kvm.ioctls import KvmSregs  # noqa: PLC0415

    vm = manager._kvm_handle().create_vm()
    with vm, vm.create_vcpu(0) as v0, vm.create_vcpu(1) as v1:
        v0.setup_flat32(0x1000)
        state = v0.save_state()
        bad = KvmSregs.from_buffer_copy(state.sregs)
        bad.cs.l = 1
        with pytest.raises(KvmError) as refused:
            v1.restore_state(dataclasses.replace(state, sregs=bytes(bad)))
        assert refused.value.errno == errno.EINVAL
        assert "cs.l=1" in str(refused.value) and "efer=0x0" in str(refused.value), refused.value
