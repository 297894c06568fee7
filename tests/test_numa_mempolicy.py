"""mbind / get_mempolicy / pages_per_node / migrate_range / prefault on a
MAP_SHARED memfd mapping (what guest memory is), observed through
/proc/self/numa_maps.  One node here: movement between nodes is tested in
tests/numa/test_numa_memory.py inside the multi-NUMA guest.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from kvmnumad.libc import PAGE_SIZE
from kvmnumad.numa import libnuma, memory
from kvmnumad.numa.libnuma import IntArray, PtrArray
from kvmnumad.numa.memory import MemPolicy, get_mempolicy, mbind, migrate_range, pages_per_node, prefault
from tests import observe

PAGE = os.sysconf("SC_PAGE_SIZE")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_c = ctypes
_libc.mmap.argtypes = (_c.c_void_p, _c.c_size_t, _c.c_int, _c.c_int, _c.c_int, _c.c_long)
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


@dataclass
class Region:
    addr: int
    size: int

    @property
    def pages(self) -> int:
        return self.size // PAGE

    def touch(self, pages: int) -> None:
        ctypes.memset(self.addr, 1, pages * PAGE)

    def numa_maps(self) -> observe.NumaMapsEntry:
        return observe.numa_maps_at(self.addr)


def map_memfd(size: int, name: str = "kvmnumad-test") -> Region:
    """memfd + mmap(MAP_SHARED) as guest memory is made; the fd is closed, the mapping keeps the file."""
    fd = os.memfd_create(name)
    try:
        os.ftruncate(fd, size)
        addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
    finally:
        os.close(fd)
    return Region(int(addr), size)


@pytest.fixture
def region() -> Iterator[Region]:
    r = map_memfd(16 << 20)
    yield r
    assert _libc.munmap(r.addr, r.size) == 0


def test_memfd_mapping_is_shmem(region: Region) -> None:
    region.touch(1)
    entry = region.numa_maps()
    assert entry.file is not None and entry.file.startswith("/memfd:kvmnumad-test")
    assert entry.anon == 0


def test_bind_then_prefault_puts_every_page_on_the_node(region: Region) -> None:
    assert pages_per_node(region.addr, region.size) == {}
    mbind(region.addr, region.size, MemPolicy.BIND, {0}, move=True, strict=True)
    assert get_mempolicy(region.addr) == (MemPolicy.BIND, frozenset({0}))
    prefault(region.addr, region.size)
    entry = region.numa_maps()
    assert entry.policy == "bind:0"
    assert entry.pages_per_node == {0: region.pages}
    assert pages_per_node(region.addr, region.size) == entry.pages_per_node


def test_pages_not_present_are_not_counted(region: Region) -> None:
    region.touch(10)
    assert pages_per_node(region.addr, region.size) == {0: 10} == region.numa_maps().pages_per_node


def test_counts_across_chunk_boundaries(region: Region, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small chunks (a real parameter, not a fake) so that 16 MiB spans 5 move_pages calls."""
    monkeypatch.setattr(memory, "CHUNK_PAGES", 1000)
    region.touch(2500)
    assert pages_per_node(region.addr, region.size) == {0: 2500}
    assert migrate_range(region.addr, region.size, 0) == 0  # already there: nothing changes node
    assert region.numa_maps().pages_per_node == {0: 2500}


@pytest.mark.parametrize(
    ("policy", "shown"),
    [(MemPolicy.PREFERRED, "prefer:0"), (MemPolicy.INTERLEAVE, "interleave:0"), (MemPolicy.BIND, "bind:0")],
)
def test_policies_as_numa_maps_shows_them(region: Region, policy: MemPolicy, shown: str) -> None:
    mbind(region.addr, region.size, policy, [0])
    assert region.numa_maps().policy == shown
    assert get_mempolicy(region.addr) == (policy, frozenset({0}))
    mbind(region.addr, region.size, MemPolicy.DEFAULT, [])
    assert region.numa_maps().policy == "default"
    assert get_mempolicy(region.addr) == (MemPolicy.DEFAULT, frozenset())


def test_policy_of_a_subrange(region: Region) -> None:
    half = region.size // 2
    mbind(region.addr + half, half, MemPolicy.BIND, [0])
    assert get_mempolicy(region.addr)[0] == MemPolicy.DEFAULT
    assert get_mempolicy(region.addr + half) == (MemPolicy.BIND, frozenset({0}))


def errno_of(call: object, *args: object, **kwargs: object) -> int:
    with pytest.raises(OSError) as exc:
        call(*args, **kwargs)  # type: ignore[operator]
    assert exc.value.errno is not None
    return exc.value.errno


def test_errors(region: Region) -> None:
    a, n = region.addr, region.size
    hole = PAGE  # below vm.mmap_min_addr: never mapped
    absent = max(observe.host_nodes()) + 1
    assert errno_of(mbind, a, n, MemPolicy.BIND, [absent]) == errno.EINVAL  # node not online
    assert errno_of(mbind, a, n, MemPolicy.BIND, [-1]) == errno.EINVAL
    assert errno_of(mbind, a, n, MemPolicy.BIND, [5000]) == errno.EINVAL
    assert errno_of(mbind, a, n, MemPolicy.BIND, []) == errno.EINVAL  # bind to nothing
    assert errno_of(mbind, a + 1, PAGE, MemPolicy.BIND, [0]) == errno.EINVAL  # unaligned
    assert errno_of(mbind, hole, PAGE, MemPolicy.BIND, [0]) == errno.EFAULT  # unmapped
    assert errno_of(get_mempolicy, hole) == errno.EFAULT
    region.touch(4)
    assert errno_of(migrate_range, a, n, absent) == errno.ENODEV
    assert errno_of(migrate_range, a, n, -1) in (errno.EINVAL, errno.ENODEV)
    assert errno_of(pages_per_node, a + 1, PAGE) == errno.EINVAL
    assert errno_of(prefault, a + 1, PAGE) == errno.EINVAL
    assert errno_of(prefault, hole, PAGE) in (errno.ENOMEM, errno.EFAULT)  # unmapped
    assert region.numa_maps().pages_per_node == {0: 4}  # failed calls changed nothing


def test_strict_bind_reports_pages_elsewhere(region: Region) -> None:
    """STRICT without MOVE fails with EIO when present pages break the policy; on one
    node none can, so it passes (the failing case runs in the NUMA guest)."""
    region.touch(4)
    mbind(region.addr, region.size, MemPolicy.BIND, [0], strict=True)
    assert region.numa_maps().policy == "bind:0"


def test_a_jobs_count_and_move_leave_absent_pages_absent(region: Region) -> None:
    """The two calls a migration job makes (vm/migration.py), on the one node
    there is: the count sees only resident pages, the move puts them on the
    node (there already) and allocates none of the absent ones."""
    region.touch(100)
    assert memory.pages_off_node(region.addr, region.size, 0) == (100, 0)
    assert memory.move_range_to_node(region.addr, region.size, 0) == (100, {})
    assert region.numa_maps().pages_per_node == {0: 100}  # by numa_maps: still 100, none allocated
    absent = max(observe.host_nodes()) + 1
    assert errno_of(memory.move_range_to_node, region.addr, region.size, absent) == errno.ENODEV


def test_pages_the_kernel_did_not_move_are_found_and_tried_again(region: Region,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A FAKE, said so: a page a running vCPU holds for an instant cannot be
    migrated, and then move_pages(2) returns how many it did not move and
    stores no status for the call (a zeroed array read as "on node 0": the
    4-node guest's remap test once found 1 of 4096 pages left behind, job
    done).  That cannot be made to happen on demand, nor on this one-node
    host, so the first move call here behaves so and the real kernel does the
    rest: the query finds the pages, the second call moves them."""
    region.touch(8)
    real = libnuma.sys_move_pages
    calls: list[bool] = []

    def kernel(pages: PtrArray, nodes: IntArray | None,
               status: IntArray, flags: int = 0, pid: int = 0) -> int:
        if nodes is not None:
            calls.append(True)
            if len(calls) == 1:
                return 1  # "1 page not moved", statuses not stored
        return int(real(pages, nodes, status, flags, pid))

    monkeypatch.setattr(libnuma, "sys_move_pages", kernel)
    assert memory.move_range_to_node(region.addr, region.size, 0) == (8, {})
    assert len(calls) == 1  # all 8 were on node 0 by the query: nothing to try again


def test_pages_that_stay_behind_count_as_eagain(region: Region, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FAKE, as above: a kernel that never moves one page (always "1 not
    moved", and the page reported elsewhere by the query).  It gets
    MOVE_ATTEMPTS calls, then counts as EAGAIN; the others are on the node."""
    region.touch(4)
    real = libnuma.sys_move_pages
    moves: list[int] = []

    def kernel(pages: PtrArray, nodes: IntArray | None,
               status: IntArray, flags: int = 0, pid: int = 0) -> int:
        if nodes is not None:
            moves.append(len(pages))
            return 1
        real(pages, nodes, status, flags, pid)
        status[0] = 1  # the first page: on a node that is not the target
        return 0

    monkeypatch.setattr(libnuma, "sys_move_pages", kernel)
    assert memory.move_range_to_node(region.addr, region.size, 0) == (3, {errno.EAGAIN: 1})
    assert moves[0] == region.size // PAGE_SIZE and moves[1:] == [1] * (memory.MOVE_ATTEMPTS - 1)
