"""Auto-adopt (issue 15 item 5): the real daemon, told by adopt.conf to adopt
qemu-system-x86_64, adopts a QEMU started after it, from the kernel's proc
connector exec event; a process of another executable is left alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmnumad.adopt import autoadopt
from kvmnumad.model import Policy
from tests.busfixtures import VM_IFACE, BusClient, DaemonProcess, daemon_process, start_bus_daemon
from tests.observe import taskset_affinity
from tests.test_adopt import qemu, running, vcpu_tids
from tests.waiting import wait_until

pytest_plugins = ["tests.busfixtures"]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    config = tmp_path / "etc"
    config.mkdir()
    (config / "adopt.conf").write_text("# test\nexe qemu-system-x86_64\npolicy local-first\n")
    with start_bus_daemon() as bus, daemon_process("kvmnumad", tmp_path, "--bus", bus.address,
                                                   "--config-dir", str(config)) as d:
        yield d


def test_a_configured_executable_is_adopted_when_it_appears(daemon: DaemonProcess) -> None:
    assert "auto-adopt on" in daemon.log.read_text()
    c = BusClient(daemon.address)
    try:
        with running(["sleep", "30"]) as sleeper, qemu("auto", smp=2) as q:
            rows = wait_until(lambda: c.manager("ListVMs")[0], "the QEMU adopted", timeout=20)
            assert rows == [["auto", "running", "/org/kvmnuma1/vm/auto"]]
            # the core has it; GetVM waits for its object to be exported (the adoption was no bus call)
            (path,) = c.manager("GetVM", "s", "auto")
            got = c.get_all(path, VM_IFACE)
            assert (got["Adopted"], got["ProcessId"], got["Policy"]) == (True, q.pid, "local-first")
            # local-first: every vCPU thread on its guest node's host CPUs (one node here: all of them)
            for tid in vcpu_tids(q.pid).values():
                assert taskset_affinity(tid) == set(dict(map(tuple, got["DeclaredVcpuAffinity"]))[0])
            assert sleeper.poll() is None
        wait_until(lambda: c.manager("ListVMs")[0] == [], "the adopted VM gone with its process")
    finally:
        c.close()


def test_config_parses_rules_and_refuses_the_rest() -> None:
    config = autoadopt.parse("exe /usr/bin/qemu-system-x86_64\ncgroup /machine.slice/\npolicy interleave\n",
                             "t")
    assert config.executables == {"/usr/bin/qemu-system-x86_64"} and config.cgroups == ("/machine.slice",)
    assert config.policy == Policy.INTERLEAVE and config.enabled
    for bad in ("exe\n", "cgroup relative\n", "policy fastest\n", "scan /proc\n"):
        with pytest.raises(ValueError, match="t:1"):
            autoadopt.parse(bad, "t")
    assert not autoadopt.parse("# nothing\n", "t").enabled
