"""kvmnumactl against a real dbus-daemon, and against the real kvmnumad on it.

Every effect is read back by someone other than kvmnumactl: busctl for the
API, taskset for pinning, /proc/PID/numa_maps for memory, `busctl monitor`
for the message flags the client puts on the wire.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.observe import host_nodes, node_cpus, numa_maps, online_cpus, taskset_affinity, thread_ids

CLI = [sys.executable, "-m", "kvmnumad.cli"]
ROOT = Path(__file__).resolve().parent.parent
COMMANDS = (
    "topology",
    "create",
    "plan",
    "list",
    "show",
    "start",
    "stop",
    "destroy",
    "pin",
    "bind",
    "numa",
    "map",
    "memory",
    "stats",
    "report",
    "suggestions",
    "monitor",
    "migrate",
    "jobs",
    "job-cancel",
)


def start_bus() -> tuple[str, int]:
    out = subprocess.run(
        ["dbus-daemon", "--session", "--fork", "--print-address=1", "--print-pid=2"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[0], int(out.stderr.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def empty_bus() -> Iterator[str]:
    """A real bus on which nobody owns org.kvmnuma1."""
    address, pid = start_bus()
    yield address
    os.kill(pid, signal.SIGTERM)


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A real bus with the real kvmnumad on it; yields (address, daemon pid)."""
    with daemon_on_bus(tmp_path_factory) as running:
        yield running


@contextlib.contextmanager
def daemon_on_bus(tmp_path_factory: pytest.TempPathFactory, *options: str) -> Iterator[tuple[str, int]]:
    """kvmnumad (with ``options``) on a bus of its own: (address, daemon pid) until the end."""
    address, bus_pid = start_bus()
    ready = tmp_path_factory.mktemp("kvmnumad") / "address"
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvmnumad",
            "--bus",
            address,
            "--address-file",
            str(ready),
            "--log-level",
            "warning",
            "--log-target",
            "stderr",
            *options,
        ],
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert daemon.poll() is None, f"kvmnumad exited with {daemon.returncode}"
            assert time.monotonic() < deadline, "kvmnumad did not get ready in 30 s"
            time.sleep(0.05)
        yield address, daemon.pid
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        os.kill(bus_pid, signal.SIGTERM)


def ctl(
    address: str | None, *args: str, env: dict[str, str] | None = None, stdin: Any = subprocess.DEVNULL
) -> subprocess.CompletedProcess[str]:
    argv = [*CLI, *(["--bus", address] if address else []), *args]
    full_env = {k: v for k, v in os.environ.items() if k != "KVMNUMAD_BUS"}
    full_env.update(env or {})
    return subprocess.run(
        argv, check=False, capture_output=True, text=True, env=full_env, stdin=stdin, timeout=30, cwd=ROOT
    )


def ok(address: str, *args: str) -> str:
    r = ctl(address, *args)
    assert r.returncode == 0, f"kvmnumactl {' '.join(args)}: rc {r.returncode}: {r.stderr}"
    return r.stdout


def ok_json(address: str, *args: str) -> dict[str, Any]:
    """A --json run that succeeded: exactly one line on stdout, one JSON object, nothing on stderr."""
    r = ctl(address, *args, "--json")
    assert r.returncode == 0, f"kvmnumactl {' '.join(args)} --json: rc {r.returncode}: {r.stderr}"
    assert r.stderr == ""
    assert r.stdout.endswith("\n") and r.stdout.count("\n") == 1, r.stdout
    value = json.loads(r.stdout)
    assert isinstance(value, dict), r.stdout
    return value


def json_error(r: subprocess.CompletedProcess[str], code: int, name: str) -> str:
    """A --json run that failed with exit ``code``: nothing on stdout and one
    JSON object on stderr naming the error; returns its message."""
    assert r.returncode == code, (r.returncode, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    error = json.loads(lines[0])
    assert set(error) == {"error", "message"} and error["error"] == name, error
    assert isinstance(error["message"], str) and error["message"]
    return str(error["message"])


def one_error_line(r: subprocess.CompletedProcess[str], name: str) -> str:
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"kvmnumactl: {name}: "), r.stderr
    return lines[0]


def busctl(address: str, *args: str) -> Any:
    out = subprocess.run(
        ["busctl", f"--address={address}", "--json=short", *args], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out)


def manager_call(address: str, method: str, *args: str) -> Any:
    return busctl(address, "call", "org.kvmnuma1", "/org/kvmnuma1", "org.kvmnuma1.Manager", method, *args)[
        "data"
    ]


def vm_prop(address: str, name: str, prop: str) -> Any:
    (path,) = manager_call(address, "GetVM", "s", name)
    return busctl(address, "get-property", "org.kvmnuma1", path, "org.kvmnuma1.VM", prop)["data"]


def region_pages(pid: int, vm: str, slot: int) -> dict[int, int]:
    """Resident pages per host node of a VM's memory slot, from the daemon's
    numa_maps: found by its memfd's name (kvmnumad-VM-nodeG-slotS), since the
    bus no longer says where the daemon maps guest memory."""
    name = re.compile(rf"memfd:kvmnumad-{re.escape(vm)}-node\d+-slot{slot}(?!\d)")
    pages: dict[int, int] = {}
    entries = [e for e in numa_maps(pid) if e.file and name.search(e.file)]
    assert entries, f"no mapping of {vm} slot {slot} in /proc/{pid}/numa_maps"
    for entry in entries:
        for node, n in entry.pages_per_node.items():
            pages[node] = pages.get(node, 0) + n
    return pages


# ---------------------------------------------------------------- no service needed


USAGE_ERRORS = [
    ([], "required: COMMAND"),
    (["frobnicate"], "invalid choice"),
    (["create", "x", "--vcpus", "2", "--memory", "12Q"], "invalid size '12Q'"),
    (["create", "x", "--vcpus", "-1", "--memory", "64M"], "--vcpus"),
    (["pin", "x", "0", "3-1"], "invalid range '3-1'"),
    (["pin", "x", "0", "a,b"], "invalid list"),
    (["memory", "x", "0", "1G", "zz"], "invalid size 'zz'"),
    (["create", "x", "--vcpus", "1", "--memory", "1M", "--policy", "fastest"], "invalid choice"),
    (["numa", "x", "enable"], "needs a node count"),
    (["numa", "x", "disable", "2"], "takes no node count"),
    (["--bus", "nonsense", "list"], "invalid bus 'nonsense'"),
    (["migrate", "x", "a", "0"], "GUEST_NODE"),
    (["migrate", "x", "0"], "required: HOST_NODE"),
    (["migrate", "x", "0", "0", "--slot", "-1"], "--slot"),
    (["job-cancel", "web"], "invalid job 'web'"),
    (["job-cancel", "/org/kvmnuma1/vm/web"], "invalid job"),
]


@pytest.mark.parametrize(("args", "needle"), USAGE_ERRORS)
def test_usage_errors_exit_2_with_one_line(args: list[str], needle: str) -> None:
    r = ctl(None, *args, env={"KVMNUMAD_BUS": "unix:path=/nonexistent"})
    assert r.returncode == 2
    assert needle in one_error_line(r, "UsageError")
    assert r.stdout == ""


@pytest.mark.parametrize(("args", "needle"), USAGE_ERRORS)
def test_usage_errors_with_json_are_one_object(args: list[str], needle: str) -> None:
    """--json anywhere, even where the command line breaks before argparse has read it."""
    for where in ("first", "last", "prefix"):
        argv = {"first": ["--json", *args], "last": [*args, "--json"], "prefix": ["--js", *args]}[where]
        r = ctl(None, *argv, env={"KVMNUMAD_BUS": "unix:path=/nonexistent"})
        assert needle in json_error(r, 2, "usage"), where


def test_help_and_version() -> None:
    r = ctl(None, "--help")
    assert r.returncode == 0
    for command in COMMANDS:
        assert command in r.stdout
    assert ctl(None, "--version").stdout.startswith("kvmnumactl ")


def test_service_not_on_bus(empty_bus: str) -> None:
    for args in (["list"], ["show", "web"], ["pin", "web", "0", "0"], ["topology"]):
        r = ctl(empty_bus, *args)
        assert r.returncode == 1
        line = one_error_line(r, "ServiceUnknown")
        assert "org.kvmnuma1" in line and "kvmnumad running" in line


def test_bus_errors_with_json_are_one_object(empty_bus: str) -> None:
    """The full D-Bus error name, so a script matches it exactly; exit 1 as without --json."""
    for args in (
        ["list"],
        ["show", "web"],
        ["pin", "web", "0", "0"],
        ["destroy", "web"],
        ["plan", "--vcpus", "1", "--memory", "0"],
    ):
        message = json_error(ctl(empty_bus, *args, "--json"), 1, "org.freedesktop.DBus.Error.ServiceUnknown")
        assert "kvmnumad running" in message
    nowhere = "unix:path=/nonexistent/kvmnumactl-test"
    for args in (["list"], ["monitor"]):
        assert "cannot connect" in json_error(ctl(nowhere, *args, "--json"), 1, "ConnectFailed")


def test_bus_choice(empty_bus: str) -> None:
    """--bus beats $KVMNUMAD_BUS, which beats the system bus; 'system' and
    'session' follow the standard environment variables.  Reaching ServiceUnknown
    proves the client talked to that bus; ConnectFailed that it tried another."""
    nowhere = "unix:path=/nonexistent/kvmnumactl-test"
    socket_path = empty_bus.split(",", maxsplit=1)[0].removeprefix("unix:path=")
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (["--bus", empty_bus], {"KVMNUMAD_BUS": nowhere}, "ServiceUnknown"),
        (["list", "--bus", empty_bus], {"KVMNUMAD_BUS": nowhere}, "ServiceUnknown"),  # after the command
        ([], {"KVMNUMAD_BUS": empty_bus}, "ServiceUnknown"),
        ([], {"KVMNUMAD_BUS": nowhere}, "ConnectFailed"),
        ([], {"DBUS_SYSTEM_BUS_ADDRESS": empty_bus}, "ServiceUnknown"),  # default: system
        (["--bus", "system"], {"DBUS_SYSTEM_BUS_ADDRESS": empty_bus}, "ServiceUnknown"),
        (["--bus", "session"], {"DBUS_SESSION_BUS_ADDRESS": empty_bus}, "ServiceUnknown"),
        (["--bus", "session"], {"DBUS_SESSION_BUS_ADDRESS": nowhere}, "ConnectFailed"),
        (["--bus", socket_path], {}, "ServiceUnknown"),
    ]
    for opts, env, expected in cases:
        base = {"DBUS_SYSTEM_BUS_ADDRESS": nowhere, "DBUS_SESSION_BUS_ADDRESS": nowhere}
        r = ctl(None, *opts, *([] if "list" in opts else ["list"]), env={**base, **env})
        assert r.returncode == 1, (opts, env, r.stderr)
        one_error_line(r, expected)


def test_interactive_authorization_flag(empty_bus: str) -> None:
    """The ALLOW_INTERACTIVE_AUTHORIZATION flag (4) as `busctl monitor` sees it
    on the wire: set by --ask-password or a terminal on stdin, clear otherwise."""
    # stdbuf: a line per message, read by a thread so that no read blocks the test
    mon = subprocess.Popen(
        ["stdbuf", "-oL", "busctl", f"--address={empty_bus}", "monitor", "--json=short"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert mon.stdout is not None

    def pump() -> None:
        for line in mon.stdout or ():
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()

    def next_line(deadline: float) -> str:
        return lines.get(timeout=max(0.0, deadline - time.monotonic()))

    try:
        # the monitor is attached once it sees our pings (the first ones may come too early)
        deadline = time.monotonic() + 15
        attached = False
        while not attached:
            busctl(
                empty_bus,
                "call",
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "GetId",
            )
            try:
                while not attached:
                    attached = '"GetId"' in lines.get(timeout=0.3)
            except queue.Empty:
                assert time.monotonic() < deadline, "busctl monitor saw nothing in 15 s"
        master, slave = os.openpty()
        try:
            runs = [
                (["--ask-password"], subprocess.DEVNULL, 4),
                (["--no-ask-password"], slave, 0),
                ([], subprocess.DEVNULL, 0),  # no terminal: no prompt
                ([], slave, 4),  # a terminal: polkit may ask
            ]
            for i, (opts, stdin, _flag) in enumerate(runs):
                r = ctl(empty_bus, *opts, "show", f"flagprobe{i}", stdin=stdin)
                assert r.returncode == 1
        finally:
            os.close(master)
            os.close(slave)
        seen: dict[str, int] = {}
        deadline = time.monotonic() + 15
        while len(seen) < len(runs):
            msg = json.loads(next_line(deadline))
            if msg.get("member") == "GetVM":
                seen[msg["payload"]["data"][0]] = msg["flags"]
    finally:
        mon.kill()
        mon.wait()
    assert {name: flags & 4 for name, flags in seen.items()} == {
        f"flagprobe{i}": flag for i, (_o, _s, flag) in enumerate(runs)
    }


def test_monitor_exits_0_on_sigterm_and_sigint(empty_bus: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen(
            [*CLI, "--bus", empty_bus, "monitor"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert proc.stderr is not None
        timer = threading.Timer(20, proc.kill)
        timer.start()
        try:
            assert "Monitoring org.kvmnuma1" in proc.stderr.readline()
            proc.send_signal(sig)
            assert proc.wait(10) == 0
        finally:
            timer.cancel()
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- against kvmnumad


def read_until(proc: subprocess.Popen[str], predicate: Any, seconds: float = 15) -> str:
    """Lines of a running kvmnumactl until one matches; kills it if none does in time."""
    assert proc.stdout is not None
    timer = threading.Timer(seconds, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            if predicate(line):
                return line
    finally:
        timer.cancel()
    raise AssertionError(f"no matching line within {seconds} s")


def test_topology(bus: tuple[str, int]) -> None:
    address, _pid = bus
    nodes = json.loads(ok(address, "topology", "--json"))["nodes"]
    assert {n["node"] for n in nodes} == host_nodes()
    for n in nodes:
        assert set(n["cpus"]) == node_cpus(n["node"])
        assert 0 < n["free_bytes"] <= n["total_bytes"]
        assert len(n["distances"]) == len(nodes)
    (raw,) = manager_call(address, "GetTopology")
    assert [[n["node"], n["cpus"], n["total_bytes"]] for n in nodes] == [r[:3] for r in raw]
    table = ok(address, "topology").splitlines()
    assert table[0].split() == ["NODE", "CPUS", "MEMORY", "FREE", "DISTANCES"]
    first = nodes[0]["node"]
    kernel_text = Path(f"/sys/devices/system/node/node{first}/cpulist").read_text().strip()
    assert table[1].split()[:2] == [str(first), kernel_text]


def test_create_show_list_start_pin_stop_destroy(bus: tuple[str, int]) -> None:
    address, daemon_pid = bus
    path = ok(address, "create", "cli-a", "--vcpus", "2", "--memory", "16M", "--passes", "1").strip()
    assert manager_call(address, "GetVM", "s", "cli-a") == [path]
    assert vm_prop(address, "cli-a", "Vcpus") == 2
    assert vm_prop(address, "cli-a", "MemoryBytes") == 16 << 20
    assert vm_prop(address, "cli-a", "State") == "created"

    listed = json.loads(ok(address, "list", "--json"))["vms"]
    assert {"name": "cli-a", "state": "created", "path": path} in listed
    table = ok(address, "list").splitlines()
    assert table[0].split() == ["NAME", "STATE", "PATH"]
    row = next(line for line in table if line.startswith("cli-a "))
    assert row.split() == ["cli-a", "created", path]
    assert table[0].index("STATE") == row.index("created")  # aligned columns

    assert ok(address, "start", "cli-a") == ""  # silent without --json, as before
    assert vm_prop(address, "cli-a", "State") == "running"
    assert ok(address, "pin", "cli-a", "0", "0") == ""
    ok(address, "pin", "cli-a", "1", "0-1")
    threads = dict(vm_prop(address, "cli-a", "VcpuThreads"))
    assert set(threads.values()) <= thread_ids(daemon_pid)
    assert taskset_affinity(threads[0]) == {0}
    assert taskset_affinity(threads[1]) == {0, 1}
    shown = json.loads(ok(address, "show", "cli-a", "--json"))
    assert sorted(map(tuple, [(v, tuple(c)) for v, c in shown["VcpuAffinity"]])) == [(0, (0,)), (1, (0, 1))]
    assert shown["State"] == "running" and shown["Name"] == "cli-a"
    human = dict(line.split("=", 1) for line in ok(address, "show", "cli-a").splitlines())
    assert human["VcpuAffinity"] == "0:0 1:0-1"
    assert human["Vcpus"] == "2"

    stats = json.loads(ok(address, "stats", "cli-a", "--json"))
    assert isinstance(stats, dict) and stats
    lines = ok(address, "stats", "cli-a").splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("VCPU "))
    assert all("=" in line for line in lines[: header - 1])
    columns = lines[header].split()
    rows = {int(r.split()[0]): r.split() for r in lines[header + 1 :]}
    assert sorted(rows) == [0, 1]
    if "TID" in columns:  # the daemon's thread ids, as busctl reads VcpuThreads
        assert {v: int(r[columns.index("TID")]) for v, r in rows.items()} == threads

    assert ok(address, "stop", "cli-a") == ""
    assert vm_prop(address, "cli-a", "State") == "stopped"
    assert ok(address, "destroy", "cli-a") == ""
    assert "cli-a" not in {v["name"] for v in json.loads(ok(address, "list", "--json"))["vms"]}
    r = ctl(address, "show", "cli-a")
    assert r.returncode == 1
    one_error_line(r, "NoSuchVM")


def test_numa_memory_bind_map(bus: tuple[str, int]) -> None:
    address, daemon_pid = bus
    ok(address, "create", "cli-n", "--vcpus", "2", "--memory", "0")
    try:
        ok(address, "numa", "cli-n", "enable", "2")
        assert vm_prop(address, "cli-n", "NumaEnabled") is True
        assert vm_prop(address, "cli-n", "NumaNodes") == 2
        ok(address, "map", "cli-n", "1", "0")
        assert vm_prop(address, "cli-n", "NodeMap") == [0, 0]
        r = ctl(address, "map", "cli-n", "1", "7")
        assert r.returncode == 1
        one_error_line(r, "NodeOutOfRange")

        # above the daemon's boot slot at [0, 1M): both spellings of an address
        slot0 = int(ok(address, "memory", "cli-n", "0", "8M", "16M"))
        slot1 = json.loads(ok(address, "memory", "cli-n", "1", "8M", "0x1800000", "--json"))["slot"]
        regions = {r[0]: r for r in vm_prop(address, "cli-n", "MemoryRegions")}
        assert regions[slot0][1:5] == [16 << 20, 8 << 20, 0, 0]
        assert regions[slot1][1:5] == [24 << 20, 8 << 20, 1, 0]
        for slot in (slot0, slot1):
            assert set(region_pages(daemon_pid, "cli-n", slot)) <= {0}
        r = ctl(address, "memory", "cli-n", "0", "8M", "20M")
        assert r.returncode == 1
        one_error_line(r, "Overlap")

        ok(address, "bind", "cli-n", "1", "1")
        (path,) = manager_call(address, "GetVM", "s", "cli-n")
        bound = busctl(address, "call", "org.kvmnuma1", path, "org.kvmnuma1.VM", "GetVcpuNumaNode", "u", "1")
        assert bound["data"] == [True, 1] or bound["data"] == [[True, 1]]
        r = ctl(address, "bind", "cli-n", "9", "0")
        assert r.returncode == 1
        one_error_line(r, "NoSuchVcpu")
    finally:
        ok(address, "destroy", "cli-n")

    ok(address, "create", "cli-d", "--vcpus", "1", "--memory", "0")
    try:
        ok(address, "numa", "cli-d", "enable", "2")
        ok(address, "numa", "cli-d", "disable")
        assert vm_prop(address, "cli-d", "NumaEnabled") is False
    finally:
        ok(address, "destroy", "cli-d")


def test_report_suggestions_plan(bus: tuple[str, int]) -> None:
    address, _pid = bus
    assert ctl(address, "report").returncode == 0
    json.loads(ok(address, "report", "--json"))
    assert isinstance(json.loads(ok(address, "suggestions", "--json"))["suggestions"], list)
    before = ok(address, "list", "--json")
    r = ctl(address, "plan", "--vcpus", "2", "--memory", "64M", "--json")
    assert r.returncode == 0, r.stderr
    json.loads(r.stdout)
    assert ok(address, "list", "--json") == before  # a dry run creates nothing


@pytest.mark.parametrize("as_json", [False, True])
def test_monitor_sees_changes(bus: tuple[str, int], as_json: bool) -> None:
    address, _pid = bus
    name = f"cli-m{int(as_json)}"
    proc = subprocess.Popen(
        [*CLI, "--bus", address, "monitor", *(["--json"] if as_json else [])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stderr is not None
        assert "Monitoring org.kvmnuma1" in proc.stderr.readline()
        ok(address, "create", name, "--vcpus", "1", "--memory", "0")
        if as_json:
            added = json.loads(read_until(proc, lambda s: '"InterfacesAdded"' in s))
            assert added["vm"] == name
            ok(address, "pin", name, "0", "1")
            line = read_until(proc, lambda s: '"PropertiesChanged"' in s and "VcpuAffinity" in s)
            changed = json.loads(line)
            assert changed["vm"] == name
            assert changed["args"]["changed"]["VcpuAffinity"] == [[0, [1]]]
        else:
            assert name in read_until(proc, lambda s: " InterfacesAdded " in s)
            ok(address, "pin", name, "0", "1")
            line = read_until(proc, lambda s: " PropertiesChanged " in s and "VcpuAffinity" in s)
            assert f"vm={name}" in line and "VcpuAffinity=0:1" in line
        ok(address, "destroy", name)
        assert name in read_until(proc, lambda s: "InterfacesRemoved" in s)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()
        ctl(address, "destroy", name)


def test_pin_to_offline_cpu_is_refused(bus: tuple[str, int]) -> None:
    address, _pid = bus
    ok(address, "create", "cli-e", "--vcpus", "1", "--memory", "0")
    try:
        r = ctl(address, "pin", "cli-e", "0", "63")  # a CPU this host does not have
        assert r.returncode == 1
        one_error_line(r, "InvalidArgument")
        r = ctl(address, "create", "cli-e", "--vcpus", "1", "--memory", "0")
        assert r.returncode == 1
        one_error_line(r, "AlreadyExists")
        assert 63 not in vm_prop(address, "cli-e", "VcpuAffinity")[0][1]
    finally:
        ok(address, "destroy", "cli-e")


def test_every_command_prints_one_json_object(bus: tuple[str, int]) -> None:
    """Each command once with --json, and each claim its answer makes read back
    by busctl or taskset; monitor, a stream, is test_monitor_sees_changes'."""
    address, daemon_pid = bus
    used: set[str] = set()

    def run(*args: str) -> dict[str, Any]:
        used.add(args[0])
        return ok_json(address, *args)

    name = "cli-j"
    assert {n["node"] for n in run("topology")["nodes"]} == host_nodes()
    assert run("plan", "--vcpus", "1", "--memory", "16M")  # an object, whatever the daemon's plan holds
    created = run("create", name, "--vcpus", "2", "--memory", "0", "--passes", "1")
    try:
        assert created == {"vm": name, "path": manager_call(address, "GetVM", "s", name)[0]}
        assert {"name": name, "state": "created", "path": created["path"]} in run("list")["vms"]
        shown = run("show", name)
        assert shown["Name"] == name and shown["Vcpus"] == vm_prop(address, name, "Vcpus") == 2

        assert run("numa", name, "enable", "2") == {"vm": name, "numa_enabled": True, "numa_nodes": 2}
        assert (vm_prop(address, name, "NumaEnabled"), vm_prop(address, name, "NumaNodes")) == (True, 2)
        assert run("numa", name, "disable") == {"vm": name, "numa_enabled": False}
        assert vm_prop(address, name, "NumaEnabled") is False
        run("numa", name, "enable", "2")

        assert run("map", name, "1", "0") == {"vm": name, "node": 1, "host_node": 0}
        assert vm_prop(address, name, "NodeMap") == [0, 0]
        memory = run("memory", name, "1", "8M", "0x1000000")
        assert memory == {"vm": name, "node": 1, "size": 8 << 20, "gpa": 16 << 20, "slot": memory["slot"]}
        migrated = run("migrate", name, "1", "0")  # job-cancel: tests/test_cli_jobs.py (a job that lasts)
        assert migrated["result"] == "done" and migrated["job"] == f"/org/kvmnuma1/job/{migrated['id']}"
        assert run("jobs") == {"jobs": []} and manager_call(address, "ListJobs") == [[]]
        regions = {r[0]: r for r in vm_prop(address, name, "MemoryRegions")}
        assert regions[memory["slot"]][1:5] == [16 << 20, 8 << 20, 1, 0]
        assert run("bind", name, "1", "1") == {"vm": name, "vcpu": 1, "node": 1}
        (path,) = manager_call(address, "GetVM", "s", name)
        bound = busctl(address, "call", "org.kvmnuma1", path, "org.kvmnuma1.VM", "GetVcpuNumaNode", "u", "1")
        assert bound["data"] in ([True, 1], [[True, 1]])

        assert run("start", name) == {"vm": name, "state": "running"}
        assert vm_prop(address, name, "State") == "running"
        cpus = sorted(online_cpus())[:2]
        pinned = run("pin", name, "0", ",".join(map(str, reversed(cpus))))
        assert pinned == {"vm": name, "vcpu": 0, "cpus": cpus}  # sorted, as the kernel lists them
        threads = dict(vm_prop(address, name, "VcpuThreads"))
        assert threads[0] in thread_ids(daemon_pid)
        assert taskset_affinity(threads[0]) == set(cpus)
        assert run("stats", name)
        assert run("stop", name) == {"vm": name, "state": "stopped"}
        assert vm_prop(address, name, "State") == "stopped"

        r = ctl(address, "pin", name, "0", "63", "--json")
        assert "63" in json_error(r, 1, "org.kvmnuma1.Error.InvalidArgument")
        assert taskset_affinity(threads[0]) == set(cpus)  # a refusal changes nothing
        json_error(
            ctl(address, "create", name, "--vcpus", "1", "--memory", "0", "--json"),
            1,
            "org.kvmnuma1.Error.AlreadyExists",
        )
        json_error(ctl(address, "bind", name, "9", "0", "--json"), 1, "org.kvmnuma1.Error.NoSuchVcpu")
    finally:
        destroyed = ctl(address, "destroy", name, "--json")
    assert destroyed.returncode == 0, destroyed.stderr
    used.add("destroy")
    assert json.loads(destroyed.stdout) == {"vm": name, "state": "destroyed"}
    assert name not in {vm[0] for vm in manager_call(address, "ListVMs")[0]}
    for args in (["show", name], ["destroy", name], ["stats", name]):
        assert name in json_error(ctl(address, *args, "--json"), 1, "org.kvmnuma1.Error.NoSuchVM")

    report = run("report")
    if set(report) == {"report"}:  # a text report, as the bus gives it
        assert isinstance(report["report"], str)
    suggestions = run("suggestions")["suggestions"]
    assert all(set(s) == {"vm", "action", "reason"} for s in suggestions)
    assert used == set(COMMANDS) - {"monitor", "job-cancel"}
