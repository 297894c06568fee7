"""The quota file's format (kvmnumad/quotas.py) and the Manager's counting."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmnumad import errors
from kvmnumad.manager import Manager
from kvmnumad.model import CreateOptions
from kvmnumad.quotas import BUILTIN_DEFAULT, UNLIMITED, Quota, QuotaError, Usage, load, parse


def test_sections_inherit_from_default_and_root_is_unlimited() -> None:
    q = parse("[default]\nvms = 2\nmemory = 1G  # one GiB\n\n[uid:1000]\nvcpus = unlimited\n"
              "[user:root]\nvms = 3\n")
    assert q.default == Quota(vms=2, vcpus=16, memory=1 << 30, regions=16)
    assert q.for_uid(1000) == Quota(vms=2, vcpus=None, memory=1 << 30, regions=16)
    assert q.for_uid(0) == Quota(vms=3)  # root's own section starts from unlimited
    assert q.for_uid(4242) == q.default
    assert parse("").for_uid(0) == UNLIMITED and parse("").default == BUILTIN_DEFAULT


@pytest.mark.parametrize(("text", "match"), [
    ("[default]\nvms = many\n", r"\[default\] vms: 'many' is not a count"),
    ("[default]\nmemory = 4X\n", r"memory: '4X' is not a size"),
    ("[default]\ncpus = 1\n", "unknown key 'cpus'"),
    ("[group:kvm]\nvms = 1\n", r"unknown section \[group:kvm\]"),
    ("vms = 1\n", "no section headers"),
])
def test_mistakes_are_named(text: str, match: str) -> None:
    with pytest.raises(QuotaError, match=match):
        parse(text)


def test_no_file_means_the_built_in_defaults(tmp_path: Path) -> None:
    assert load(tmp_path).default == BUILTIN_DEFAULT


def test_the_first_limit_passed_is_named() -> None:
    q = Quota(vms=4, vcpus=16, memory=1 << 30, regions=16)
    assert q.first_exceeded(Usage(1, 15, 0, 0), Usage(1, 2, 0, 0)) == ("vcpus", 16, 15)
    assert q.first_exceeded(Usage(1, 1, 0, 0), Usage(1, 1, 1 << 30, 1)) is None


def test_a_creation_past_the_quota_makes_nothing(manager: Manager) -> None:
    manager.set_quotas(parse("[uid:1000]\nvms = 1\nmemory = 8M\n"))
    manager.create_vm("a", 1, 4 << 20, CreateOptions(), owner=1000)
    with pytest.raises(errors.QuotaExceeded) as e:
        manager.create_vm("b", 1, 0, CreateOptions(), owner=1000)
    assert e.value.values == {"limit": "vms", "maximum": 1, "used": 1, "requested": 1, "uid": 1000}
    # memory added later counts too (SetupNumaMemory/add_memory of the owner's VM)
    vm = manager.get_vm("a")
    with pytest.raises(errors.QuotaExceeded, match="memory quota: 4194304 bytes used of 8388608"):
        vm.add_memory(0, 8 << 20, 0x10000000)
    vm.add_memory(0, 4 << 20, 0x10000000)
    assert [v.name for v in manager.list_vms()] == ["a"] and manager.usage(1000) == Usage(1, 1, 8 << 20, 2)
    manager.create_vm("rootvm", 64, 0, CreateOptions(), owner=0)  # root: unlimited
