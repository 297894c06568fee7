"""From a pid to what an adopted VM is: VMM, vCPU threads, guest memory and
guest NUMA layout, from /proc, QMP, or the caller's options, in that order
of trust (QMP is QEMU's own word; names and maps are what it shows; an
option is what the caller knows and the process does not say)."""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field

from kvmnumad import errors
from kvmnumad.adopt import procfs, qmp
from kvmnumad.model import Policy


@dataclass(frozen=True)
class AdoptOptions:
    name: str | None = None
    policy: Policy | None = None
    qmp: str | None = None  # QEMU's QMP socket
    vcpu_nodes: tuple[int, ...] | None = None  # guest node of each vCPU, by index
    memory_nodes: tuple[int, ...] | None = None  # guest node of each guest memory mapping, by address
    auto_balance: bool | None = None  # None: the policy's default (optimizer/balance.py)


@dataclass(frozen=True)
class Region:
    """A guest memory mapping in the VMM's address space."""

    start: int
    size: int
    guest_node: int
    name: str  # the backend's id (QMP), else the mapping's path

    @property
    def hva(self) -> int:
        """Its address in the VMM's address space (what a migration job moves, with the VMM's pid)."""
        return self.start


@dataclass(frozen=True)
class Discovery:
    pid: int
    start_time: int
    vmm: str  # qemu, cloud-hypervisor, firecracker
    comm: str
    vcpus: dict[int, int]  # vCPU index -> tid
    vcpu_nodes: dict[int, int]  # vCPU index -> guest node
    numa_nodes: int
    regions: tuple[Region, ...]
    source: str  # where the layout came from: qmp, options, procfs
    qemu_version: str = ""
    host_nodes: dict[int, tuple[int, ...]] = field(default_factory=dict)  # guest node -> backend host-nodes


def check_adoptable(pid: int) -> tuple[int, str]:
    """(start time, comm) of a process that may be adopted, else a typed refusal."""
    if pid <= 0:
        raise errors.InvalidArgument(f"pid must be positive, got {pid}", pid=pid)
    try:
        if procfs.tgid(pid) != pid:
            raise errors.InvalidArgument(f"{pid} is a thread of process {procfs.tgid(pid)}, not a process",
                                         pid=pid)
        if pid == os.getpid():
            raise errors.InvalidArgument(f"process {pid} is kvmnumad itself: its own VMs are not adopted",
                                         pid=pid)
        began, name = procfs.start_time(pid), procfs.comm(pid)
        if not procfs.has_kvm_vm(pid):
            raise errors.InvalidArgument(
                f"process {pid} ({name}) holds no KVM VM fd (no /proc/{pid}/fd entry -> "
                f"{procfs.KVM_VM_FD}): it runs no KVM guest", pid=pid)
    except ProcessLookupError:
        raise errors.InvalidArgument(f"no process {pid}", pid=pid) from None
    return began, name


def discover(pid: int, options: AdoptOptions) -> Discovery:
    began, name = check_adoptable(pid)
    try:
        found = procfs.threads(pid)
        vmm, vcpus = procfs.vcpu_threads(found)
        mappings = procfs.guest_mappings(pid)
        layout = qmp.read_layout(options.qmp) if options.qmp else None
        if layout is not None:
            return _from_qmp(pid, began, name, layout, mappings)
        if not vcpus:
            raise errors.InvalidArgument(
                f"process {pid} ({name}) has a KVM VM but no thread named as a vCPU "
                "(QEMU 'CPU n/KVM' needs -name ...,debug-threads=on; cloud-hypervisor 'vcpuN', "
                "Firecracker 'fc_vcpu N'): give its QMP socket (option qmp)", pid=pid)
        return _from_options(pid, began, name, vmm, vcpus, mappings, options)
    except ProcessLookupError:
        raise errors.InvalidArgument(f"process {pid} exited during adoption", pid=pid) from None


def _from_options(pid: int, began: int, name: str, vmm: str, vcpus: dict[int, int],  # noqa: PLR0917
                  mappings: list[procfs.Mapping], options: AdoptOptions) -> Discovery:
    n = len(vcpus)
    vcpu_nodes = dict.fromkeys(vcpus, 0)
    if options.vcpu_nodes is not None:
        if len(options.vcpu_nodes) != n:
            raise errors.InvalidArgument(f"vcpu_nodes has {len(options.vcpu_nodes)} entries, the process "
                                         f"has {n} vCPUs", vcpus=n)
        vcpu_nodes = dict(zip(sorted(vcpus), options.vcpu_nodes, strict=True))
    if not mappings and vmm == "qemu":
        ram = qemu_ram_size(procfs.cmdline(pid))
        anonymous = procfs.anonymous_mappings(pid, ram) if ram else []
        if len(anonymous) == 1:  # -m without a memory backend: QEMU's pc.ram, anonymous memory
            mappings = [procfs.Mapping(anonymous[0].start, anonymous[0].end, 0, "pc.ram")]
    mem_nodes = list(options.memory_nodes) if options.memory_nodes is not None else [0] * len(mappings)
    if len(mem_nodes) != len(mappings):
        raise errors.InvalidArgument(f"memory_nodes has {len(mem_nodes)} entries, the process has "
                                     f"{len(mappings)} guest memory mappings", mappings=len(mappings))
    regions = tuple(Region(m.start, m.size, g, m.path) for m, g in zip(mappings, mem_nodes, strict=True))
    nodes = max([*vcpu_nodes.values(), *mem_nodes, 0]) + 1
    source = "options" if options.vcpu_nodes is not None or options.memory_nodes is not None else "procfs"
    return Discovery(pid, began, vmm, name, vcpus, vcpu_nodes, nodes, regions, source)


def _from_qmp(pid: int, began: int, name: str, layout: qmp.QmpLayout,
              mappings: list[procfs.Mapping]) -> Discovery:
    vcpus = {c.index: c.tid for c in layout.vcpus}
    tids = {t.tid for t in procfs.threads(pid)}
    if not set(vcpus.values()) <= tids:
        raise errors.InvalidArgument(f"the QMP socket's QEMU is not process {pid}: its vCPU threads "
                                     f"{sorted(vcpus.values())} are not this process's", pid=pid)
    by_inode = {m.inode: m for m in mappings}
    by_path = {m.path: m for m in mappings}
    memfds = [ino for _fd, ino in procfs.memfd_fds(pid) if ino in by_inode]
    memfd_devs = [d for d in layout.memdevs if d.mem_path is None and d.share and d.ram_offset is not None]
    regions = []
    for d in layout.memdevs:
        guest_node = d.guest_node
        if guest_node is None and d.id == "pc.ram" and len(layout.memdevs) == 1:
            guest_node = 0  # plain -m: one backend, the whole guest (no -numa node names it)
        if guest_node is None:
            continue
        if d.mem_path is not None:
            m = by_path.get(d.mem_path)
        elif not d.share:  # memory-backend-ram: anonymous memory of its size
            anonymous = procfs.anonymous_mappings(pid, d.size)
            m = anonymous[0] if len(anonymous) == 1 else None
        elif len(memfds) == len(memfd_devs):  # RAM block order = memfd creation order (qmp.py)
            m = by_inode[memfds[memfd_devs.index(d)]]
        else:
            m = None
        if m is not None and m.size == d.size:
            regions.append(Region(m.start, m.size, guest_node, d.id))
    nodes = max([c.node for c in layout.vcpus] + [r.guest_node for r in regions] + [0]) + 1
    host_nodes = {d.guest_node: d.host_nodes for d in layout.memdevs if d.guest_node is not None}
    return Discovery(pid, began, "qemu", name, vcpus, {c.index: c.node for c in layout.vcpus}, nodes,
                     tuple(sorted(regions, key=lambda r: r.guest_node)), "qmp", layout.version, host_nodes)


_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def default_name(found: Discovery) -> str:
    """QEMU's own -name (``-name guest=t,...`` or ``-name t,...``), else COMM-PID."""
    try:
        args = procfs.cmdline(found.pid)
    except ProcessLookupError:
        args = []
    for flag, value in itertools.pairwise(args):
        if flag in ("-name", "--name"):
            first = value.split(",")[0]
            name = first.removeprefix("guest=")
            if name:
                return _NAME_CHARS.sub("_", name)[:64].lstrip(".") or f"pid-{found.pid}"
    return _NAME_CHARS.sub("_", f"{found.comm}-{found.pid}")[:64].lstrip(".")


_SIZE = re.compile(r"(\d+)([KMGT]?)B?", re.IGNORECASE)


def qemu_ram_size(args: list[str]) -> int:
    """Bytes of QEMU's ``-m`` (``256``, ``1G``, ``size=512M,...``; the unit is MiB by default); 0 if none."""
    for flag, value in itertools.pairwise(args):
        if flag in ("-m", "--m"):
            for part in value.split(","):
                m = _SIZE.fullmatch(part.removeprefix("size="))
                if m:
                    shift = {"": 20, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]
                    return int(m.group(1)) << shift
    return 0
