"""What /proc says about a VMM process: its KVM fds, threads and guest memory.

Only reads; every function raises ProcessLookupError when the process is
gone (or was never there), so a caller maps one exception to one answer.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

KVM_VM_FD = "anon_inode:kvm-vm"

# vCPU thread names as each VMM sets them (comm, at most 15 characters).
# Checked in their sources: QEMU accel/kvm/kvm-accel-ops.c snprintf "CPU %d/KVM"
# (named only with -name ...,debug-threads=on; run here: Debian's QEMU 7.2.22),
# cloud-hypervisor vmm/src/cpu.rs thread::Builder .name(format!("vcpu{vcpu_id}")),
# Firecracker src/vmm/src/vstate/vcpu .name(format!("fc_vcpu {}", cpu_index)).
VCPU_NAMES: dict[str, re.Pattern[str]] = {
    "qemu": re.compile(r"CPU (\d+)/KVM"),
    "cloud-hypervisor": re.compile(r"vcpu(\d+)"),
    "firecracker": re.compile(r"fc_vcpu (\d+)"),
}

# Guest memory is a large shared mapping of a memfd or a file (QEMU's
# memory-backend-memfd / -file, cloud-hypervisor's and Firecracker's memfd);
# smaller shared mappings are vCPU run structures, rings and ROMs.
MIN_GUEST_MAPPING = 2 << 20


@dataclass(frozen=True)
class Thread:
    tid: int
    comm: str


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    inode: int
    path: str

    @property
    def size(self) -> int:
        return self.end - self.start


def _proc(pid: int) -> Path:
    return Path(f"/proc/{pid}")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {path.parts[2]}") from None


def start_time(pid: int) -> int:
    """Clock ticks after boot at which the process started: with the pid, an
    identity that a reused pid does not share."""
    stat = _read(_proc(pid) / "stat")
    return int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, counted after the comm


def tgid(pid: int) -> int:
    for line in _read(_proc(pid) / "status").splitlines():
        if line.startswith("Tgid:"):
            return int(line.split()[1])
    raise ProcessLookupError(f"no process {pid}")


def comm(pid: int) -> str:
    return _read(_proc(pid) / "comm").strip()


def exe_name(pid: int) -> str:
    try:
        return os.path.basename(os.readlink(_proc(pid) / "exe"))
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid}") from None
    except OSError:
        return ""


def has_kvm_vm(pid: int) -> bool:
    """True if the process holds a KVM VM fd (/proc/PID/fd/N -> anon_inode:kvm-vm)."""
    fds = _proc(pid) / "fd"
    try:
        names = os.listdir(fds)
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid}") from None
    for n in names:
        try:
            if os.readlink(fds / n) == KVM_VM_FD:
                return True
        except OSError:
            continue  # closed meanwhile
    return False


def threads(pid: int) -> list[Thread]:
    tasks = _proc(pid) / "task"
    try:
        tids = sorted(int(t) for t in os.listdir(tasks))
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid}") from None
    found = []
    for tid in tids:
        try:
            found.append(Thread(tid, (tasks / str(tid) / "comm").read_text().strip()))
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile (ENOENT, or ESRCH while it is being reaped)
    return found


def vcpu_threads(found: list[Thread]) -> tuple[str, dict[int, int]]:
    """(VMM kind, vCPU index -> tid) by the first naming scheme that matches
    any thread; ("", {}) when none does (QEMU without debug-threads=on)."""
    for vmm, pattern in VCPU_NAMES.items():
        vcpus = {int(m.group(1)): t.tid for t in found if (m := pattern.fullmatch(t.comm))}
        if vcpus:
            return vmm, vcpus
    return "", {}


def guest_mappings(pid: int) -> list[Mapping]:
    """Shared memfd or file mappings large enough to be guest RAM, by address."""
    out = []
    for line in _read(_proc(pid) / "maps").splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or parts[1][3] != "s":
            continue
        path = parts[5]
        if path.startswith("anon_inode:") or path.startswith("/dev/"):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if hi - lo >= MIN_GUEST_MAPPING:
            out.append(Mapping(lo, hi, int(parts[4]), path.removesuffix(" (deleted)")))
    return out


def anonymous_mappings(pid: int, size: int) -> list[Mapping]:
    """Private anonymous read-write mappings of exactly ``size`` bytes: where
    QEMU keeps a memory-backend-ram (``-m`` without a memdev is one, pc.ram)."""
    out = []
    for line in _read(_proc(pid) / "maps").splitlines():
        parts = line.split()
        if len(parts) != 5 or parts[1] != "rw-p":
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if hi - lo == size:
            out.append(Mapping(lo, hi, 0, ""))
    return out


def memfd_fds(pid: int) -> list[tuple[int, int]]:
    """(fd, inode) of every memfd the process holds, by fd number: QEMU makes
    one per memory backend, in the order it creates the backends."""
    fds = _proc(pid) / "fd"
    out = []
    try:
        names = os.listdir(fds)
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid}") from None
    for n in names:
        try:
            if os.readlink(fds / n).startswith("/memfd:"):
                out.append((int(n), os.stat(fds / n).st_ino))
        except OSError:
            continue
    return sorted(out)


def task_cpu_time_ns(pid: int, tid: int) -> int:
    try:
        return int((_proc(pid) / "task" / str(tid) / "schedstat").read_text().split()[0])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return 0


def task_current_cpu(pid: int, tid: int) -> int:
    try:
        stat = (_proc(pid) / "task" / str(tid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return -1
    return int(stat[stat.rindex(")") + 2:].split()[36])  # field 39, "processor"


def cmdline(pid: int) -> list[str]:
    try:
        data = (_proc(pid) / "cmdline").read_bytes()
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid}") from None
    return [a.decode(errors="replace") for a in data.split(b"\0") if a]


def numa_maps_pages(pid: int) -> dict[int, dict[int, int]]:
    """Mapping start -> resident pages per node, as the kernel counts them in
    /proc/PID/numa_maps: one read for every mapping, where move_pages(2)
    would take a call per page (100 ms for 256 MiB here)."""
    out: dict[int, dict[int, int]] = {}
    for line in _read(_proc(pid) / "numa_maps").splitlines():
        fields = line.split()
        counts = {}
        for f in fields[2:]:
            if f[0] == "N" and "=" in f:
                node, pages = f[1:].split("=", 1)
                if node.isdigit() and pages.isdigit():
                    counts[int(node)] = int(pages)
        out[int(fields[0], 16)] = counts
    return out
