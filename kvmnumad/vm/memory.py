"""A VM's guest memory: the boot slot, the NUMA regions, their checks and dirty log.

Every region is checked against the slot table and the host before its first
kernel object is made, and a failure after that releases what was made, so a
refused add leaves the VM exactly as it was.  Not locked on its own: the Vm
that owns it serializes every call under its lock.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass

from kvmnumad import cpulist, errors
from kvmnumad.kvm.vm import VmFd
from kvmnumad.libc import PAGE_SIZE
from kvmnumad.model import MemoryRegionInfo
from kvmnumad.numa.memory import MemPolicy, pages_per_node
from kvmnumad.numa.topology import HostTopology
from kvmnumad.vm.definition import RegionDef
from kvmnumad.vm.layout import BOOT_GPA, BOOT_SIZE, BOOT_SLOT, ENTRY, GUEST_ADDR_LIMIT
from kvmnumad.vm.region import GuestRegion

_OUT_OF_MEMORY = frozenset({errno.ENOMEM, errno.ENOSPC})
_OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE})


@dataclass
class Region:
    slot: int
    gpa: int
    guest_node: int
    host_nodes: frozenset[int]
    policy: MemPolicy
    mem: GuestRegion
    # Pages dirtied since the slot was made, summed over every read of its
    # log: KVM_GET_DIRTY_LOG clears the log it returns, so a count "since the
    # previous read" would belong to whoever read last (issue 11).
    dirtied: int = 0

    @property
    def size(self) -> int:
        return self.mem.size

    @property
    def hva(self) -> int:
        return self.mem.hva

    @property
    def end(self) -> int:
        return self.gpa + self.mem.size


def resource_error(e: OSError, what: str) -> errors.KvmnumaError | None:
    """The typed error for a kernel refusal that is about resources, not
    about the request (None: not a resource error, let it through)."""
    if e.errno in _OUT_OF_MEMORY:
        return errors.InsufficientMemory(f"{what}: {e.strerror}", errno=e.errno)
    if e.errno in _OUT_OF_FDS or e.errno == errno.EAGAIN:
        return errors.ResourceExhausted(f"{what}: {e.strerror}", errno=e.errno)
    return None


class GuestMemory:
    """The memory of one VM (see the module docstring)."""

    def __init__(self, name: str, vmfd: VmFd, payload: bytes, max_slots: int,
                 adopt: MutableMapping[int, int] | None = None) -> None:
        """``adopt``: slot -> memfd of an earlier process (a handover); each
        slot made takes its fd out of the mapping and owns it, whatever is
        left is still the caller's."""
        self._name = name
        self._vm = vmfd
        self._max_slots = max_slots
        self._adopt: MutableMapping[int, int] = adopt if adopt is not None else {}
        self.regions: list[Region] = []
        boot_fd = self._adopt.pop(BOOT_SLOT, None)
        try:
            if boot_fd is not None:
                self._boot = GuestRegion.adopt(boot_fd, BOOT_SIZE)
            else:
                self._boot = GuestRegion(f"kvmnumad-{name}-boot", BOOT_SIZE)
        except OSError as e:
            raise resource_error(e, f"boot memory of VM {name!r}") or e from e
        try:
            if boot_fd is None:  # handed over: the guest's own bytes, code included, stay as they were
                self._boot.write(ENTRY, payload)
            vmfd.set_user_memory_region(BOOT_SLOT, BOOT_GPA, BOOT_SIZE, self._boot.hva, 0)
        except BaseException:
            self._boot.close()
            raise

    @property
    def total_bytes(self) -> int:
        return sum(r.size for r in self.regions)

    def host_nodes(self) -> set[int]:
        return set().union(*(r.host_nodes for r in self.regions))

    def of_guest_node(self, node: int) -> list[Region]:
        return [r for r in self.regions if r.guest_node == node]

    def check(self, size: int, gpa: int, host_nodes: frozenset[int], policy: MemPolicy,
              topo: HostTopology) -> None:
        """Everything add() would refuse, before anything is made."""
        if size <= 0 or size % PAGE_SIZE:
            raise errors.InvalidArgument(f"size {size} must be a non-zero multiple of {PAGE_SIZE}", size=size)
        if gpa < 0 or gpa % PAGE_SIZE:
            raise errors.InvalidArgument(f"guest-physical address {gpa:#x} must be {PAGE_SIZE}-aligned",
                                         gpa=gpa)
        end = gpa + size
        if gpa < BOOT_GPA + BOOT_SIZE:
            raise errors.Overlap(
                f"[{gpa:#x}, {end:#x}) overlaps the boot slot [{BOOT_GPA:#x}, {BOOT_SIZE:#x})",
                gpa=gpa, slot=BOOT_SLOT)
        for r in self.regions:
            if gpa < r.end and r.gpa < end:
                raise errors.Overlap(f"[{gpa:#x}, {end:#x}) overlaps slot {r.slot} [{r.gpa:#x}, {r.end:#x})",
                                     gpa=gpa, slot=r.slot)
        if len(self.regions) + 2 > self._max_slots:
            raise errors.InsufficientMemory(f"KVM memory slot limit reached ({self._max_slots} slots)",
                                            slots=self._max_slots)
        for h in host_nodes:
            topo.node(h)
        free = sum(topo.nodes[h].mem_free for h in host_nodes)
        if policy == MemPolicy.BIND and size > free:
            raise errors.InsufficientMemory(
                f"{size} bytes do not fit host node(s) {cpulist.describe(host_nodes)}: {free} bytes free",
                size=size, free=free)

    def add(self, guest_node: int, size: int, gpa: int, *, policy: MemPolicy, host_nodes: frozenset[int],
            topo: HostTopology, prealloc: bool = False) -> Region:
        self.check(size, gpa, host_nodes, policy, topo)
        slot = self._next_slot()
        what = f"{size} bytes on host node(s) {cpulist.describe(host_nodes)}"
        adopted = self._adopt.pop(slot, None)
        try:
            if adopted is not None:
                mem = GuestRegion.adopt(adopted, size)
            else:
                mem = GuestRegion(f"kvmnumad-{self._name}-node{guest_node}-slot{slot}", size)
        except OSError as e:
            raise resource_error(e, what) or e from e
        try:
            mem.bind(policy, host_nodes)
            if prealloc:
                mem.prefault()
            self._vm.set_user_memory_region(slot, gpa, size, mem.hva)
        except OSError as e:
            mem.close()
            raise resource_error(e, what) or e from e
        except BaseException:
            mem.close()
            raise
        region = Region(slot, gpa, guest_node, frozenset(host_nodes), policy, mem)
        self.regions.append(region)
        return region

    def _next_slot(self) -> int:
        used = {r.slot for r in self.regions} | {BOOT_SLOT}
        slot = 1
        while slot in used:
            slot += 1
        return slot

    def move(self, regions: Iterable[Region], host_node: int) -> list[tuple[int, int]]:
        """Move ``regions`` to ``host_node`` live (mbind MPOL_MF_MOVE), all or
        none: what already moved goes back when one fails.  Returns (slot,
        pages in the slot) per region; counting the resident pages first
        would cost a move_pages query as long as the move itself."""
        todo = list(regions)
        done: list[Region] = []
        try:
            for r in todo:
                r.mem.bind(r.policy, {host_node}, move=True)
                done.append(r)
        except OSError as e:
            for r in done:
                r.mem.bind(r.policy, r.host_nodes, move=True)
            raise errors.InsufficientMemory(f"moving memory to host node {host_node}: {e.strerror}",
                                            node=host_node) from e
        for r in todo:
            r.host_nodes = frozenset({host_node})
        return [(r.slot, r.size // PAGE_SIZE) for r in todo]

    def payload_range(self, guest_node: int | None) -> tuple[int, int]:
        """The range the built-in payload of a vCPU touches: its guest node's
        region (the first region without guest NUMA), below 4 GiB."""
        if guest_node is None:
            region = self.regions[0] if self.regions else None
        else:
            region = next((r for r in self.regions if r.guest_node == guest_node), None)
        if region is None or region.gpa >= GUEST_ADDR_LIMIT:
            return 0, 0
        return region.gpa, min(region.size, GUEST_ADDR_LIMIT - region.gpa)

    def definitions(self) -> tuple[RegionDef, ...]:
        return tuple(RegionDef(r.guest_node, r.size, r.gpa, r.policy, tuple(sorted(r.host_nodes)))
                     for r in self.regions)

    def info(self) -> list[MemoryRegionInfo]:
        return [MemoryRegionInfo(r.slot, r.gpa, r.size, r.guest_node, min(r.host_nodes), r.mem.hva)
                for r in self.regions]

    def resident_pages(self) -> dict[int, int]:
        """Resident guest pages by host node, from the kernel (move_pages query)."""
        pages: dict[int, int] = {}
        for r in self.regions:
            for node, n in pages_per_node(r.mem.hva, r.size).items():
                pages[node] = pages.get(node, 0) + n
        return pages

    def dirty_pages(self, slot: int | None = None) -> int:
        """Pages dirtied since the slot was made (all slots: None), a running
        total that never goes down: each read adds what the kernel's log
        holds to the slot's total, and no reader consumes another's count."""
        regions = self.regions if slot is None else [r for r in self.regions if r.slot == slot]
        if slot is not None and not regions:
            raise errors.InvalidArgument(f"VM {self._name!r} has no memory slot {slot}", slot=slot)
        for r in regions:
            r.dirtied += self._vm.count_dirty(r.slot, r.size)
        return sum(r.dirtied for r in regions)

    def memfds(self) -> list[tuple[int, int]]:
        """(slot, memfd) of every slot, the boot slot first: what a handover
        keeps so that the guest's memory outlives this process."""
        return [(BOOT_SLOT, self._boot.fd), *((r.slot, r.mem.fd) for r in self.regions)]

    def close(self) -> None:
        for r in self.regions:
            r.mem.close()
        self.regions.clear()
        self._boot.close()
