"""CreateVM's payload comes as an fd the caller opened (issue 12 finding 1).

Before: ``payload=/etc/shadow`` (type ``s``) made the daemon open the path as
root; its errors told whether a file under a 0700 directory existed and its
size; a FIFO blocked a worker thread for good.  Now a path is refused, the fd
must be a regular file, and the daemon holds no fd of a call once it is
answered.  Observed from outside: busctl as an unprivileged user, the
daemon's /proc/self/fd, timings of a second caller.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from dbus_fast import Message, MessageType, Variant

from tests.busfixtures import MANAGER_IFACE, MANAGER_PATH, BusClient, BusDaemon, RunningService, busctl
from tests.waiting import wait_until

if TYPE_CHECKING:
    from tests.sysfixtures import User

HLT_LOOP = bytes([0xF4, 0xEB, 0xFD])  # hlt; jmp $-1
INVALID = "org.kvmnuma1.Error.InvalidArgument"
KVMNUMACTL = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "kvmnumactl"


def create_with_fd(client: BusClient, name: str, fd: int | None, signature: str = "h") -> Message:
    """CreateVM(name, 1, 0, {payload: <h 0>}) carrying ``fd`` (None: no fd at all)."""
    value: object = 0 if signature == "h" else fd
    msg = Message(destination="org.kvmnuma1", path=MANAGER_PATH, interface=MANAGER_IFACE, member="CreateVM",
                  signature="suta{sv}", body=[name, 1, 0, {"payload": Variant(signature, value)}],
                  unix_fds=[] if fd is None else [fd])
    reply = client._loop.run(client.bus.call(msg), 30)
    assert reply is not None
    return reply


def daemon_fds() -> set[str]:
    """What the service process (this test process) has open, by target."""
    out = set()
    for entry in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            out.add(os.readlink(f"/proc/self/fd/{entry}"))
    return out


def test_a_path_is_refused_saying_to_pass_an_fd(service: RunningService, client: BusClient) -> None:
    name, text = client.error("org.kvmnuma1", MANAGER_PATH, MANAGER_IFACE, "CreateVM", "suta{sv}",
                              ["shadow", 1, 0, {"payload": Variant("s", "/etc/shadow")}])
    assert name == INVALID
    assert "file descriptor" in text and "type 'h'" in text
    assert client.manager("ListVMs") == [[]]


def test_the_unprivileged_get_the_same_answer_for_any_path(service: RunningService, bus_daemon: BusDaemon,
                                                          unpriv_user: User, tmp_path: Path) -> None:
    """No existence or size oracle: a file that exists under a 0700 directory,
    one that does not, and /etc/shadow get one and the same reply."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "secret").write_bytes(b"x" * 12345)
    answers = set()
    for path in ("/etc/shadow", str(private / "secret"), str(private / "absent")):
        out = busctl(bus_daemon.address, "call", "org.kvmnuma1", MANAGER_PATH, MANAGER_IFACE, "CreateVM",
                     "suta{sv}", "probe", "1", "0", "1", "payload", "s", path,
                     user=unpriv_user.name, check=False, json_=False)
        assert out.returncode != 0
        answers.add(out.stderr.strip().replace(path, "<path>"))
    assert len(answers) == 1, answers
    (answer,) = answers
    assert "file descriptor" in answer and "12345" not in answer
    assert busctl(bus_daemon.address, "call", "org.kvmnuma1", MANAGER_PATH, MANAGER_IFACE,
                  "ListVMs") == {"type": "a(sso)", "data": [[]]}


def test_kvmnumactl_passes_a_file_it_opened(service: RunningService, bus_daemon: BusDaemon,
                                            tmp_path: Path) -> None:
    """busctl (252) cannot send an ``h`` ("UNIX file descriptor not supported
    as type"): kvmnumactl opens the file with its user's rights and sends the fd."""
    code = tmp_path / "code.bin"
    code.write_bytes(HLT_LOOP)
    out = subprocess.run([str(KVMNUMACTL), "--bus", bus_daemon.address, "create", "byfd", "--vcpus", "1",
                          "--memory", "0", "--payload", str(code)],
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "/org/kvmnuma1/vm/byfd"
    assert service.manager.get_vm("byfd").payload == HLT_LOOP
    wait_until(lambda: str(code) not in daemon_fds(), "the daemon to close the fd", timeout=5)
    missing = subprocess.run([str(KVMNUMACTL), "--bus", bus_daemon.address, "create", "nofile",
                              "--vcpus", "1", "--memory", "0", "--payload", str(tmp_path / "absent")],
                             capture_output=True, text=True, timeout=30, check=False)
    assert missing.returncode == 1 and "PayloadUnreadable" in missing.stderr  # kvmnumactl could not open it


@pytest.mark.parametrize("kind", ["fifo", "socket", "device", "directory"])
def test_anything_but_a_regular_file_is_refused_at_once(service: RunningService, client: BusClient,
                                                        tmp_path: Path, kind: str) -> None:
    """A FIFO nobody writes to once blocked a worker for good; now fstat refuses
    it before any read, and the service answers others at once."""
    if kind == "fifo":
        os.mkfifo(tmp_path / "fifo")
        fd = os.open(tmp_path / "fifo", os.O_RDWR | os.O_NONBLOCK)
    elif kind == "socket":
        a, b = __import__("socket").socketpair()
        fd = os.dup(a.fileno())
        a.close()
        b.close()
    elif kind == "device":
        fd = os.open("/dev/zero", os.O_RDONLY)
    else:
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        started = time.monotonic()
        reply = create_with_fd(client, f"not-{kind}", fd)
        took = time.monotonic() - started
    finally:
        os.close(fd)
    assert reply.message_type == MessageType.ERROR and reply.error_name == INVALID, reply.body
    assert "regular file" in reply.body[0]
    assert took < 2
    started = time.monotonic()
    assert client.manager("ListVMs") == [[]]
    assert time.monotonic() - started < 1


def test_a_file_too_big_is_refused_without_reading_it_all(service: RunningService, client: BusClient,
                                                          tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(64 << 30)  # 64 GiB, sparse: reading it all would take the daemon's memory
    fd = os.open(big, os.O_RDONLY)
    try:
        reply = create_with_fd(client, "big", fd)
    finally:
        os.close(fd)
    assert reply.error_name == INVALID and "more than" in reply.body[0]
    assert client.manager("ListVMs") == [[]]


def test_fds_the_body_does_not_name_are_closed(service: RunningService, client: BusClient,
                                               tmp_path: Path) -> None:
    """dbus-fast never closes received fds: a peer could fill the daemon's fd
    table by sending fds with any call.  bus/fds.py closes every one."""
    marker = tmp_path / "marker"
    marker.write_bytes(b"m")
    fds = [os.open(marker, os.O_RDONLY) for _ in range(8)]
    try:
        msg = Message(destination="org.kvmnuma1", path=MANAGER_PATH, interface=MANAGER_IFACE,
                      member="ListVMs", unix_fds=fds)
        reply = client._loop.run(client.bus.call(msg), 30)
        assert reply is not None and reply.message_type == MessageType.METHOD_RETURN
        reply = create_with_fd(client, "denied name!", fds[0])  # refused by the name check
        assert reply.error_name == INVALID
    finally:
        for fd in fds:
            os.close(fd)
    # dbus-fast's reader keeps the last message it read until the next one
    # arrives: an fd of a refused call lives until then, never longer.
    assert client.manager("ListVMs") == [[]]
    wait_until(lambda: str(marker) not in daemon_fds(), "every passed fd closed", timeout=5)


def test_a_regular_file_fd_loads_the_callers_code(service: RunningService, client: BusClient,
                                                  tmp_path: Path) -> None:
    code = tmp_path / "code.bin"
    code.write_bytes(HLT_LOOP)
    code.chmod(stat.S_IRUSR)
    fd = os.open(code, os.O_RDONLY)
    try:
        os.lseek(fd, 2, os.SEEK_SET)  # the caller's offset does not matter: read from 0
        reply = create_with_fd(client, "mine", fd)
    finally:
        os.close(fd)
    assert reply.message_type == MessageType.METHOD_RETURN, reply.body
    assert service.manager.get_vm("mine").payload == HLT_LOOP
    wait_until(lambda: str(code) not in daemon_fds(), "the daemon to close the passed fd", timeout=5)
