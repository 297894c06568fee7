"""systemd/kvmnumad.service and dbus/org.kvmnuma1.service, checked offline (PID 1 is not systemd here).

- ``systemd-analyze verify`` in a throw-away root holding the distribution's
  units, the unit under test and a stand-in /usr/bin/kvmnumad (verify checks
  that ExecStart= is executable; the real binary is checked by the packaging
  test against the installed unit).
- ``systemd-analyze security --offline=true``: exposure at most 2.0.
- The hardening still allows the job: the core runs a VM, pins a vCPU and
  binds memory in a process with the unit's capability bounding set,
  no_new_privs and W^X memory (PR_SET_MDWE, what MemoryDenyWriteExecute=
  enforces), read back by taskset.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.observe import taskset_affinity

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "kvmnumad.service"
ACTIVATION = ROOT / "dbus" / "org.kvmnuma1.service"
MAN = ROOT / "packaging" / "man"
MAX_EXPOSURE = 2.0


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


@pytest.fixture
def unit_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True)
    stand_in = root / "usr/bin/kvmnumad"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    (root / "bin").mkdir()
    for tool in ("sh", "kill"):  # ExecStartPre= and ExecReload= run these
        (root / "bin" / tool).write_text("#!/bin/sh\nexit 0\n")
        (root / "bin" / tool).chmod(0o755)
    shutil.copy(UNIT, root / "usr/lib/systemd/system/kvmnumad.service")
    return root


def test_verify_is_clean(unit_root: Path, tmp_path: Path) -> None:
    # man:kvmnumad(8) and man:kvmnumactl(1) resolve against the pages in packaging/man.
    for page in MAN.iterdir():
        section = tmp_path / "man" / f"man{page.suffix[1:]}"
        section.mkdir(parents=True, exist_ok=True)
        shutil.copy(page, section)
    out = subprocess.run(["systemd-analyze", "verify", f"--root={unit_root}",
                          "/usr/lib/systemd/system/kvmnumad.service"],
                         env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "MANPATH": f"{tmp_path / 'man'}:"},
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr


def test_verify_notices_a_missing_binary(unit_root: Path) -> None:
    """The check above is not vacuous: without ExecStart's binary verify fails."""
    (unit_root / "usr/bin/kvmnumad").unlink()
    out = subprocess.run(["systemd-analyze", "verify", f"--root={unit_root}", "--man=no",
                          "/usr/lib/systemd/system/kvmnumad.service"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode != 0 and "/usr/bin/kvmnumad is not executable" in out.stderr


def test_security_exposure(tmp_path: Path) -> None:
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
                         capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for kvmnumad.service: (\d+\.\d+)", out.stdout)
    assert match, out.stdout + out.stderr
    exposure = float(match.group(1))
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure <= MAX_EXPOSURE
    # The threshold is enforced by systemd-analyze itself too (exit status).
    threshold = f"--threshold={exposure * 10:.0f}"
    strict = subprocess.run(["systemd-analyze", "security", "--offline=true", threshold, "--no-pager",
                             str(UNIT)], capture_output=True, text=True, timeout=60, check=False)
    assert strict.returncode == 0, strict.stderr


def test_unit_contract() -> None:
    s = unit_settings()
    expected = {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "BusName": ["org.kvmnuma1"],
        "ExecStart": ["/usr/bin/kvmnumad --bus system"],
        "WatchdogSec": ["30s"],
        "Restart": ["on-failure"],
        "StateDirectory": ["kvmnumad"],
        "DeviceAllow": ["/dev/kvm rw"],
        "DevicePolicy": ["closed"],
        "ProtectSystem": ["strict"],
        "ProtectHome": ["yes"],
        "PrivateTmp": ["yes"],
        "RestrictAddressFamilies": ["AF_UNIX AF_NETLINK"],
        "SystemCallArchitectures": ["native"],
        # only the cpuset code's directories (kvmnumad/cgroups.py), never the whole tree
        "ReadWritePaths": ["-/sys/fs/cgroup/cpuset/kvmnumad -/sys/fs/cgroup/system.slice/kvmnumad.service"],
        "CapabilityBoundingSet": [""],  # none: nothing the daemon does needs one
        "TasksMax": ["16384"],
        "LimitNOFILE": ["524288"],
        "OOMPolicy": ["stop"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
        "FileDescriptorStoreMax": ["8192"],  # guest memfds kept through a restart (issue 13)
    }
    assert {k: s.get(k) for k in expected} == expected
    assert "PrivateDevices" not in s  # a private /dev has no /dev/kvm
    # the v1 directory is made with full privileges before the sandboxed start,
    # and only where a cpuset v1 hierarchy exists (on v2 a mkdir would make a cgroup)
    (pre,) = s["ExecStartPre"]
    assert pre.startswith("+/bin/sh -c ") and "[ -d /sys/fs/cgroup/cpuset ]" in pre


def test_the_daemon_needs_no_capability() -> None:
    """CAP_SYS_NICE was kept for MPOL_MF_MOVE_ALL and priorities: the code uses neither."""
    code = "\n".join(p.read_text() for p in (ROOT / "kvmnumad").rglob("*.py"))
    code = code.replace("MPOL_MF_MOVE_ALL = ", "")  # its definition, kept for the flag table
    uses = [name for name in ("MPOL_MF_MOVE_ALL", "setpriority", "sched_setscheduler", "os.nice(")
            if name in code]
    assert uses == []


def test_activation_file() -> None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(ACTIVATION)
    assert dict(parser["D-BUS Service"]) == {
        "Name": "org.kvmnuma1",
        "Exec": "/bin/false",  # no unhardened fallback outside systemd (as systemd-machined's)
        "User": "root",
        "SystemdService": "kvmnumad.service",
    }


HARDENED_CHILD = textwrap.dedent("""
    import ctypes, json, mmap, os, sys, time
    from pathlib import Path
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        print(json.dumps({"skip": "PR_SET_MDWE: " + os.strerror(ctypes.get_errno())}))
        sys.exit(0)
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        wx = "allowed"
    except OSError as e:
        wx = e.strerror
    from kvmnumad.manager import Manager
    from kvmnumad.model import CreateOptions
    from kvmnumad.persist import Persister
    from kvmnumad.state import StateStore
    m = Manager()
    m.subscribe(Persister(m, StateStore(Path(sys.argv[1])), {}))  # as daemon.py wires it
    try:
        vm = m.create_vm("hardened", 2, 64 << 20, CreateOptions(numa_nodes=1, passes=1, start=True))
        deadline = time.monotonic() + 30
        while not all(s == "halted" for s in vm.runner_states()) and time.monotonic() < deadline:
            time.sleep(0.05)
        vm.set_vcpu_affinity(0, [1])
        status = Path("/proc/self/status").read_text()
        caps = [l.split()[1] for l in status.splitlines() if l.startswith(("CapEff", "CapBnd", "NoNewPrivs"))]
        print(json.dumps({"wx": wx, "states": vm.runner_states(), "tids": dict(vm.vcpu_threads()),
                          "progress": vm.progress(), "caps": caps}), flush=True)
        sys.stdin.readline()
    finally:
        m.shutdown()
""")


def test_hardening_still_runs_a_vm(tmp_path: Path) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) missing")
    cmd = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs",
           sys.executable, "-c", HARDENED_CHILD, str(tmp_path / "state")]
    with subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"hardened child failed: {proc.stderr.read()[-3000:]}")
        try:
            report = json.loads(line)
            if "skip" in report:
                pytest.skip(report["skip"])
            assert report["wx"] == "Permission denied"  # W^X is really enforced in the child
            cap_eff, cap_bnd, no_new_privs = report["caps"]
            assert int(cap_eff, 16) == int(cap_bnd, 16) == 0  # no capability at all
            assert no_new_privs == "1"
            assert report["states"] == ["halted", "halted"] and report["progress"] == [1, 1]
            assert taskset_affinity(int(report["tids"]["0"])) == {1}
        finally:
            proc.stdin.write("\n")
            proc.stdin.close()
            assert proc.wait(30) == 0
