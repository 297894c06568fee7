"""Memory policy and page placement for a range of this process's address space.

Guest memory is a memfd mapped MAP_SHARED (shmem, not anonymous memory): every
function here is exercised on exactly that in the tests.  The policy set by
``mbind`` on a shmem mapping is the file's shared policy, so it also governs
pages faulted later (by KVM on behalf of a vCPU).

All calls go through ctypes into libnuma's syscall wrappers (GIL released) and
block for as long as the kernel migrates: never call them on an event loop.
Errors are ``OSError`` with the kernel's errno.

Example::

    fd = os.memfd_create("guest0")           # + ftruncate + mmap(MAP_SHARED) at addr
    mbind(addr, size, MemPolicy.BIND, {1}, move=True, strict=True)
    prefault(addr, size)
    assert pages_per_node(addr, size) == {1: size // 4096}
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
from collections.abc import Iterable
from ctypes import c_int, c_void_p

from kvmnumad import libc
from kvmnumad.libc import MADV_POPULATE_WRITE, PAGE_SIZE
from kvmnumad.numa import libnuma

CHUNK_PAGES = 65536  # pages per move_pages call: bounds the ctypes arrays to ~1 MiB


class MemPolicy(enum.IntEnum):
    """MPOL_* modes of <linux/mempolicy.h>."""

    DEFAULT = 0
    PREFERRED = 1
    BIND = 2
    INTERLEAVE = 3
    LOCAL = 4
    PREFERRED_MANY = 5
    WEIGHTED_INTERLEAVE = 6


MPOL_MF_STRICT = 1 << 0  # fail with EIO if existing pages do not follow the policy
MPOL_MF_MOVE = 1 << 1  # migrate existing pages mapped only by this process
MPOL_MF_MOVE_ALL = 1 << 2  # migrate shared pages too (CAP_SYS_NICE)

MPOL_F_ADDR = 1 << 1  # get_mempolicy: the policy governing an address, not the thread's
_MODE_FLAGS = (1 << 15) | (1 << 14) | (1 << 13)  # MPOL_F_STATIC/RELATIVE_NODES, NUMA_BALANCING

NODEMASK_BITS = 1024  # MAX_NUMNODES of distribution kernels (CONFIG_NODES_SHIFT=10)


def _nodemask(nodes: Iterable[int]) -> tuple[libnuma.ULongArray, int]:
    """A nodemask holding ``nodes`` and the number of bits it covers."""
    ids = sorted(set(nodes))
    for n in ids:
        if n < 0 or n >= NODEMASK_BITS:
            raise OSError(errno.EINVAL, f"NUMA node {n} out of range 0..{NODEMASK_BITS - 1}")
    words = [0] * (NODEMASK_BITS // 64)
    for n in ids:
        words[n // 64] |= 1 << (n % 64)
    return libnuma.ulong_array(words), NODEMASK_BITS


def _nodes_of(mask: libnuma.ULongArray) -> frozenset[int]:
    return frozenset(w * 64 + b for w, word in enumerate(mask) for b in range(64) if word >> b & 1)


def mbind(
    addr: int,
    length: int,
    policy: MemPolicy,
    nodes: Iterable[int],
    *,
    move: bool = False,
    strict: bool = False,
) -> None:
    """Set the memory policy of [addr, addr+length) (mbind(2)).

    ``move`` migrates pages already present so that they follow the policy;
    ``strict`` (with BIND) makes the call fail with EIO when some cannot.
    A node that is not online gives EINVAL.
    """
    mask, bits = _nodemask(nodes)
    flags = (MPOL_MF_MOVE if move else 0) | (MPOL_MF_STRICT if strict else 0)
    # The kernel's get_nodes() starts with --maxnode, so it would ignore the last bit of the
    # mask: pass one more than the bits we mean (cloud-hypervisor's memory_manager.rs does
    # the same, "Linux is kind of buggy in the way it interprets maxnode").
    libnuma.sys_mbind(addr, length, int(policy), mask, maxnode=bits + 1, flags=flags)


def get_mempolicy(addr: int) -> tuple[MemPolicy, frozenset[int]]:
    """The policy governing ``addr`` and its node set (get_mempolicy(2) with MPOL_F_ADDR)."""
    mask, bits = _nodemask(())
    mode = libnuma.sys_get_mempolicy(mask, bits + 1, addr, MPOL_F_ADDR)  # same maxnode quirk as mbind
    return MemPolicy(mode & ~_MODE_FLAGS), _nodes_of(mask)


def _page_addresses(addr: int, length: int, page_size: int) -> Iterable[list[int]]:
    """Page addresses of the range in chunks of CHUNK_PAGES."""
    if addr % page_size:
        raise OSError(errno.EINVAL, f"address {addr:#x} is not aligned to {page_size}")
    end = addr + length
    for start in range(addr, end, CHUNK_PAGES * page_size):
        yield list(range(start, min(end, start + CHUNK_PAGES * page_size), page_size))


def _query(pages: list[int], pid: int = 0) -> list[int]:
    """move_pages with nodes=NULL: the node of each page, or -errno (-ENOENT: not present)."""
    status = (c_int * len(pages))()
    libnuma.sys_move_pages((c_void_p * len(pages))(*pages), None, status, pid=pid)
    return list(status)


def pages_per_node(addr: int, length: int, page_size: int = PAGE_SIZE, *, pid: int = 0) -> dict[int, int]:
    """Resident pages of the range by node; pages never touched are not counted.
    ``pid``: another process's range (0: ours)."""
    counts: dict[int, int] = {}
    for pages in _page_addresses(addr, length, page_size):
        for node in _query(pages, pid):
            if node >= 0:
                counts[node] = counts.get(node, 0) + 1
    return counts


def pages_off_node(addr: int, length: int, node: int, page_size: int = PAGE_SIZE, *,
                   pid: int = 0) -> tuple[int, int]:
    """(resident pages of the range, those of them not on ``node``): what a move there has to do."""
    resident = off = 0
    for pages in _page_addresses(addr, length, page_size):
        for where in _query(pages, pid):
            if where >= 0:
                resident += 1
                off += where != node
    return resident, off


def move_range_to_node(addr: int, length: int, node: int, page_size: int = PAGE_SIZE, *,
                       pid: int = 0) -> tuple[int, dict[int, int]]:
    """Ask move_pages(2) to put every page of the range on ``node``, with no
    query first (the caller counted before: pages_off_node).  Returns the
    resident pages on ``node`` afterwards, those there before included, and
    the pages that did not move by errno; absent pages (ENOENT) are neither,
    and stay absent (move_pages allocates nothing).  Whole-call failures as
    move_to_node."""
    on_node = 0
    failed: dict[int, int] = {}
    for pages in _page_addresses(addr, length, page_size):
        on_node += _move(pages, node, pid, failed)
    return on_node, failed


MOVE_ATTEMPTS = 3  # move_pages calls per page that stays behind for the moment (a running guest's)
_TRANSIENT = frozenset({errno.EBUSY, errno.EAGAIN})
_UNSET = -(1 << 30)  # a status the kernel never stores (node ids and -errno are small)


def _move(pages: list[int], node: int, pid: int, failed: dict[int, int]) -> int:
    """move_pages(2) of ``pages`` to ``node``: returns the pages now on ``node``;
    the others that did not move are counted into ``failed`` by errno (an
    absent page, ENOENT, is neither).

    A page a running vCPU holds for an instant (KVM faulting it in) cannot be
    migrated then.  The kernel retries such pages itself, then gives up on
    them and returns how many it did not move; in that case it does not
    store the statuses of the call's pages at all, so a zeroed array would
    read as "on node 0".  Hence a sentinel, a query of where the pages really
    are whenever the call says some did not move, and up to MOVE_ATTEMPTS
    calls for the pages still elsewhere or busy; the rest count as EAGAIN."""
    on_node = 0
    todo = pages
    for attempt in range(MOVE_ATTEMPTS):
        status = (c_int * len(todo))(*([_UNSET] * len(todo)))
        targets = (c_int * len(todo))(*([node] * len(todo)))
        left = libnuma.sys_move_pages((c_void_p * len(todo))(*todo), targets, status, pid=pid)
        where = _query(todo, pid) if left > 0 or _UNSET in status else list(status)
        last = attempt == MOVE_ATTEMPTS - 1
        again: list[int] = []
        for page, w in zip(todo, where, strict=True):
            if w == node:
                on_node += 1
            elif w == -errno.ENOENT:
                continue
            elif (w >= 0 or -w in _TRANSIENT) and not last:
                again.append(page)
            else:
                e = errno.EAGAIN if w >= 0 else -w
                failed[e] = failed.get(e, 0) + 1
        if not again:
            break
        todo = again
    return on_node


def move_to_node(addr: int, length: int, node: int, page_size: int = PAGE_SIZE, *,
                 pid: int = 0) -> tuple[int, dict[int, int]]:
    """Move the resident pages of the range that are not on ``node`` there
    (move_pages(2)), leaving the range's policy alone.  Returns the pages
    moved and the pages that did not, counted by errno (EBUSY, ENOMEM...);
    a page gone meanwhile (ENOENT) is neither.

    The whole call fails with OSError (ENODEV, EACCES, EINVAL) when ``node``
    cannot take pages at all.
    """
    moved = 0
    failed: dict[int, int] = {}
    for pages in _page_addresses(addr, length, page_size):
        todo = [p for p, where in zip(pages, _query(pages, pid), strict=True) if where >= 0 and where != node]
        if todo:
            moved += _move(todo, node, pid, failed)
    return moved, failed


def migrate_range(addr: int, length: int, node: int, page_size: int = PAGE_SIZE, *, pid: int = 0) -> int:
    """Move every resident page of the range to ``node`` (move_pages(2)) without
    changing the range's policy; returns the number of pages that changed node.

    The whole call fails (ENODEV, EACCES, EINVAL) when ``node`` cannot take pages;
    pages that fail one by one (EBUSY, ENOMEM) are reported after the rest moved.
    """
    moved, failed = move_to_node(addr, length, node, page_size, pid=pid)
    if failed:
        first_error = min(failed)
        raise OSError(
            first_error,
            f"migrate_range to node {node}: {sum(failed.values())} of {moved + sum(failed.values())} pages "
            f"did not move ({os.strerror(first_error)}), {moved} moved",
        )
    return moved


def prefault(addr: int, length: int) -> None:
    """Allocate every page of the range now, under its policy, so that a VM's
    memory is on its node before the guest runs (and fails here, not in KVM_RUN).

    MADV_POPULATE_WRITE needs Linux 5.14; older kernels get one written byte per
    page (each byte rewritten with its own value: call before the guest runs).
    """
    if addr % PAGE_SIZE:
        raise OSError(errno.EINVAL, f"prefault: address {addr:#x} is not page-aligned")
    try:
        libc.madvise(addr, length, MADV_POPULATE_WRITE)
        return
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise OSError(e.errno, f"madvise(MADV_POPULATE_WRITE, {addr:#x}, {length}): {e.strerror}") from e
    # The buffer is a view of memory the caller keeps mapped; it copies nothing.
    view = (ctypes.c_char * length).from_address(addr)
    for off in range(0, length, PAGE_SIZE):
        view[off] = view[off]
