"""The package under a real systemd: run by pytest *inside* the systemd guest.

PID 1 here is systemd 252, with its own system bus, journald, udevd and a
polkitd that dbus-daemon activates, exactly as on a Debian host.  The tests
run in file order: each leaves the unit in the state the next one expects
(installed, started, holding a VM, ...), because a boot is the expensive
part and one boot has to answer every question.

Every claim is read from an observer other than the daemon: systemctl and
systemd's own journal lines for the unit's state, ``busctl`` for the bus
(and GetConnectionUnixProcessID for who owns the name), /proc for processes,
threads and memfds, /sys/fs/cgroup for what is left behind.

Not named test_*.py: the host suite must not collect it.  It runs under the
guest's /usr/bin/python3 with the .deb's own Debian dependencies, not the
checkout's venv, so it imports nothing from the project.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

UNIT = "kvmnumad.service"
DEB_DIR = Path(os.environ.get("SYSTEMD_GUEST_DEBS", "/mnt/sysd"))
CGROUP = Path("/sys/fs/cgroup/system.slice") / UNIT
DROPIN = Path("/run/systemd/system") / f"{UNIT}.d" / "50-test-watchdog.conf"
VM = "probe"
# Under TCG every step is 2-5x slower than on a host, and varies; these bound
# each wait so that a hang fails one test, never the whole guest run.
T_SHORT = 60
T_LONG = 180
KILL_FAILED = "Failed to kill control group"


def sh(*cmd: str, timeout: float = T_SHORT, check: bool = True, user: str | None = None,
       ) -> subprocess.CompletedProcess[str]:
    argv = ["runuser", "-u", user, "--", *cmd] if user else list(cmd)
    print(f"$ {' '.join(argv)}", flush=True)
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        if check:
            raise
        # check=False callers poll (vm_prop in a loop): a command that outlived its bound is one
        # failed poll, as busctl's own --timeout would have been had it kept to it (under a loaded
        # host it did not: busctl --timeout=10 killed at 15 s after a kill -9 restart)
        why = f"{argv[0]}: killed after {timeout:.0f} s"
        print(why, flush=True)
        return subprocess.CompletedProcess(argv, 124, "", why)
    text = (out.stdout + out.stderr).strip()
    if text:
        print(text[-4000:], flush=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{argv} exited {out.returncode}: {text[-2000:]}")
    return out


def figure(text: str) -> None:
    """A measured value for the run's summary (guest-run.sh prints them after pytest's)."""
    with open(DEB_DIR / "figures.txt", "a") as f:
        f.write(text + "\n")


def wait_until(what: str, pred: Callable[[], bool], timeout: float = T_SHORT, step: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def prop(name: str) -> str:
    return sh("systemctl", "show", "-P", name, UNIT).stdout.strip()


def main_pid() -> int:
    return int(prop("MainPID"))


def cursor() -> str:
    """The journal's position now, so a test reads only what came after it."""
    out = sh("journalctl", "-n", "0", "--show-cursor", "--no-pager", "-q").stdout
    m = re.search(r"-- cursor: (\S+)", out)
    assert m, out
    return m.group(1)


def journal(after: str, *match: str) -> list[dict[str, str]]:
    out = sh("journalctl", "--after-cursor", after, "-o", "json", "--no-pager", *match,
             timeout=T_LONG, check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def messages(entries: list[dict[str, str]]) -> list[str]:
    return [e["MESSAGE"] for e in entries if isinstance(e.get("MESSAGE"), str)]


def name_owner_pid() -> int:
    out = sh("busctl", "--system", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
             "org.freedesktop.DBus", "GetConnectionUnixProcessID", "s", "org.kvmnuma1").stdout
    return int(out.split()[1])


def list_vms(user: str | None = None) -> str:
    return sh("busctl", "--system", "--json=short", f"--timeout={T_LONG}", "call", "org.kvmnuma1",
              "/org/kvmnuma1", "org.kvmnuma1.Manager", "ListVMs", timeout=T_LONG, user=user).stdout


def memfds(pid: int) -> set[str]:
    """memfd names a process holds (``/memfd:NAME (deleted)``)."""
    names: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return names
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("/memfd:"):
            names.add(target)
    return names


def all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def exposure() -> float:
    out = sh("systemd-analyze", "security", "--no-pager", UNIT, check=False).stdout
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", out)
    assert m, out
    return float(m.group(1))


# ------------------------------------------------------------------ the host


def test_pid1_is_systemd() -> None:
    assert Path("/proc/1/comm").read_text().strip() == "systemd"
    assert Path("/run/systemd/system").is_dir()  # sd_booted()
    state = sh("systemctl", "is-system-running", "--wait", timeout=T_LONG, check=False).stdout.strip()
    sh("systemctl", "--failed", "--no-pager", "--no-legend", check=False)
    assert state in ("running", "degraded"), state
    assert sh("systemd-detect-virt", "-c", check=False).stdout.strip() == "none"
    sh("numactl", "-H")


def test_dpkg_installs_and_enables_the_unit() -> None:
    debs = sorted(DEB_DIR.glob("kvmnumad_*.deb"))
    assert len(debs) == 1, debs
    sh("dpkg", "-i", str(debs[0]), timeout=T_LONG)
    assert sh("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    assert prop("FragmentPath") == "/lib/systemd/system/kvmnumad.service"
    assert Path("/usr/share/dbus-1/system-services/org.kvmnuma1.service").is_file()
    # the postinst (deb-systemd-invoke) started it already
    wait_until("the unit started by dpkg", lambda: prop("ActiveState") in ("active", "failed"), T_LONG)
    assert prop("SubState") == "running"
    # byte-compiled at install (dh_python3's py3compile in the postinst): with ProtectSystem=strict
    # the daemon could not write __pycache__, and would compile every module at every start
    source = {p.stem for p in PKG_DIR.rglob("*.py")}
    compiled = {p.name.split(".")[0] for p in PKG_DIR.rglob("__pycache__/*.pyc")}
    figure(f"byte-compiled modules of kvmnumad: {len(source & compiled)} of {len(source)}")
    assert source <= compiled, sorted(source - compiled)
    out = sh("python3", "-X", "importtime", "-c", "import kvmnumad.daemon", timeout=T_LONG).stderr
    rows = [ln.split("|") for ln in out.splitlines() if ln.startswith("import time:") and "|" in ln]
    cum = sorted(((int(r[1]), r[2].strip()) for r in rows if r[1].strip().isdigit()), reverse=True)
    figure("import kvmnumad.daemon under TCG (cumulative ms): " + ", ".join(
        f"{name} {us / 1000:.0f}" for us, name in cum[:12]))


def test_security_exposure_at_most_2() -> None:
    level = exposure()
    figure(f"systemd-analyze security {UNIT}: exposure {level}")
    assert level <= 2.0


# ------------------------------------------------------------------ start


_start_s: list[float] = []  # this boot's plain start, the baseline of a crash restart's time
_crash_windows: list[tuple[int, int]] = []  # realtime us: from a kill -9 of MainPID to the unit running again


def test_start_waits_for_ready_and_shows_status() -> None:
    sh("systemctl", "stop", UNIT, timeout=T_LONG)
    assert prop("ActiveState") == "inactive"
    start = time.monotonic()
    sh("systemctl", "start", UNIT, timeout=T_LONG)  # Type=notify: returns once READY=1 came
    _start_s.append(time.monotonic() - start)
    figure(f"systemctl start (until READY=1): {_start_s[-1]:.1f} s")
    assert (prop("ActiveState"), prop("SubState")) == ("active", "running")
    status = sh("systemctl", "status", "--no-pager", "-n", "0", UNIT).stdout
    assert re.search(r'Status: "serving org\.kvmnuma1, 0 VM\(s\)"', status), status
    # the bus's own word on who owns the name: the unit's main process
    assert name_owner_pid() == main_pid()
    assert prop("WatchdogUSec") not in ("", "0", "infinity")


# busctl prints every AccessDenied as "Access denied" (sd-bus overrides the text),
# so the call goes through dbus-fast, which shows the reply's sender and text.
_CALL_AS_CLIENT = """
import asyncio, sys
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus
async def main():
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    owner = await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="GetNameOwner", signature="s", body=["org.kvmnuma1"]))
    reply = await bus.call(Message(destination="org.kvmnuma1", path="/org/kvmnuma1",
        interface="org.kvmnuma1.Manager", member="CreateVMSimple", signature="sutusb",
        body=["intruder", 1, 64 << 20, 0, "", False]))
    print(f"owner={owner.body[0]} sender={reply.sender} type={reply.message_type.name} "
          f"error={reply.error_name} body={reply.body}")
asyncio.run(asyncio.wait_for(main(), 120))
"""


def test_unprivileged_user_gets_access_denied_through_polkitd() -> None:
    list_vms(user="nobody")  # reads are for everyone
    out = sh("python3", "-c", _CALL_AS_CLIENT, timeout=T_LONG, user="nobody").stdout
    m = re.search(r"owner=(\S+) sender=(\S+) type=(\w+) error=(\S+) body=(.*)", out)
    assert m, out
    owner, sender, kind, error, body = m.groups()
    assert kind == "ERROR" and error == "org.freedesktop.DBus.Error.AccessDenied", out
    assert sender == owner, "refused by the bus policy, not by the daemon"
    assert "uid 65534 is not authorized for org.kvmnuma1.manage" in body, body
    # the daemon asked the real polkitd, activated on the system bus
    owner_pid = sh("busctl", "--system", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                   "org.freedesktop.DBus", "GetConnectionUnixProcessID", "s",
                   "org.freedesktop.PolicyKit1").stdout.split()[1]
    assert os.readlink(f"/proc/{owner_pid}/exe").endswith("/polkitd")
    assert "intruder" not in list_vms()


# ------------------------------------------------------------------ a VM and its journal


def test_root_creates_a_vm_and_journal_finds_it_by_field() -> None:
    mark = cursor()
    sh("kvmnumactl", "--bus", "system", "create", VM, "--vcpus", "2", "--memory", "64M", "--start",
       timeout=T_LONG)
    pid = main_pid()
    assert memfds(pid), "the VM's guest memory (a memfd) is not in the daemon"
    wait_until("the VM's 2 vCPU threads", lambda: len(os.listdir(f"/proc/{pid}/task")) >= 3)
    entries = journal(mark, f"_SYSTEMD_UNIT={UNIT}", f"KVMNUMA_VM={VM}")
    assert entries, "journalctl -u kvmnumad KVMNUMA_VM=probe found nothing"
    assert any(f"VM {VM} created" in m for m in messages(entries)), messages(entries)
    # the exact command line the README promises
    assert VM in sh("journalctl", "-u", "kvmnumad", f"KVMNUMA_VM={VM}", "--no-pager").stdout


def test_restart_restores_the_vm_without_a_traceback() -> None:
    mark = cursor()
    before = main_pid()
    sh("systemctl", "restart", UNIT, timeout=T_LONG)
    after = main_pid()
    assert after != before and prop("SubState") == "running"
    assert VM in list_vms()
    wait_until("the daemon's restore log line",
               lambda: any("restored" in m for m in messages(journal(mark, f"_SYSTEMD_UNIT={UNIT}"))))
    logged = messages(journal(mark, f"_SYSTEMD_UNIT={UNIT}"))
    assert not [m for m in logged if "Traceback" in m or "NumaDisabled" in m], logged
    sh("systemctl", "reset-failed", UNIT, check=False)  # start limit: the tests below start it again


def _handover_configured() -> bool:
    return prop("FileDescriptorStoreMax") not in ("", "0")


def test_restart_keeps_the_running_vm() -> None:
    """Hook for the fd-store handover: across ``systemctl restart`` the VM's
    guest memory is the same memfd (same inode) in the new process.  Runs by
    itself once the installed unit has an fd store (FileDescriptorStoreMax=)."""
    if not _handover_configured():
        pytest.skip("the unit keeps no fd store: VMs are not kept across a restart yet "
                    "(issue 13's restart-with-guests-kept work)")
    def inodes(pid: int) -> set[int]:
        out = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd).startswith("/memfd:"):
                    out.add(os.stat(fd).st_ino)
            except OSError:
                continue
        return out

    before = inodes(main_pid())
    sh("systemctl", "restart", UNIT, timeout=T_LONG)
    assert before and before <= inodes(main_pid())
    sh("systemctl", "reset-failed", UNIT, check=False)


# ------------------------------------------------------------------ guests kept (issue 13)
#
# A VM of 2 guest nodes, 4 vCPUs and 2 x 128 MiB through a restart, a package
# upgrade and a kill -9, every fact read from outside the daemon: guest memory
# through /proc/MAINPID/fd/N (the memfd itself), the payload's pass counters
# from the pages it writes, placement by taskset and /proc/PID/numa_maps, fds
# and threads by /proc counts, the journal by journalctl -o json.

ACC = "acc"
COLD = "cold"
GONE = "gone"
MiB = 1 << 20
PAGE = 4096
STATE_DIR = Path("/var/lib/kvmnumad")
PKG_DIR = Path("/usr/lib/python3/dist-packages/kvmnumad")
KILL_TO_RUNNING_LIMIT = 5.0
_NODE_RE = re.compile(r"\bN(\d+)=(\d+)")


def create(name: str, vcpus: int, memory: int, nodes: int, start: bool) -> None:
    sh("busctl", "--system", f"--timeout={T_LONG}", "call", "org.kvmnuma1", "/org/kvmnuma1",
       "org.kvmnuma1.Manager", "CreateVM", "suta{sv}", name, str(vcpus), str(memory), "3",
       "numa_nodes", "u", str(nodes), "start", "b", "true" if start else "false",
       "policy", "s", "local-first", timeout=T_LONG)


def vm_call(vm: str, member: str) -> None:
    sh("busctl", "--system", f"--timeout={T_LONG}", "call", "org.kvmnuma1", f"/org/kvmnuma1/vm/{vm}",
       "org.kvmnuma1.VM", member, timeout=T_LONG)


def vm_prop(vm: str, name: str, timeout: float = T_SHORT, check: bool = True) -> object:
    out = sh("busctl", "--system", "--json=short", f"--timeout={timeout:.0f}", "get-property", "org.kvmnuma1",
             f"/org/kvmnuma1/vm/{vm}", "org.kvmnuma1.VM", name, timeout=timeout + 5, check=check)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout)["data"]


def slots(pid: int, vm: str) -> dict[str, int]:
    """memfd name -> fd number, this VM's only (``kvmnumad-<vm>-boot``, ``-node0-slot1``, ...)."""
    found: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        name = target.removeprefix("/memfd:").removesuffix(" (deleted)")
        if target.startswith("/memfd:") and name.startswith(f"kvmnumad-{vm}-"):
            found[name] = int(fd)
    return found


def digests(pid: int, vm: str, only: str = "") -> dict[str, str]:
    out = {}
    for name, fd in slots(pid, vm).items():
        if not name.endswith(only):
            continue
        h = hashlib.sha256()
        with open(f"/proc/{pid}/fd/{fd}", "rb") as f:
            while chunk := f.read(8 * MiB):
                h.update(chunk)
        out[name] = h.hexdigest()
    return out


def counters(pid: int, vm: str) -> dict[str, list[int]]:
    """The pass number the payload writes at the start of each page of each node slot."""
    out = {}
    for name, fd in slots(pid, vm).items():
        if "slot" in name:
            with open(f"/proc/{pid}/fd/{fd}", "rb") as f:
                data = f.read()
            out[name] = memoryview(data).cast("I")[:: PAGE // 4].tolist()  # x86: little-endian
    return out


def vcpu_affinity(pid: int, vm: str) -> dict[int, set[int]]:
    """vCPU -> its CPUs, per ``taskset -p`` (the kernel's word).  Which thread is
    which vCPU comes from VcpuThreads, checked against /proc: a task of the
    new MainPID, named vcpuN (names alone repeat across VMs)."""
    out = {}
    for vcpu, tid in cast("list[list[int]]", vm_prop(vm, "VcpuThreads")):
        assert Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip() == f"vcpu{vcpu}"
        mask = sh("taskset", "-p", str(tid)).stdout.strip().rsplit(":", 1)[1].strip()
        bits = int(mask, 16)
        out[vcpu] = {cpu for cpu in range(bits.bit_length()) if bits >> cpu & 1}
    return out


def placement(pid: int, vm: str) -> dict[str, tuple[str, set[int]]]:
    """memfd slot -> (its policy, the nodes holding its pages), per /proc/PID/numa_maps."""
    out: dict[str, tuple[str, set[int]]] = {}
    for line in Path(f"/proc/{pid}/numa_maps").read_text().splitlines():
        m = re.search(rf"file=/memfd:(kvmnumad-{re.escape(vm)}-node\S+)", line)
        if m:
            name = m.group(1).split("\\040")[0]
            out[name] = (line.split()[1], {int(n) for n, pages in _NODE_RE.findall(line) if int(pages)})
    return out


def fd_kinds(pid: int) -> Counter[str]:
    """What the daemon's fds are, numbers and inodes left out (socket:[123] -> socket).
    The /proc and /sys files the sampler keeps open are left out too: which it holds
    depends on which vCPUs ran since its last take (a busy one has 3, an idle one 1),
    not on what the process inherited."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = re.sub(r":\[\d+\]$", "", os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
        if not target.startswith(("/proc/", "/sys/")):
            kinds[target] += 1
    return kinds


def daemon_pids(old: int) -> list[int]:
    """Processes named kvmnumad (the script's comm) other than ``old``, per /proc."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != old:
            try:
                if Path(f"/proc/{d}/comm").read_text().strip() == "kvmnumad":
                    found.append(int(d))
            except OSError:
                continue
    return found


def vcpu_ticks(pid: int, vm: str) -> dict[int, int]:
    """tid -> CPU time (utime + stime, clock ticks) of each vCPU thread of ``vm`` in pid, per /proc:
    a thread named vcpuN in the VM's vCPU cpuset (its /proc/TID/cgroup)."""
    out: dict[int, int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            cgroup = Path(f"/proc/{pid}/task/{tid}/cgroup").read_text()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1:].rsplit(")", 1)
        if comm.startswith("vcpu") and re.search(rf"/vm-{re.escape(vm)}/vcpu\d+$", cgroup, re.M):
            fields = rest.split()
            out[int(tid)] = int(fields[11]) + int(fields[12])  # stat fields 14 and 15
    return out


def vcpu_threads(pid: int) -> Counter[str]:
    names: Counter[str] = Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            names[Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()] += 1
        except OSError:
            continue
    return Counter({k: n for k, n in names.items() if k.startswith("vcpu")})


def state_dir_whole() -> None:
    """Never torn: every definition a whole JSON document, no temporary file left."""
    for f in STATE_DIR.iterdir():
        if f.is_dir() and f.name == "adopted":  # adoption records (kvmnumad/adopt/records.py)
            for r in f.iterdir():
                assert r.suffix == ".json", f"stray file among the adoption records: {r}"
                json.loads(r.read_text())
            continue
        if f.suffix == ".payload":  # a VM's own payload, beside its definition (state.py)
            continue
        assert f.suffix == ".json", f"stray file in the state directory: {f}"
        json.loads(f.read_text())


def n_fd_store() -> int | None:
    """How many fds systemd holds for the unit (None: this systemd does not say)."""
    value = prop("NFileDescriptorStore")
    return int(value) if value.isdigit() else None


_fresh: dict[str, object] = {}


def test_handover_setup_a_two_node_vm_in_a_fresh_daemon() -> None:
    """The baseline: a fresh start (no inherited fds but the probe's) creating the VMs."""
    create(ACC, 4, 256 * MiB, 2, True)
    create(COLD, 2, 32 * MiB, 2, True)
    pid = main_pid()
    wait_until("two passes on every page of acc",
               lambda: all(min(c) >= 2 for c in counters(pid, ACC).values()), T_LONG, step=2)
    wait_until("a pass on every page of cold",
               lambda: all(min(c) >= 1 for c in counters(pid, COLD).values()), T_LONG, step=2)
    vm_call(COLD, "Stop")  # a stopped VM: its memory must come back byte for byte
    assert sorted(slots(pid, ACC)) == ["kvmnumad-acc-boot", "kvmnumad-acc-node0-slot1",
                                       "kvmnumad-acc-node1-slot2"]
    _fresh.update(fds=fd_kinds(pid), threads=vcpu_threads(pid), affinity=vcpu_affinity(pid, ACC),
                  placement=placement(pid, ACC))
    print("fresh:", _fresh, flush=True)
    assert len(_fresh["affinity"]) == 4  # type: ignore[arg-type]  # vcpu0..vcpu3 (each VM counts its own)


def _survives(action: Callable[[], object], what: str) -> None:
    assert _fresh, "the setup test did not run"
    old = main_pid()
    cold = digests(old, COLD)
    before = counters(old, ACC)
    mark = cursor()
    start = time.monotonic()
    action()
    wait_until("the unit running again", lambda: prop("SubState") == "running", T_LONG)
    pid = main_pid()
    figure(f"{what}: VMs kept, {time.monotonic() - start:.1f} s until the unit ran again")
    assert pid != old and not Path(f"/proc/{old}").exists()
    state_dir_whole()
    recovery = vm_prop(ACC, "Recovery", T_LONG)
    assert recovery == "resumed", (recovery, messages(journal(mark, f"_SYSTEMD_UNIT={UNIT}"))[-40:])
    assert vm_prop(ACC, "State") == "running"
    assert vm_prop(COLD, "State") == "stopped"
    assert digests(pid, COLD) == cold  # the stopped VM: every memfd byte for byte the same
    after = counters(pid, ACC)
    assert sorted(after) == sorted(before)
    for name, pages in after.items():  # monotonic: no page went back
        assert all(a >= b for a, b in zip(pages, before[name], strict=True)), name
    wait_until("acc's counters advancing past where they were",
               lambda: all(min(p) > max(before[n]) for n, p in counters(pid, ACC).items()), T_LONG, step=2)
    # placement re-applied, per the kernel
    assert vcpu_affinity(pid, ACC) == _fresh["affinity"]
    assert placement(pid, ACC) == _fresh["placement"]
    # nothing extra in the new process: fds by kind (memfds included) and vCPU threads as a fresh start
    fresh_fds = cast("Counter[str]", _fresh["fds"])
    try:
        wait_until("the fresh start's fds", lambda: fd_kinds(pid) == fresh_fds, 30)
    except AssertionError as e:
        now = fd_kinds(pid)
        raise AssertionError(f"{e}: extra {now - fresh_fds}, missing {fresh_fds - now}") from None
    assert vcpu_threads(pid) == _fresh["threads"]
    logged = journal(mark, f"_SYSTEMD_UNIT={UNIT}")
    assert any(e.get("KVMNUMA_EVENT") == "vm-resumed" and e.get("KVMNUMA_VM") == ACC for e in logged)
    assert not [m for m in messages(logged) if "Traceback" in m]
    sh("systemctl", "reset-failed", UNIT, check=False)


def test_handover_systemctl_restart_keeps_the_vms() -> None:
    _survives(lambda: sh("systemctl", "restart", UNIT, timeout=T_LONG), "systemctl restart")


@pytest.mark.soak
@pytest.mark.parametrize("round_", range(12))
def test_handover_restart_rounds(round_: int) -> None:
    """Only on request (``-m soak``): restart after restart in one boot, for a
    handover that fails 1 time in N (the journal then says which vCPU state)."""
    _survives(lambda: sh("systemctl", "restart", UNIT, timeout=T_LONG), f"systemctl restart, round {round_}")


def test_handover_package_upgrade_keeps_the_vms() -> None:
    debs = sorted((DEB_DIR / "upgrade").glob("kvmnumad_*.deb"))
    assert len(debs) == 1, debs
    version = debs[0].name.split("_")[1]
    _survives(lambda: sh("dpkg", "-i", str(debs[0]), timeout=T_LONG), f"dpkg -i {debs[0].name}")
    assert sh("dpkg-query", "-W", "-f=${Version}", "kvmnumad").stdout.strip() == version


def test_handover_kill_9_restarts_the_vcpus_on_the_kept_memory() -> None:
    old = main_pid()
    cold = digests(old, COLD)
    boot = digests(old, ACC, "-boot")["kvmnumad-acc-boot"]  # the code: no pass writes it
    inodes = {n: os.stat(f"/proc/{old}/fd/{fd}").st_ino for n, fd in slots(old, ACC).items()}
    mark = cursor()
    window_start = time.time_ns() // 1000
    try:  # the window is recorded even when a check below fails: the cgroup check reads it
        os.kill(old, signal.SIGKILL)
        killed = time.monotonic()
        deadline = killed + T_LONG
        # The guest runs again when acc's 4 vCPU threads in the new process gain CPU time.  Polled
        # through /proc only (no systemctl per round: it would slow down the start it measures).
        ran = None
        while time.monotonic() < deadline and ran is None:
            for new in daemon_pids(old):
                before = vcpu_ticks(new, ACC)
                time.sleep(0.1)
                after = vcpu_ticks(new, ACC)
                if sum(after.get(tid, 0) > t for tid, t in before.items()) >= 4:
                    ran = time.monotonic() - killed
            time.sleep(0.05)
        # Then the bus says so: the daemon imports and connects the bus stack only after its VMs run.
        state = None
        while time.monotonic() < deadline:  # bounded: State over the bus, each call bounded too
            state = vm_prop(ACC, "State", 10, check=False)
            if state == "running":
                break
            time.sleep(0.2)
        took = time.monotonic() - killed
        figure(f"kill -9 of MainPID to acc's 4 vCPUs running again (/proc): "
               f"{'never' if ran is None else f'{ran:.1f} s'} (goal {KILL_TO_RUNNING_LIMIT:.0f} s)")
        figure(f"kill -9 of MainPID to acc running per the bus: {took:.1f} s")
        assert state == "running", state
        assert ran is not None
        pid = main_pid()
        assert pid != old
        state_dir_whole()
        assert digests(pid, COLD) == cold
        assert digests(pid, ACC, "-boot")["kvmnumad-acc-boot"] == boot
        # the same memory: each slot the same memfd (inode) as before the kill.  (Its pass counters
        # are no witness here: from entry the payload's first pass writes 0 to every page.)
        assert {n: os.stat(f"/proc/{pid}/fd/{fd}").st_ino for n, fd in slots(pid, ACC).items()} == inodes
        wait_until("acc's vCPUs making passes again",
                   lambda: all(min(p) >= 1 for p in counters(pid, ACC).values()), T_LONG, step=2)
        assert vm_prop(ACC, "Recovery") == "restarted"
        wait_until("the restart's journal entries", lambda: any(
            e.get("KVMNUMA_EVENT") == "vm-restarted" and e.get("KVMNUMA_VM") == ACC
            for e in journal(mark, "-u", UNIT)), T_SHORT, step=2)
        assert vcpu_affinity(pid, ACC) == _fresh["affinity"]
        assert placement(pid, ACC) == _fresh["placement"]
    finally:
        _crash_windows.append((window_start, time.time_ns() // 1000))
    sh("systemctl", "reset-failed", UNIT, check=False)
    # The goal is 5 s.  A time is a figure here, never an assertion (rule 6: a loaded
    # host made this 11.8 s once against 5.2 s quiet): what the check asserts is that the VM
    # runs again on its kept memory, within T_LONG.  The figure says how it compares.
    usec = prop("RestartUSec")  # "100ms", "2s"
    restart_sec = float(usec[:-2]) / 1000 if usec.endswith("ms") else float(usec.removesuffix("s"))
    plain = _start_s[0] if _start_s else None
    figure(f"kill -9 in this guest: the VM runs again after {ran:.1f} s = RestartSec={restart_sec}s + the "
           f"new process's start and restore (the bus after {took:.1f} s); this boot's plain start "
           f"{plain if plain is None else f'{plain:.1f} s'}; "
           f"goal {KILL_TO_RUNNING_LIMIT:.0f} s {'met' if ran <= KILL_TO_RUNNING_LIMIT else 'NOT met'}")


def test_handover_memfd_of_a_gone_definition_is_released() -> None:
    """Its definition deleted, then a crash: the next process finds its memfds
    in the store and no VM for them, and releases them (FDSTOREREMOVE=1).
    (A ``systemctl stop`` would not do: systemd 252 empties the store of a unit
    that goes inactive, so kill -9 is the way to a new process with a store.)"""
    create(GONE, 1, 16 * MiB, 0, False)
    old = main_pid()
    gone = slots(old, GONE)
    assert gone
    held = n_fd_store()
    (STATE_DIR / f"{GONE}.json").unlink()
    window_start = time.time_ns() // 1000
    os.kill(old, signal.SIGKILL)
    wait_until("the unit running again", lambda: main_pid() not in (0, old) and prop("SubState") == "running",
               T_LONG)
    _crash_windows.append((window_start, time.time_ns() // 1000))
    assert vm_prop(ACC, "State", T_LONG) == "running"
    pid = main_pid()
    state_dir_whole()
    assert not slots(pid, GONE)
    assert GONE not in list_vms()
    if held is not None:  # systemd's own count: the gone VM's memfds are out of the store
        wait_until("the store without the gone VM", lambda: n_fd_store() == held - len(gone), T_SHORT)
        figure(f"fd store: {held} fds before, {n_fd_store()} after a crash without {GONE}'s definition")
    # destroyed: its memfds leave the process and the store (and the guest's CPUs are free again)
    for vm in (ACC, COLD):
        n = len(slots(pid, vm))
        before = n_fd_store()
        vm_call(vm, "Destroy")
        assert not slots(pid, vm)
        if before is not None:
            def emptied(b: int = before, k: int = n) -> bool:
                return n_fd_store() == b - k

            wait_until(f"the store without {vm}", emptied, T_SHORT)
    sh("systemctl", "reset-failed", UNIT, check=False)


# ------------------------------------------------------------------ watchdog


def test_watchdog_kills_a_frozen_daemon_and_restart_brings_it_back() -> None:
    DROPIN.parent.mkdir(parents=True, exist_ok=True)
    DROPIN.write_text("[Service]\nWatchdogSec=4s\n")
    try:
        sh("systemctl", "daemon-reload", timeout=T_LONG)
        sh("systemctl", "restart", UNIT, timeout=T_LONG)  # WATCHDOG_USEC is given at start
        assert prop("WatchdogUSec") in ("4s", "4000000")
        restarts = int(prop("NRestarts"))
        frozen = main_pid()
        mark = cursor()
        time.sleep(6)  # a live daemon keeps pinging past one period
        assert main_pid() == frozen
        os.kill(frozen, signal.SIGSTOP)  # the event loop (and every thread) frozen
        frozen_at = time.monotonic()
        wait_until("systemd's watchdog restart", lambda: int(prop("NRestarts")) > restarts, timeout=T_LONG)
        figure(f"watchdog: SIGSTOP to restart: {time.monotonic() - frozen_at:.1f} s (WatchdogSec=4s)")
        wait_until("the restarted daemon", lambda: prop("SubState") == "running", timeout=T_LONG)
        assert main_pid() != frozen
        assert not Path(f"/proc/{frozen}").exists()
        pid1 = messages(journal(mark, "_PID=1", f"UNIT={UNIT}"))
        assert any("Watchdog timeout" in m for m in pid1), pid1
        assert any("Failed with result 'watchdog'" in m for m in pid1), pid1
        assert VM in list_vms()
    finally:
        DROPIN.unlink(missing_ok=True)
        sh("systemctl", "daemon-reload", timeout=T_LONG, check=False)
        sh("systemctl", "reset-failed", UNIT, check=False)


# ------------------------------------------------------------------ stop and activation


def _stop_and_check_nothing_left() -> None:
    pid = main_pid()
    held = memfds(pid)
    assert held, "no memfd before the stop: nothing would prove they go"
    mark = cursor()
    sh("systemd-analyze", "log-level", "debug")  # systemd then logs each notification it receives
    try:
        sh("systemctl", "stop", UNIT, timeout=T_LONG)
    finally:
        sh("systemd-analyze", "log-level", "info", check=False)
    assert prop("ActiveState") == "inactive"
    pid1 = messages(journal(mark, "_PID=1"))
    assert any(f"Got notification message from PID {pid} (STOPPING=1" in m for m in pid1), \
        [m for m in pid1 if "notification" in m]
    assert not [m for m in pid1 if KILL_FAILED in m]
    assert not Path(f"/proc/{pid}").exists()
    assert not CGROUP.exists(), sorted(str(p) for p in CGROUP.rglob("*") if p.is_dir())
    leftover = {p: memfds(p) & held for p in all_pids()}
    assert not {p: m for p, m in leftover.items() if m}
    comms = {p: Path(f"/proc/{p}/comm").read_text().strip() for p in all_pids()
             if Path(f"/proc/{p}/comm").exists()}
    assert "kvmnumad" not in comms.values()


def test_stop_sends_stopping_and_leaves_nothing_behind() -> None:
    _stop_and_check_nothing_left()


def test_a_call_activates_the_stopped_service() -> None:
    assert prop("ActiveState") == "inactive"
    mark = cursor()
    start = time.monotonic()
    assert VM in list_vms()  # the call itself starts the daemon, which restores the VM
    figure(f"D-Bus activation, call to reply: {time.monotonic() - start:.1f} s")
    assert prop("SubState") == "running"
    # the bus's own lines, by the process that wrote them (not every one carries _SYSTEMD_UNIT)
    bus = messages([e for e in journal(mark) if e.get("_COMM") == "dbus-daemon"])
    assert any("Activating via systemd: service name='org.kvmnuma1' unit='kvmnumad.service'" in m
               for m in bus), bus
    assert name_owner_pid() == main_pid()
    _stop_and_check_nothing_left()


def test_no_stop_of_this_boot_failed_to_kill_the_cgroup() -> None:
    """Stops only: after a kill -9 of MainPID from outside (the crash checks above) systemd 252
    logged it once per crash in this guest (cause not found yet: the stop path's ExecStopPost
    cleanup of the vCPUs' threaded cgroups keeps it out of a plain stop and of the watchdog's);
    counted here as a figure, not hidden."""
    out = sh("journalctl", "-b", "_PID=1", "-o", "json", "--no-pager", "-q", "--grep", KILL_FAILED,
             check=False)
    at = [int(json.loads(line)["__REALTIME_TIMESTAMP"]) for line in out.stdout.splitlines()
          if line.startswith("{")]
    in_crash = [t for t in at if any(a <= t <= b for a, b in _crash_windows)]
    figure(f"'{KILL_FAILED}' after a kill -9 of MainPID: {len(in_crash)} in {len(_crash_windows)} crash(es)")
    assert not [t for t in at if t not in in_crash]
