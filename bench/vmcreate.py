"""Figure 2: VM creation over D-Bus vs the bare ioctl floor, vs QEMU, and prealloc vs MADV_POPULATE_WRITE.

All in one loop, alternating, so every side sees the same machine load:
- CreateVM("bench-create", 4 vCPUs, 256 MiB, one guest node bound to host
  node 0) to the real daemon over a private bus, reply received;
- the floor: the same KVM_CREATE_VM, memfd + mmap + mbind +
  KVM_SET_USER_MEMORY_REGION, KVM_CREATE_VCPU + mmap x4 by hand (rawkvm);
- QEMU, the peer users run today: ``qemu-system-x86_64 -accel kvm -S
  -nodefaults -display none -m 256 -smp 4`` from exec until its QMP socket
  answers ``query-status`` after the ``qmp_capabilities`` handshake;
- CreateVM with prealloc, against a bare memfd + mmap + mbind + madvise(
  MADV_POPULATE_WRITE) of the same 256 MiB: the prealloc's share is the
  difference of the two CreateVM medians.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from dbus_fast import Variant
from dbus_fast.aio import MessageBus

from bench import rawkvm
from bench.daemonproc import DRIVER, MANAGER, Daemon, call, ok
from bench.report import Row, median, percentile

MiB = 1 << 20
VCPUS = 4
SIZE = 256 * MiB
MADV_POPULATE_WRITE = 23
QEMU = ["qemu-system-x86_64", "-accel", "kvm", "-S", "-nodefaults", "-display", "none", "-m", "256",
        "-smp", str(VCPUS)]
_madvise = ctypes.CDLL(None, use_errno=True).madvise
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _qmp_ready(sock_path: Path) -> float:
    """exec of QEMU until query-status answered, in ms (QEMU killed after)."""
    t0 = time.perf_counter_ns()
    proc = subprocess.Popen([*QEMU, "-qmp", f"unix:{sock_path},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + 30
        while True:
            try:
                s.connect(str(sock_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise RuntimeError(f"QEMU did not open its QMP socket: {err[-500:]}") from None
                time.sleep(0.0005)
        f = s.makefile("rwb", buffering=0)

        def reply() -> dict[str, object]:
            while True:
                msg: dict[str, object] = json.loads(f.readline())
                if "event" not in msg:
                    return msg

        reply()  # greeting
        f.write(b'{"execute": "qmp_capabilities"}\n')
        reply()
        f.write(b'{"execute": "query-status"}\n')
        status = reply()
        t1 = time.perf_counter_ns()
        ret = status.get("return")
        if not isinstance(ret, dict) or ret.get("status") != "prelaunch":
            raise RuntimeError(f"QEMU query-status: {status}")
        s.close()
        return (t1 - t0) / 1e6
    finally:
        proc.kill()
        proc.wait()
        sock_path.unlink(missing_ok=True)


def _populate(node: int) -> tuple[float, float]:
    """memfd + mmap + mbind + MADV_POPULATE_WRITE of SIZE: (all, populate alone) in ms."""
    t0 = time.perf_counter_ns()
    fd = os.memfd_create("bench-populate", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, SIZE)
        hva = rawkvm.mmap_shared(fd, SIZE)
        rawkvm.mbind(hva, SIZE, node)
        t1 = time.perf_counter_ns()
        if _madvise(hva, SIZE, MADV_POPULATE_WRITE) != 0:
            raise OSError(ctypes.get_errno(), "madvise(MADV_POPULATE_WRITE)")
        t2 = time.perf_counter_ns()
        rawkvm.munmap(hva, SIZE)
    finally:
        os.close(fd)
    return (t2 - t0) / 1e6, (t2 - t1) / 1e6


async def _measure(address: str, runs: int, node: int, with_qemu: bool) -> dict[str, list[float]]:
    bus = await MessageBus(bus_address=address).connect()
    kvm_fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    res: dict[str, list[float]] = {k: [] for k in
                                   ("create", "destroy", "raw", "qemu", "pre", "pop_all", "pop", "getid")}
    opts = {"numa_nodes": Variant("u", 1), "host_nodes": Variant("au", [node])}
    pre = {**opts, "prealloc": Variant("b", True)}
    tmp = Path(tempfile.mkdtemp(prefix="bench-qmp-"))
    try:
        for i in range(runs + 1):  # run 0 warms up every path
            t0 = time.perf_counter_ns()
            await ok(bus, call(DRIVER, "GetId")())
            t1 = time.perf_counter_ns()
            await ok(bus, call(MANAGER, "CreateVM", "suta{sv}", ["bench-create", VCPUS, SIZE, opts])())
            t2 = time.perf_counter_ns()
            await ok(bus, call(MANAGER, "DestroyVM", "s", ["bench-create"])())
            t3 = time.perf_counter_ns()
            raw = rawkvm.RawVm.create(kvm_fd, VCPUS, SIZE, [node])
            t4 = time.perf_counter_ns()
            raw.close()
            qemu = _qmp_ready(tmp / "qmp.sock") if with_qemu else 0.0
            t5 = time.perf_counter_ns()
            await ok(bus, call(MANAGER, "CreateVM", "suta{sv}", ["bench-create", VCPUS, SIZE, pre])())
            t6 = time.perf_counter_ns()
            await ok(bus, call(MANAGER, "DestroyVM", "s", ["bench-create"])())
            pop_all, pop = _populate(node)
            if i:
                res["getid"].append((t1 - t0) / 1e6)
                res["create"].append((t2 - t1) / 1e6)
                res["destroy"].append((t3 - t2) / 1e6)
                res["raw"].append((t4 - t3) / 1e6)
                res["qemu"].append(qemu)
                res["pre"].append((t6 - t5) / 1e6)
                res["pop_all"].append(pop_all)
                res["pop"].append(pop)
    finally:
        os.close(kvm_fd)
        shutil.rmtree(tmp, ignore_errors=True)
        bus.disconnect()
    return res


def vm_creation(runs: int, with_qemu: bool = True) -> list[Row]:
    node = 0
    with Daemon() as daemon:
        r = asyncio.run(_measure(daemon.address, runs, node, with_qemu and shutil.which(QEMU[0]) is not None))
    shape = f"{VCPUS} vCPUs, 256 MiB bound to host node {node}"
    create = median(r["create"])
    rows = [
        Row(f"CreateVM over D-Bus ({shape}), median", create, median(r["raw"]), "ms",
            f"{runs} alternating runs; reply received vs the bare ioctl + memfd + mbind sequence (rawkvm, no "
            f"threads); kvmnumad also starts 4 parked vCPU threads, a 1 MiB boot slot and a cpuset; a bus "
            f"round trip (GetId) costs {median(r['getid']):.2f} ms; goal <= 3x"),
        Row("  same, p99", percentile(r["create"], 99), percentile(r["raw"], 99), "ms", "same samples"),
    ]
    if with_qemu and r["qemu"][0] > 0:
        rows.append(Row("  vs QEMU to QMP ready, median", create, median(r["qemu"]), "ms",
                        "`" + " ".join(QEMU) + "` from exec until query-status answers after "
                        "qmp_capabilities; "
                        "ratio = kvmnumad/QEMU, goal <= 0.067 (>= 15x faster); "
                        f"QEMU p99 {percentile(r['qemu'], 99):.1f} ms"))
    else:
        rows.append(Row("  vs QEMU to QMP ready, median", create, None, "ms", "qemu-system-x86_64 not run"))
    pre_share = [p - c for p, c in zip(r["pre"], r["create"], strict=True)]
    rows += [
        Row("  DestroyVM over D-Bus, median", median(r["destroy"]), None, "ms", "same runs"),
        Row("CreateVM with prealloc, median", median(r["pre"]), median(r["raw"]) + median(r["pop"]), "ms",
            "vs the floor above + MADV_POPULATE_WRITE of 256 MiB by hand, same run"),
        Row("  prealloc's share vs MADV_POPULATE_WRITE, median", median(pre_share), median(r["pop"]), "ms",
            "CreateVM(prealloc) - CreateVM, paired per run, vs madvise(MADV_POPULATE_WRITE) on a bare "
            f"mbound 256 MiB memfd mapping (with memfd+mmap+mbind: {median(r['pop_all']):.1f} ms); "
            "goal <= 1.2x"),
    ]
    return rows
