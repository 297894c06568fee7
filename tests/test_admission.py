"""Admission counts what the kernel says is free now and what existing VMs
were promised (issue 12 finding 3).

Before: the planner used the free memory read once at start, so after a VM
became resident it still admitted as much as before.  Observed here with
real memory: shmem pages the test itself allocates (a fallocated memfd,
which MemFree stops counting) and a real VM whose memory is not touched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from kvmnumad import errors
from kvmnumad.libc import PAGE_SIZE
from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions, Policy
from kvmnumad.numa.topology import read_free_memory

GiB = 1 << 30
LOCAL_FIRST = CreateOptions(policy=Policy.LOCAL_FIRST)


def free_now() -> int:
    return sum(read_free_memory().values())


def pages(n: int) -> int:
    return n // PAGE_SIZE * PAGE_SIZE


@pytest.fixture
def shmem() -> Iterator[int]:
    """A memfd whose pages get allocated by the test (and freed at the end)."""
    fd = os.memfd_create("kvmnuma-test-fill")
    try:
        yield fd
    finally:
        os.close(fd)


def test_memory_taken_since_start_is_not_admitted(manager: Manager, shmem: int) -> None:
    request = pages(free_now() - 3 * GiB // 2)
    manager.plan_vm(1, request, LOCAL_FIRST)  # fits now
    os.posix_fallocate(shmem, 0, 3 * GiB)  # 3 GiB of the host's memory gone, after the Manager read it
    with pytest.raises(errors.InsufficientMemory):
        manager.plan_vm(1, request, LOCAL_FIRST)
    with pytest.raises(errors.InsufficientMemory):
        manager.create_vm("late", 1, request, LOCAL_FIRST)
    assert manager.list_vms() == []


def test_memory_promised_to_an_untouched_vm_counts(manager: Manager) -> None:
    size = pages(free_now() * 6 // 10)
    first = manager.create_vm("first", 1, size, LOCAL_FIRST)  # not started: none of it resident
    assert first.memory_bytes == size
    assert free_now() > size  # the kernel still counts it free ...
    with pytest.raises(errors.InsufficientMemory):  # ... admission does not
        manager.create_vm("second", 1, size, LOCAL_FIRST)
    assert [vm.name for vm in manager.list_vms()] == ["first"]
    manager.destroy_vm("first")
    manager.create_vm("second", 1, size, LOCAL_FIRST)  # fits once the promise is released
