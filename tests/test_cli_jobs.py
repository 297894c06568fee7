"""kvmnumactl migrate, jobs and job-cancel against the real kvmnumad on a real bus.

The host has one NUMA node, so every job moves guest node 0 to host node 0,
where its pages are already: a real job (the policy is set, every chunk is a
move_pages query on the live region) with nothing to move, as in
tests/test_bus_jobs.py.  The daemon moves one page per chunk
(``--migration-chunk-pages 1``), so that a 1 GiB node's job runs for
seconds (262,144 chunks, 8-20 s on this machine) and can be listed,
cancelled and interrupted while it runs, and a 256 MiB one's is run to its end.

Each claim is read back by someone other than kvmnumactl: busctl for the
jobs and the VM, ``busctl monitor`` for what the client sent while it waited.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.test_cli import (
    CLI,
    ROOT,
    busctl,
    ctl,
    daemon_on_bus,
    json_error,
    manager_call,
    ok,
    ok_json,
    one_error_line,
    read_until,
    vm_prop,
)
from tests.waiting import wait_until

JOB_IFACE = "org.kvmnuma1.Job"
LONG = "cli-long"  # 1 GiB on one guest node: jobs cancelled while they run
MID = "cli-mid"  # 256 MiB: a job of seconds that is waited for


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    with daemon_on_bus(tmp_path_factory, "--migration-chunk-pages", "1") as (address, pid):
        ok(address, "create", LONG, "--vcpus", "1", "--memory", "1G", "--numa-nodes", "1",
           "--prealloc", "--start")
        ok(address, "create", MID, "--vcpus", "1", "--memory", "256M", "--numa-nodes", "1",
           "--prealloc", "--start")
        ok(address, "create", "cli-short", "--vcpus", "1", "--memory", "4M", "--numa-nodes", "1",
           "--prealloc", "--start")
        yield address, pid


def jobs(address: str) -> list[list[Any]]:
    """ListJobs' rows, as busctl reads them."""
    return list(manager_call(address, "ListJobs")[0])


def job_exists(address: str, path: str) -> bool:
    out = subprocess.run(["busctl", f"--address={address}", "get-property", "org.kvmnuma1", path, JOB_IFACE,
                          "State"], capture_output=True, text=True, check=False)
    return out.returncode == 0


def running_job(address: str) -> list[Any]:
    """The one job running, once busctl lists it."""
    rows: list[list[Any]] = wait_until(lambda: jobs(address), "a job listed", timeout=15)
    assert len(rows) == 1, rows
    return rows[0]


def wait_no_jobs(address: str) -> None:
    wait_until(lambda: jobs(address) == [], "no job listed", timeout=30)


def busctl_cancel(address: str, path: str, *, check: bool = True) -> None:
    """Job.Cancel by busctl (no --json: the reply has no body to render)."""
    subprocess.run(["busctl", f"--address={address}", "call", "org.kvmnuma1", path, JOB_IFACE, "Cancel"],
                   capture_output=True, text=True, check=check)


def cancel_all(address: str) -> None:
    """After a failed test: no job of it may run into the next one."""
    for row in jobs(address):
        busctl_cancel(address, row[1], check=False)
    wait_no_jobs(address)


def test_migrate_waits_for_the_job_and_exits_0_when_done(bus: tuple[str, int]) -> None:
    address, _pid = bus
    vm = "cli-short"
    assert ok(address, "migrate", vm, "0", "0") == ""  # silent on success, as map
    done = ok_json(address, "migrate", vm, "0", "0")
    assert done == {"vm": vm, "node": 0, "host_node": 0, "job": f"/org/kvmnuma1/job/{done['id']}",
                    "id": done["id"], "result": "done", "pages_moved": 0, "pages_total": 0,
                    "failed_pages": []}
    slot = ok_json(address, "migrate", vm, "0", "0", "--slot", "1")
    assert slot["slot"] == 1 and slot["result"] == "done" and slot["id"] > done["id"]
    assert jobs(address) == []
    assert not job_exists(address, done["job"])
    assert vm_prop(address, vm, "NodeMap") == [0]
    (path,) = manager_call(address, "GetVM", "s", vm)
    decisions = busctl(address, "call", "org.kvmnuma1", path, "org.kvmnuma1.VM", "GetDecisions")["data"][0]
    assert any(d[0] == "guest node 0" and d[2] == "caller-migrate" for d in decisions), decisions


def test_progress_is_one_line_on_a_terminal(bus: tuple[str, int]) -> None:
    """On a terminal (stderr a pty) the job's progress is a line rewritten in place, ended
    once the job is; a pipe, as in the other tests, gets none of it."""
    address, _pid = bus
    master, slave = os.openpty()
    try:
        r = subprocess.run([*CLI, "--bus", address, "migrate", "cli-short", "0", "0"],
                           stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, text=True,
                           cwd=ROOT, timeout=30, check=False)
        os.close(slave)
        slave = -1
        shown = b""
        with contextlib.suppress(OSError):  # EIO once the pty's last writer is gone
            while chunk := os.read(master, 4096):
                shown += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert r.returncode == 0 and r.stdout == ""
    text = shown.decode()
    assert re.fullmatch(r"(\r\S[^\r\n]*\x1b\[K)+\r?\n", text), text  # \r rewrites, \x1b[K clears the rest
    assert re.search(r"job \d+ \(cli-short guest node 0 to host node 0\): 0/0 pages moved", text), text


def test_monitor_prints_job_signals(bus: tuple[str, int]) -> None:
    address, _pid = bus
    proc = subprocess.Popen([*CLI, "--bus", address, "monitor", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stderr is not None
        assert "Monitoring org.kvmnuma1" in proc.stderr.readline()
        done = ok_json(address, "migrate", "cli-short", "0", "0")
        new = json.loads(read_until(proc, lambda s: '"JobNew"' in s))
        removed = json.loads(read_until(proc, lambda s: '"JobRemoved"' in s))
        (vm_path,) = manager_call(address, "GetVM", "s", "cli-short")
        assert new["vm"] == "cli-short"
        assert new["args"] == {"id": done["id"], "job": done["job"], "vm": vm_path}
        assert removed["vm"] == "cli-short" and removed["args"]["result"] == "done"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()


class Monitor:
    """``busctl monitor`` of the whole bus, its messages read on a thread."""

    def __init__(self, address: str) -> None:
        self.proc = subprocess.Popen(["stdbuf", "-oL", "busctl", f"--address={address}", "monitor",
                                      "--json=short"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.address = address
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + 15
        # attached once it sees our pings (the first ones may come too early)
        while not any(m.get("member") == "GetId" for m in self.drain(0.3)):
            assert time.monotonic() < deadline, "busctl monitor saw nothing in 15 s"
            busctl(address, "call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                   "GetId")

    def _pump(self) -> None:
        for line in self.proc.stdout or ():
            self.lines.put(json.loads(line))

    def drain(self, wait: float) -> list[dict[str, Any]]:
        out = []
        try:
            while True:
                out.append(self.lines.get(timeout=wait))
        except queue.Empty:
            return out

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_migrate_follows_the_job_on_signals_not_by_polling(bus: tuple[str, int]) -> None:
    """What the client sends while a job of seconds runs, as busctl monitor sees it:
    its setup and one call each, however long the job; the end comes as JobRemoved."""
    address, _pid = bus
    mon = Monitor(address)
    try:
        start = time.monotonic()
        done = ok_json(address, "migrate", MID, "0", "0")
        took = time.monotonic() - start
        seen = mon.drain(1.0)
    finally:
        mon.close()
    assert done["result"] == "done"
    assert took > 1.0, f"the job took only {took:.2f} s: too short to tell waiting from polling"
    (call,) = [m for m in seen if m.get("member") == "MigrateNumaNode"]
    client = call["sender"]
    sent = collections.Counter(m["member"] for m in seen if m.get("type") == "method_call"
                               and m.get("sender") == client)
    # Hello, three AddMatch (JobRemoved, the jobs' PropertiesChanged, the service's owner), GetVM,
    # MigrateNumaNode, one GetAll of the job
    assert sent["AddMatch"] == 3 and sent["MigrateNumaNode"] == 1, sent
    assert all(n == 1 for member, n in sent.items() if member != "AddMatch"), sent
    assert sum(sent.values()) <= 8, sent
    removed = [m for m in seen if m.get("member") == "JobRemoved"]
    assert [m["payload"]["data"][1] for m in removed] == [done["job"]]
    assert removed[0]["payload"]["data"][3] == "done"


def test_no_wait_then_jobs_then_job_cancel(bus: tuple[str, int]) -> None:
    address, _pid = bus
    path = ok(address, "migrate", LONG, "0", "0", "--no-wait").strip()
    assert re.fullmatch(r"/org/kvmnuma1/job/\d+", path), path
    number = int(path.rsplit("/", 1)[1])
    try:
        (vm_path,) = manager_call(address, "GetVM", "s", LONG)
        assert jobs(address) == [[number, path, vm_path, 0, 0, "running"]]
        listed = ok_json(address, "jobs")["jobs"]
        assert len(listed) == 1
        assert listed[0] == {
            "id": number, "job": path, "vm": LONG, "vm_path": vm_path, "node": 0, "slot": 0, "host_node": 0,
            "state": "running", "pages_moved": 0, "pages_total": 0, "failed_pages": []}
        table = ok(address, "jobs").splitlines()
        assert table[0].split() == ["JOB", "VM", "NODE", "SLOT", "HOST-NODE", "STATE", "PAGES"]
        assert table[1].split()[:6] == [str(number), LONG, "0", "-", "0", "running"]
        assert table[-1] == "1 job listed."

        # a second job on the same guest node is the service's Busy, and starts nothing
        r = ctl(address, "migrate", LONG, "0", "0", "--json")
        assert f"job {number}" in json_error(r, 1, "org.kvmnuma1.Error.Busy")
        assert [row[0] for row in jobs(address)] == [number]

        cancelled = ok_json(address, "job-cancel", str(number))
        assert cancelled == {"id": number, "job": path, "result": "cancelled"}
        # gone when job-cancel returns: it waited for JobRemoved
        assert jobs(address) == [] and not job_exists(address, path)
    finally:
        cancel_all(address)
    assert vm_prop(address, LONG, "State") == "running"
    r = ctl(address, "job-cancel", path)  # by its path this time
    assert r.returncode == 1
    assert f"no job {number}" in one_error_line(r, "UnknownObject")
    r = ctl(address, "job-cancel", str(number), "--json")
    json_error(r, 1, "org.freedesktop.DBus.Error.UnknownObject")
    assert ok(address, "jobs") == "No jobs running.\n"
    assert ok_json(address, "jobs") == {"jobs": []}


def migrate_until(address: str, argv: list[str],
                  act: Callable[[subprocess.Popen[str], str], object]) -> tuple[int, str, str, int, str]:
    """``kvmnumactl ARGV`` waiting on its job, ``act(proc, job path)`` once the job runs, then
    its exit: (status, stdout, stderr, job number, job path); no job is left either way."""
    proc = subprocess.Popen([*CLI, "--bus", address, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        number, path = running_job(address)[:2]
        act(proc, path)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
        cancel_all(address)
    return proc.returncode, out, err, number, path


@pytest.mark.parametrize("as_json", [False, True])
def test_ctrl_c_cancels_the_job_and_says_so(bus: tuple[str, int], as_json: bool) -> None:
    address, _pid = bus
    argv = ["migrate", LONG, "0", "0", *(["--json"] if as_json else [])]
    returncode, out, err, number, path = migrate_until(
        address, argv, lambda proc, _path: proc.send_signal(signal.SIGINT))
    assert returncode == 130, err
    assert out == ""
    if as_json:
        (line,) = err.splitlines()
        error = json.loads(line)
        assert error["error"] == "interrupted" and f"cancelled job {number}" in error["message"], error
    else:
        lines = err.splitlines()
        assert lines[0] == f"Cancelling job {number}...", err
        assert lines[-1].startswith(f"kvmnumactl: cancelled job {number}: "), err
        assert "stays mapped where it was" in lines[-1]
    # cancelled, per the bus: no job left, its object gone, the VM running on
    assert jobs(address) == [] and not job_exists(address, path)
    assert vm_prop(address, LONG, "State") == "running"


def test_a_job_cancelled_by_someone_else_fails_the_waiting_migrate(bus: tuple[str, int]) -> None:
    address, _pid = bus
    returncode, out, err, number, _path = migrate_until(
        address, ["migrate", LONG, "0", "0"], lambda _proc, path: busctl_cancel(address, path))
    assert returncode == 1, err
    assert out == ""
    line = one_error_line(subprocess.CompletedProcess([], 1, out, err), "JobCancelled")
    assert f"job {number} was cancelled" in line


def test_refusals_are_typed_and_start_no_job(bus: tuple[str, int]) -> None:
    address, _pid = bus
    ok(address, "create", "cli-flat", "--vcpus", "1", "--memory", "4M", "--numa-nodes", "0")
    try:
        cases = [
            (["cli-none", "0", "0"], "NoSuchVM", "cli-none"),
            ([LONG, "1", "0"], "NodeOutOfRange", "guest node 1"),
            ([LONG, "0", "7"], "NodeOutOfRange", "host node 7"),
            ([LONG, "0", "0", "--slot", "9"], "InvalidArgument", "slot 9"),
            (["cli-flat", "0", "0"], "NumaDisabled", "disabled"),
        ]
        for args, name, text in cases:
            r = ctl(address, "migrate", *args)
            assert r.returncode == 1, (args, r.stderr)
            assert text in one_error_line(r, name)
            assert "Traceback" not in r.stderr
        # the full name with --json (main.py's one path for every command; once is enough here)
        r = ctl(address, "migrate", LONG, "0", "7", "--json")
        assert "host node 7" in json_error(r, 1, "org.kvmnuma1.Error.NodeOutOfRange")
        assert jobs(address) == []
    finally:
        ok(address, "destroy", "cli-flat")
