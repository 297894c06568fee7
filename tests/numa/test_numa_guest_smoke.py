"""The guest is what the harness claims: the kernel's own view of nodes, CPUs,
distances, memory binding, /dev/kvm and CPU hotplug, checked against the
topology table the launcher booted it from. If one of these fails, every
other numa test's result is meaningless."""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import select
import struct
import subprocess
import time
from pathlib import Path

import pytest
import pyudev

from tests import observe
from tests.numa_guest import Topology
from tests.numa_guest.hotplug import CpuHotplug

UEVENT_TIMEOUT = 60.0  # udevd under TCG can take seconds per event


def test_nodes_and_cpus_match_topology(topology: Topology) -> None:
    want = {i: set(node.cpus) for i, node in enumerate(topology.nodes)}
    assert {n: observe.node_cpus(n) for n in observe.host_nodes()} == want
    hw = observe.numactl_hardware()
    assert hw.cpus == want
    assert observe.online_cpus() == set(range(topology.ncpus))
    for i, node in enumerate(topology.nodes):
        # The kernel keeps some of each node for itself: size is a bit under what QEMU got.
        assert 0.8 * node.mem_mb <= hw.size_mb[i] <= node.mem_mb, (i, hw.size_mb)


def test_distances_match_topology(topology: Topology) -> None:
    n = len(topology.nodes)
    want = [[topology.distance(a, b) for b in range(n)] for a in range(n)]
    assert [observe.node_distances(a) for a in range(n)] == want
    hw = observe.numactl_hardware()
    assert [[hw.distances[a][b] for b in range(n)] for a in range(n)] == want


def test_memory_binds_to_every_node(topology: Topology) -> None:
    """Anonymous pages really land on each node, memory-only ones included."""
    libnuma = ctypes.CDLL("libnuma.so.1", use_errno=True)
    libnuma.numa_alloc_onnode.restype = ctypes.c_void_p
    libnuma.numa_alloc_onnode.argtypes = [ctypes.c_size_t, ctypes.c_int]
    libnuma.numa_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    assert libnuma.numa_available() == 0
    size = 4 << 20
    pages = size // mmap.PAGESIZE
    for node in range(len(topology.nodes)):
        addr = libnuma.numa_alloc_onnode(size, node)
        assert addr, f"numa_alloc_onnode({node}) failed: errno {ctypes.get_errno()}"
        try:
            ctypes.memset(addr, 0xA5, size)  # fault every page in under the bind policy
            entry = observe.numa_maps_at(addr)
            assert entry.policy == f"bind:{node}", entry.raw
            assert entry.pages_per_node == {node: pages}, entry.raw
        finally:
            libnuma.numa_free(addr, size)


# A 7-byte real-mode payload: out 'A' to 0x3f8, then hlt.
_PAYLOAD = bytes([0xBA, 0xF8, 0x03, 0xB0, 0x41, 0xEE, 0xF4])
_KVM_CREATE_VM, _KVM_GET_VCPU_MMAP_SIZE, _KVM_CREATE_VCPU, _KVM_RUN = 0xAE01, 0xAE04, 0xAE41, 0xAE80
_KVM_SET_USER_MEMORY_REGION, _KVM_GET_SREGS, _KVM_SET_SREGS = 0x4020AE46, 0x8138AE83, 0x4138AE84
_KVM_SET_REGS = 0x4090AE82
_KVM_EXIT_IO, _KVM_EXIT_HLT = 2, 5


def test_dev_kvm_runs_a_guest() -> None:
    """Nested KVM works in the guest, so kvmnumad can run VMs there.

    Deliberately independent of kvmnumad.kvm: this checks the machine, not our code.
    """
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    vm = vcpu = memfd = -1
    try:
        vm = fcntl.ioctl(kvm, _KVM_CREATE_VM, 0)
        memfd = os.memfd_create("smoke", os.MFD_CLOEXEC)
        os.ftruncate(memfd, 0x10000)
        mem = mmap.mmap(memfd, 0x10000)
        mem[0x1000 : 0x1000 + len(_PAYLOAD)] = _PAYLOAD
        # `mem` outlives every KVM_RUN below, so the host address stays valid.
        hva = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        fcntl.ioctl(vm, _KVM_SET_USER_MEMORY_REGION, struct.pack("IIQQQ", 0, 0, 0, 0x10000, hva))
        vcpu = fcntl.ioctl(vm, _KVM_CREATE_VCPU, 0)
        run = mmap.mmap(vcpu, fcntl.ioctl(kvm, _KVM_GET_VCPU_MMAP_SIZE))
        sregs = bytearray(0x138)
        fcntl.ioctl(vcpu, _KVM_GET_SREGS, sregs)
        struct.pack_into("QIH", sregs, 0, 0, 0xFFFF, 0)  # cs: base 0, selector 0
        fcntl.ioctl(vcpu, _KVM_SET_SREGS, bytes(sregs))
        regs = bytearray(0x90)
        struct.pack_into("QQ", regs, 0x80, 0x1000, 2)  # rip, rflags
        fcntl.ioctl(vcpu, _KVM_SET_REGS, bytes(regs))
        libc = ctypes.CDLL(None, use_errno=True)  # releases the GIL during KVM_RUN
        exits: list[tuple[object, ...]] = []
        for _ in range(3):
            assert libc.ioctl(vcpu, _KVM_RUN, 0) == 0, os.strerror(ctypes.get_errno())
            reason = struct.unpack_from("I", run, 8)[0]
            if reason == _KVM_EXIT_IO:
                _direction, size, port, count, offset = struct.unpack_from("BBHIQ", run, 32)
                exits.append(("io", port, run[offset : offset + size * count]))
            else:
                exits.append((reason,))
                break
        assert exits == [("io", 0x3F8, b"A"), (_KVM_EXIT_HLT,)]
        run.close()
        del hva
        mem.close()
    finally:
        for fd in (vcpu, vm, memfd, kvm):
            if fd >= 0:
                os.close(fd)


def test_guest_environment() -> None:
    """What guest-run.sh sets up for the daemon's fixtures."""
    mounts = Path("/proc/mounts").read_text().split("\n")
    assert any(line.split()[1:2] == ["/sys/fs/cgroup"] for line in mounts if line)
    assert Path("/run/dbus").is_dir()
    assert Path("/dev/kvm").is_char_device()


def _hotpluggable_cpu(topology: Topology) -> int:
    """The highest CPU: cpu0 usually cannot go offline."""
    return topology.ncpus - 1


def test_cpu_offline_fixture_restores(topology: Topology, cpu_offline: CpuHotplug) -> None:
    cpu = _hotpluggable_cpu(topology)
    node = next(i for i, n in enumerate(topology.nodes) if cpu in n.cpus)
    with cpu_offline(cpu):
        assert cpu not in observe.online_cpus()
        assert cpu not in observe.numactl_hardware().cpus[node]
    assert cpu in observe.online_cpus()
    assert observe.numactl_hardware().cpus[node] == set(topology.nodes[node].cpus)
    # Without the context manager, teardown's restore() puts it back.
    cpu_offline.offline(cpu)
    assert cpu not in observe.online_cpus()
    cpu_offline.restore()
    assert cpu in observe.online_cpus()


def test_udev_monitor_sees_cpu_offline_online(topology: Topology, cpu_offline: CpuHotplug) -> None:
    """Both the raw kernel uevents and udevd's re-broadcast reach a cpu-filtered monitor."""
    cpu = _hotpluggable_cpu(topology)
    context = pyudev.Context()
    # udevd re-broadcasts seconds late under TCG: an earlier test's re-online of
    # this CPU once arrived after the monitors started, before this offline
    # (4node, 1 run in 3). Its queue is drained first, and the wait below asks
    # for an offline followed by an online, so a straggler cannot satisfy it.
    subprocess.run(["udevadm", "settle", f"--timeout={UEVENT_TIMEOUT:.0f}"], check=True)
    monitors = {}
    for source in ("kernel", "udev"):
        monitor = pyudev.Monitor.from_netlink(context, source=source)
        monitor.filter_by("cpu")
        monitor.start()  # before the change, so no event is missed
        monitors[monitor.fileno()] = (source, monitor)
    with cpu_offline(cpu):
        pass
    seen: list[tuple[str, str, str]] = []

    def offline_then_online(source: str) -> bool:
        mine = [a for s, a, name in seen if s == source and name == f"cpu{cpu}"]
        return "offline" in mine and "online" in mine[mine.index("offline"):]

    deadline = time.monotonic() + UEVENT_TIMEOUT
    while not all(offline_then_online(source) for source in ("kernel", "udev")):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"after {UEVENT_TIMEOUT} s saw {seen}: want cpu{cpu} offline, then online, from each")
        ready, _, _ = select.select(list(monitors), [], [], remaining)
        for fd in ready:
            source, monitor = monitors[fd]
            while (device := monitor.poll(timeout=0)) is not None:
                seen.append((source, device.action, device.sys_name))
