"""Quotas per uid and the polkit details a rule needs, against the real daemon,
a system-like dbus-daemon and the real polkitd (issue 12 finding 3 and the
polkit-details finding).

The daemon runs as a process (``python -m kvmnumad --bus system``) with its
own ``--config-dir``; an unprivileged user calls it with gdbus (which prints
the error's name) through runuser.  Observed from outside: the reply, the
daemon's /proc/PID/fd and /proc/PID/task, ListVMs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.sysfixtures import POLKIT_RULES_DIR
from tests.waiting import wait_until

if TYPE_CHECKING:
    from tests.sysfixtures import Polkitd, SystemBus, User

pytest_plugins = ["tests.sysfixtures"]

ROOT = Path(__file__).resolve().parent.parent
QUOTA = "org.kvmnuma1.Error.QuotaExceeded"


@dataclass
class Daemon:
    proc: subprocess.Popen[str]
    log: Path
    config_dir: Path

    def output(self) -> str:
        return self.log.read_text()


@contextlib.contextmanager
def daemon(bus: SystemBus, tmp: Path, quotas: str | None) -> Iterator[Daemon]:
    config = tmp / "etc"
    config.mkdir()
    if quotas is not None:
        (config / "quotas.conf").write_text(quotas)
    log = tmp / "daemon.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvmnumad", "--bus", "system", "--state-dir", str(tmp / "state"),
             "--config-dir", str(config), "--log-target", "stderr"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True, env=bus.env(),
        )
    d = Daemon(proc, log, config)
    try:
        wait_until(lambda: bus.has_owner("org.kvmnuma1") or proc.poll() is not None,
                   "kvmnumad on the bus", timeout=20)
        assert proc.poll() is None, d.output()
        yield d
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def gdbus_create(bus: SystemBus, user: User, name: str, vcpus: int,
                 memory: int = 0) -> subprocess.CompletedProcess[str]:
    """CreateVM as ``user`` through gdbus (it types the arguments from our introspection)."""
    return user.run("gdbus", "call", "--system", "--dest", "org.kvmnuma1", "--object-path", "/org/kvmnuma1",
                    "--method", "org.kvmnuma1.Manager.CreateVM", name, str(vcpus), str(memory), "{}",
                    env={"DBUS_SYSTEM_BUS_ADDRESS": bus.address})


def vm_names(bus: SystemBus) -> list[str]:
    out = bus.busctl("--json=short", "call", "org.kvmnuma1", "/org/kvmnuma1", "org.kvmnuma1.Manager",
                     "ListVMs", check=True)
    return sorted(row[0] for row in json.loads(out.stdout)["data"][0])


def resources(pid: int) -> tuple[int, int]:
    """The daemon's fds and threads, less the /proc and /sys files its sampler keeps
    open: those come with its timer (a vCPU's schedstat, opened at the first take
    after the VM is made), call or no call."""
    fds = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        fds += not target.startswith(("/proc/", "/sys/"))
    return fds, len(os.listdir(f"/proc/{pid}/task"))


@pytest.fixture
def manage_granted(polkitd: Polkitd, unpriv_user: User) -> Iterator[None]:
    with polkitd.grant(unpriv_user.group, "org.kvmnuma1.manage"):
        yield


def test_a_user_at_its_vm_quota_is_refused_and_a_reload_raises_it(
        system_bus: SystemBus, unpriv_user: User, manage_granted: None, tmp_path: Path) -> None:
    quotas = f"[default]\nvms = 4\n\n[user:{unpriv_user.name}]\nvms = 1\nvcpus = 8\n"
    with daemon(system_bus, tmp_path, quotas) as d:
        first = gdbus_create(system_bus, unpriv_user, "q1", 1)
        assert first.returncode == 0, first.stderr
        before = resources(d.proc.pid)
        second = gdbus_create(system_bus, unpriv_user, "q2", 1)
        assert second.returncode != 0
        assert f"GDBus.Error:{QUOTA}" in second.stderr, second.stderr
        assert "vms quota: 1 used of 1" in second.stderr, second.stderr
        assert f"uid {unpriv_user.uid}" in second.stderr
        assert vm_names(system_bus) == ["q1"]  # nothing made
        assert resources(d.proc.pid) == before  # no fd, no thread left behind

        (d.config_dir / "quotas.conf").write_text(quotas.replace("vms = 1", "vms = 2"))
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: d.output().count("quotas from") >= 2, "the daemon to reload its quotas",
                   timeout=10)
        again = gdbus_create(system_bus, unpriv_user, "q2", 1)
        assert again.returncode == 0, again.stderr
        third = gdbus_create(system_bus, unpriv_user, "q3", 1)
        assert "vms quota: 2 used of 2" in third.stderr, third.stderr

        # A broken file on reload keeps the quotas in force: a typo lifts no limit
        (d.config_dir / "quotas.conf").write_text("[user:x\nvms = lots\n")
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "quotas not changed" in d.output(), "the daemon to refuse the bad file",
                   timeout=10)
        assert "vms quota: 2 used of 2" in gdbus_create(system_bus, unpriv_user, "q3", 1).stderr
        assert d.proc.poll() is None
    assert d.proc.returncode == 0, d.output()


def test_built_in_defaults_limit_vcpus_and_memory(system_bus: SystemBus, unpriv_user: User,
                                                  manage_granted: None, tmp_path: Path) -> None:
    """No file: 4 VMs, 16 vCPUs, 4 GiB, 16 regions per non-root uid; root unlimited."""
    with daemon(system_bus, tmp_path, None):
        too_many = gdbus_create(system_bus, unpriv_user, "wide", 17)
        assert QUOTA in too_many.stderr and "vcpus quota: 0 used of 16" in too_many.stderr, too_many.stderr
        too_big = gdbus_create(system_bus, unpriv_user, "big", 1, 5 << 30)
        assert QUOTA in too_big.stderr and "memory quota" in too_big.stderr, too_big.stderr
        assert vm_names(system_bus) == []
        root = system_bus.busctl("call", "org.kvmnuma1", "/org/kvmnuma1", "org.kvmnuma1.Manager",
                                 "CreateVM", "suta{sv}", "rootvm", "17", "0", "0")
        assert root.returncode == 0, root.stderr


def test_a_polkit_rule_can_limit_vcpus(system_bus: SystemBus, polkitd: Polkitd, unpriv_user: User,
                                       tmp_path: Path) -> None:
    """polkit details carry vcpus (and owner, memory_bytes, vm, verb): a rule
    allowing CreateVM only for vcpus <= 2 lets 2 through and denies 4."""
    rule = POLKIT_RULES_DIR / f"61-kvmnuma-test-vcpus-{unpriv_user.name}.rules"
    rule.write_text(
        "polkit.addRule(function(action, subject) {\n"
        f"    if (action.id == 'org.kvmnuma1.manage' && subject.user == '{unpriv_user.name}' &&\n"
        "        action.lookup('verb') == 'create' &&\n"
        f"        action.lookup('owner') == '{unpriv_user.uid}' && action.lookup('vm') != undefined &&\n"
        "        action.lookup('memory_bytes') == '0')\n"
        "        return parseInt(action.lookup('vcpus')) <= 2 ? polkit.Result.YES : polkit.Result.NO;\n"
        "});\n")
    shutil.chown(rule, "polkitd", "root")
    rule.chmod(0o644)
    try:
        with daemon(system_bus, tmp_path, None):
            wait_until(lambda: gdbus_create(system_bus, unpriv_user, "two", 2).returncode == 0,
                       "polkitd to load the rule and allow 2 vCPUs", timeout=15, interval=0.3)
            four = gdbus_create(system_bus, unpriv_user, "four", 4)
            assert "org.freedesktop.DBus.Error.AccessDenied" in four.stderr, four.stderr
            assert "vcpus=4" in four.stderr  # the refusal names the details polkit saw
            assert vm_names(system_bus) == ["two"]
    finally:
        rule.unlink(missing_ok=True)
