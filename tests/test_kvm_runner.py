"""VcpuRunner on the real /dev/kvm: a thread per vCPU that exists before the guest runs,
sleeps when the guest idles or halts, and stops or ends within a second."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import psutil
import pytest

from kvmnumad.kvm.errors import KvmError
from kvmnumad.kvm.payload import TOUCH_PAYLOAD, touch_payload_regs
from kvmnumad.kvm.runner import KICK_SIGNAL, VcpuRunner, install_kick_signal
from kvmnumad.kvm.system import Kvm
from kvmnumad.kvm.vcpu import VcpuFd
from tests.observe import online_cpus, taskset_affinity, thread_affinity, thread_ids
from tests.test_kvm_helpers import DATA_GPA, ENTRY, SPIN, guest
from tests.waiting import wait_until

DATA = 2 << 20


@pytest.fixture(scope="module")
def kvm() -> Iterator[Kvm]:
    with Kvm() as k:
        yield k


class Serial:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.data: list[tuple[int, bytes]] = []

    def __call__(self, index: int, data: bytes) -> None:
        with self.lock:
            self.data.append((index, data))


def touch_vcpu(vcpu: VcpuFd, index: int, passes: int) -> None:
    vcpu.setup_flat32(ENTRY, **touch_payload_regs(DATA_GPA, DATA, index, passes))


def test_thread_exists_parked_before_start_and_can_be_pinned(kvm: Kvm) -> None:
    before = thread_ids()
    with guest(kvm, TOUCH_PAYLOAD, DATA) as (_, vcpu, _):
        runner = VcpuRunner(vcpu, 0)
        try:
            assert runner.tid in thread_ids() - before
            with open(f"/proc/self/task/{runner.tid}/comm") as f:
                assert f.read().strip() == "vcpu0"
            assert runner.state == "created"
            assert runner.exit_counts() == {}
            cpu = min(online_cpus())
            os.sched_setaffinity(runner.tid, {cpu})
            assert taskset_affinity(runner.tid) == {cpu}
            touch_vcpu(vcpu, 0, 2)
            runner.start()
            wait_until(lambda: runner.state == "halted", "the runner to halt", timeout=5)
            assert runner.current_cpu() == cpu
            assert thread_affinity(os.getpid(), runner.tid) == {cpu}
        finally:
            runner.close()
    assert runner.tid not in thread_ids()


def test_progress_rises_and_serial_arrives(kvm: Kvm) -> None:
    serial = Serial()
    with guest(kvm, TOUCH_PAYLOAD, DATA) as (vm, vcpu, _):
        touch_vcpu(vcpu, 3, 0)  # forever
        runner = VcpuRunner(vcpu, 3, on_serial=serial, idle_interval=0.01)
        try:
            runner.start()
            wait_until(lambda: runner.progress >= 3, "3 passes", timeout=5)
            first = runner.progress
            wait_until(lambda: runner.progress >= first + 3, "3 more passes", timeout=5)
            assert runner.state in ("running", "idle")
            runner.stop()
            assert runner.state == "stopped"
            stopped_at = runner.progress
            time.sleep(0.1)
            assert runner.progress == stopped_at  # parked: no more passes
            with serial.lock:
                received = list(serial.data)
            assert len(received) >= stopped_at - 1
            assert set(received) == {(3, b"3")}
            counts = runner.exit_counts()
            assert counts["io"] >= 2 * stopped_at and counts["hlt"] >= stopped_at - 1
            assert vm.count_dirty(1, DATA) == DATA // 4096
            assert runner.cpu_time_ns() > 0
            runner.start()  # resumes where it stopped
            wait_until(lambda: runner.progress > stopped_at, "a pass after the restart", timeout=5)
        finally:
            runner.close()


def test_finite_passes_end_halted_and_costs_no_cpu(kvm: Kvm) -> None:
    with guest(kvm, TOUCH_PAYLOAD, DATA) as (_, vcpu, _):
        touch_vcpu(vcpu, 0, 3)
        runner = VcpuRunner(vcpu, 0, idle_interval=0.01)
        try:
            runner.start()
            wait_until(lambda: runner.state == "halted", "the runner to halt", timeout=5)
            assert runner.progress == 3
            assert runner.exit_counts() == {"io": 7, "hlt": 2}
            proc = psutil.Process()
            t0, cpu0, thread0 = time.monotonic(), proc.cpu_times(), runner.cpu_time_ns()
            time.sleep(2.0)
            t1, cpu1, thread1 = time.monotonic(), proc.cpu_times(), runner.cpu_time_ns()
            share = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (t1 - t0)
            assert share < 0.05, f"halted vCPU process used {share:.1%} of a CPU"
            assert thread1 - thread0 < 5_000_000  # the vCPU thread itself: < 5 ms in 2 s
            assert runner.exit_counts() == {"io": 7, "hlt": 2}  # KVM_RUN was not re-entered
            runner.stop()
            assert runner.state == "stopped"
            runner.start()
            assert runner.state == "halted"  # a done guest stays halted
        finally:
            runner.close()


def test_stop_and_close_of_a_spinning_guest_within_a_second(kvm: Kvm) -> None:
    with guest(kvm, SPIN) as (_, vcpu, _):
        vcpu.setup_flat32(ENTRY)
        runner = VcpuRunner(vcpu, 0)
        try:
            runner.start()
            # inside KVM_RUN, never exiting
            wait_until(lambda: runner.cpu_time_ns() > 50_000_000, "50 ms of vCPU time", timeout=5)
            assert runner.state == "running"
            t0 = time.monotonic()
            runner.stop()
            stop_s = time.monotonic() - t0
            assert runner.state == "stopped"
            assert runner.exit_counts().get("intr", 0) >= 1
            assert stop_s < 1.0
            cpu = runner.cpu_time_ns()
            time.sleep(0.2)
            assert runner.cpu_time_ns() - cpu < 2_000_000  # parked, not spinning
            runner.start()
            wait_until(lambda: runner.cpu_time_ns() - cpu > 50_000_000, "50 ms more vCPU time", timeout=5)
            t0 = time.monotonic()
            runner.close()
            close_s = time.monotonic() - t0
            assert close_s < 1.0
            assert runner.tid not in thread_ids()
            assert runner.state == "stopped"
            runner.close()  # idempotent
            with pytest.raises(KvmError):
                runner.start()
        finally:
            runner.close()


def test_triple_fault_stops_the_vcpu_with_the_reason(kvm: Kvm, caplog: pytest.LogCaptureFixture) -> None:
    with guest(kvm, b"\x0f\x0b") as (_, vcpu, _):  # ud2, with no usable IDT: #UD -> #GP -> #DF -> shutdown
        vcpu.setup_flat32(ENTRY)
        sregs = vcpu.get_sregs()
        sregs.idt.base, sregs.idt.limit = 0, 0
        vcpu.set_sregs(sregs)
        runner = VcpuRunner(vcpu, 0)
        try:
            runner.start()
            wait_until(lambda: runner.fault is not None, "the runner to record a fault", timeout=5)
            assert runner.fault == "shutdown"
            wait_until(lambda: runner.state == "stopped", "the runner to stop", timeout=5)
            assert runner.exit_counts() == {"shutdown": 1}
            # the log says where the guest was: RIP at the ud2, in 32-bit protected mode
            logged = [r.getMessage() for r in caplog.records if "stopped by exit SHUTDOWN" in r.getMessage()]
            assert len(logged) == 1 and f"rip={ENTRY:#x}" in logged[0] and "cr0=0x" in logged[0], logged
            with pytest.raises(KvmError, match="shutdown"):
                runner.start()
            assert runner.tid in thread_ids()  # parked, not dead: close() still joins it
        finally:
            runner.close()


def test_kick_works_even_when_the_creator_blocks_the_signal(kvm: Kvm) -> None:
    with guest(kvm, SPIN) as (_, vcpu, _):
        vcpu.setup_flat32(ENTRY)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {KICK_SIGNAL})
        try:
            runner = VcpuRunner(vcpu, 0)  # its thread inherits the blocked mask
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        try:
            runner.start()
            wait_until(lambda: runner.cpu_time_ns() > 20_000_000, "20 ms of vCPU time", timeout=5)
            t0 = time.monotonic()
            runner.stop()
            assert time.monotonic() - t0 < 1.0
        finally:
            runner.close()


def test_stop_from_the_serial_callback_does_not_deadlock(kvm: Kvm) -> None:
    with guest(kvm, TOUCH_PAYLOAD, DATA) as (_, vcpu, _):
        touch_vcpu(vcpu, 0, 0)
        runner: VcpuRunner | None = None

        def on_serial(index: int, data: bytes) -> None:
            assert runner is not None
            runner.stop()

        runner = VcpuRunner(vcpu, 0, on_serial=on_serial)
        try:
            runner.start()
            wait_until(lambda: runner is not None and runner.state == "stopped",
                       "the serial consumer to stop the runner", timeout=2.0)
            assert runner.progress == 1
        finally:
            runner.close()


def test_a_failing_serial_consumer_does_not_kill_the_vcpu(kvm: Kvm) -> None:
    def broken(index: int, data: bytes) -> None:
        raise RuntimeError("consumer bug")

    with guest(kvm, TOUCH_PAYLOAD, DATA) as (_, vcpu, _):
        touch_vcpu(vcpu, 0, 2)
        runner = VcpuRunner(vcpu, 0, on_serial=broken, idle_interval=0.01)
        try:
            runner.start()
            wait_until(lambda: runner.state == "halted", "the runner to halt", timeout=5)
            assert runner.progress == 2 and runner.fault is None
        finally:
            runner.close()


def test_runner_off_main_thread_needs_the_signal_installed_first(kvm: Kvm) -> None:
    def in_thread(call: Callable[[], object]) -> BaseException | None:
        errors: list[BaseException] = []

        def target() -> None:
            try:
                call()
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=target)
        t.start()
        t.join()
        return errors[0] if errors else None

    with guest(kvm, SPIN) as (_, vcpu, _):
        previous = signal.signal(KICK_SIGNAL, signal.SIG_DFL)
        try:
            error = in_thread(lambda: VcpuRunner(vcpu, 0).close())
            assert isinstance(error, RuntimeError) and "install_kick_signal" in str(error)
            assert isinstance(in_thread(install_kick_signal), RuntimeError)
            install_kick_signal()  # from the main thread: then runners can be made anywhere
            assert in_thread(lambda: VcpuRunner(vcpu, 0).close()) is None
        finally:
            signal.signal(KICK_SIGNAL, previous)
