"""Send a fuzzed call to a real kvmnumad process and check the invariants after it.

After every call (``Harness.send``):
- the daemon answers Peer.Ping;
- a refusal has a name the call allows (strategies.Call.allowed) and never
  org.freedesktop.DBus.Error.Failed, NoReply or org.kvmnuma1.Error.Internal,
  and its text holds no traceback;
- a refused call changed nothing: ListVMs, every VM's GetAll, the Manager's
  GetAll and the daemon's open fds (/proc/PID/fd) are as before;
- every vCPU thread's affinity as the kernel has it (sched_getaffinity, the
  call taskset makes; ``taskset=True`` runs taskset itself) equals its
  VcpuAffinity;
- the daemon's log gained no traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType, Variant

from kvmnumad.bus.properties import SAMPLED_MANAGER_PROPERTIES, SAMPLED_VM_PROPERTIES
from tests.busfixtures import BusClient, plain
from tests.fuzzing.strategies import (
    ACCESS_DENIED,
    MANAGER_IFACE,
    MANAGER_PATH,
    VM_IFACE,
    Call,
    Payload,
)
from tests.observe import taskset_affinity

BUS_NAME = "org.kvmnuma1"
FORBIDDEN = ("org.freedesktop.DBus.Error.Failed", "org.freedesktop.DBus.Error.NoReply",
             "org.kvmnuma1.Error.Internal", "org.freedesktop.DBus.Error.ServiceUnknown",
             "org.freedesktop.DBus.Error.Timeout", "NoReply", "Disconnected")
TRACEBACK_MARKERS = ("Traceback (most recent call last)", 'File "/')
PROPS = "org.freedesktop.DBus.Properties"
PROXY = Path(__file__).with_name("unpriv_proxy.py")
MAX_PAYLOAD_PLUS = 1044480 + 1


class Violation(AssertionError):
    """An invariant did not hold after a call."""


@dataclass
class Outcome:
    error: str | None
    text: str
    body: list[Any]

    def __str__(self) -> str:
        return f"{self.error}: {self.text[:300]}" if self.error else f"ok {str(self.body)[:300]}"


@dataclass(frozen=True)
class Snapshot:
    vms: tuple[tuple[str, str, str], ...]
    props: dict[str, dict[str, Any]]
    manager: dict[str, Any]
    fds: int

    def diff(self, other: Snapshot) -> str:
        out = []
        if self.vms != other.vms:
            out.append(f"ListVMs {self.vms} -> {other.vms}")
        for path in sorted(set(self.props) | set(other.props)):
            a, b = self.props.get(path, {}), other.props.get(path, {})
            out += [f"{path} {k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)]
        keys = sorted(set(self.manager) | set(other.manager))
        out += [f"Manager {k}: {self.manager.get(k)!r} -> {other.manager.get(k)!r}"
                for k in keys if self.manager.get(k) != other.manager.get(k)]
        if self.fds != other.fds:
            out.append(f"daemon fds {self.fds} -> {other.fds}")
        return "; ".join(out)


class UnprivClient:
    """unpriv_proxy.py run as ``user`` under /usr/bin/python3: one JSON line per call."""

    def __init__(self, user: Any, address: str) -> None:
        self.user, self.address = user, address
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            ["runuser", "-u", self.user.name, "--", "/usr/bin/python3", "-c", PROXY.read_text(),
             self.address],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, cwd="/",
        )
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert "ready" in ready, ready
        return proc

    def call(self, call: Call) -> Outcome:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        req = {"path": call.path, "iface": call.iface, "member": call.member, "signature": call.signature,
               "body": [_tag(b) for b in call.body]}
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        reply: dict[str, Any] = (json.loads(line) if line else
                                 {"error": "Disconnected", "text": "the client died", "body": []})
        if reply["error"] == "Disconnected":  # the next call gets a fresh client; this one is reported
            self.close()
            self.proc = self._spawn()
        return Outcome(reply["error"], reply["text"], reply["body"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _tag(value: Any) -> Any:
    """JSON for the proxy.  Strings go as ASCII (non-ASCII backslash-escaped):
    Debian's dbus-fast 1.84, which the proxy runs on, marshals a non-ASCII
    string with a wrong length and the bus hangs up on it (see
    test_a_non_ascii_name_does_not_cut_the_packaged_daemon_off_the_bus)."""
    if isinstance(value, str):
        return value.encode("ascii", "backslashreplace").decode()
    if isinstance(value, Variant):
        return {"$v": [value.signature, _tag(value.value)]}
    if isinstance(value, dict):
        return {_tag(k): _tag(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_tag(v) for v in value]
    return value


@dataclass
class Harness:
    client: BusClient
    pid: int
    log: Path
    user: UnprivClient | None = None
    calls: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    _snap: Snapshot | None = None
    _log_offset: int = 0
    _tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kvmnuma-fuzz-")))

    def __post_init__(self) -> None:
        self._tmp.chmod(0o755)
        self._log_offset = self.log.stat().st_size

    # ------------------------------------------------------------ observing
    def snapshot(self) -> Snapshot:
        vms = tuple(sorted(tuple(v) for v in self.client.manager("ListVMs")[0]))
        props = {}
        for _name, _state, path in vms:
            reply = self.client.call(BUS_NAME, path, PROPS, "GetAll", "s", [VM_IFACE])
            if reply.message_type == MessageType.ERROR:  # destroyed between the two reads: say so
                props[path] = {"<error>": reply.error_name}
            else:
                props[path] = {k: plain(v) for k, v in reply.body[0].items()
                               if k not in SAMPLED_VM_PROPERTIES}
        # Measured figures (residency, CPU time, busy) move by themselves, call or no call.
        manager = {k: v for k, v in self.client.get_all(MANAGER_PATH, MANAGER_IFACE).items()
                   if k not in SAMPLED_MANAGER_PROPERTIES}
        return Snapshot(vms, props, manager, _held_fds(self.pid))

    def state(self) -> Snapshot:
        if self._snap is None:
            self._snap = self.snapshot()
        return self._snap

    def forget(self) -> None:
        """State changed outside send(): the next check reads it afresh."""
        self._snap = None

    def ping(self) -> None:
        reply = self.client.call(BUS_NAME, "/", "org.freedesktop.DBus.Peer", "Ping", timeout=10)
        if reply.message_type != MessageType.METHOD_RETURN:
            raise Violation(f"the daemon does not answer Peer.Ping: {reply.error_name} {reply.body}")

    def check_affinity(self, snap: Snapshot, *, taskset: bool = False) -> None:
        for path, props in snap.props.items():
            if "VcpuThreads" not in props:
                continue
            declared = {v: set(cpus) for v, cpus in props["VcpuAffinity"]}
            for vcpu, tid in props["VcpuThreads"]:
                try:
                    kernel = taskset_affinity(tid) if taskset else os.sched_getaffinity(tid)
                except (ProcessLookupError, subprocess.CalledProcessError) as e:
                    raise Violation(f"{path} vCPU {vcpu}: thread {tid} is gone ({e})") from e
                if Path(f"/proc/{self.pid}/task/{tid}").exists() is False:
                    raise Violation(f"{path} vCPU {vcpu}: thread {tid} is not the daemon's")
                if kernel != declared.get(vcpu):
                    raise Violation(f"{path} vCPU {vcpu} (tid {tid}): kernel affinity {sorted(kernel)} "
                                    f"!= VcpuAffinity {sorted(declared.get(vcpu, set()))}")

    def check_log(self) -> None:
        with self.log.open("rb") as f:
            f.seek(self._log_offset)
            new = f.read().decode(errors="replace")
        self._log_offset += len(new.encode(errors="replace"))
        if "Traceback" in new:
            raise Violation(f"the daemon logged a traceback:\n{new[-3000:]}")

    def check(self, *, taskset: bool = False) -> Snapshot:
        """The invariants that hold whatever the last call was."""
        self.ping()
        snap = self._snap = self.snapshot()
        self.check_affinity(snap, taskset=taskset)
        self.check_log()
        return snap

    # ------------------------------------------------------------ calling
    def _open_payload(self, payload: Payload) -> tuple[int, list[str]]:
        made: list[str] = []
        p = self._tmp / f"payload-{self.calls}"
        if payload.kind == "fifo":
            os.mkfifo(p)
            made.append(str(p))
            return os.open(p, os.O_RDWR | os.O_NONBLOCK), made
        if payload.kind == "devnull":
            return os.open("/dev/null", os.O_RDONLY), made
        if payload.kind == "dir":
            return os.open(self._tmp, os.O_RDONLY | os.O_DIRECTORY), made
        data = {"tiny": b"\xf4\xeb\xfd", "empty": b"", "random": payload.data}.get(payload.kind, b"")
        p.write_bytes(data)
        made.append(str(p))
        if payload.kind == "huge":
            os.truncate(p, MAX_PAYLOAD_PLUS + 4096)  # sparse: past the limit, nothing written
        return os.open(p, os.O_RDONLY), made

    def raw(self, call: Call, timeout: float = 15) -> Outcome:
        """Send ``call`` (as root or the unprivileged user) and return what came back."""
        if call.as_user:
            assert self.user is not None
            return self.user.call(call)
        fds: list[int] = []
        made: list[str] = []
        if call.payload is not None:
            fd, made = self._open_payload(call.payload)
            fds.append(fd)
        try:
            msg = Message(destination=BUS_NAME, path=call.path, interface=call.iface, member=call.member,
                          signature=call.signature, body=list(call.body), unix_fds=fds)
            try:
                reply = self.client._loop.run(self.client.bus.call(msg), timeout)
            except TimeoutError:
                return Outcome("NoReply", f"no reply within {timeout} s", [])
        finally:
            for fd in fds:
                os.close(fd)
            for path in made:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else str(reply.body)
            return Outcome(reply.error_name or "", text, [])
        return Outcome(None, "", [plain(v) for v in reply.body])

    def send(self, call: Call, *, taskset: bool = False) -> Outcome:
        """One fuzzed call and every invariant after it (module doc)."""
        before = self.state()
        out = self.raw(call)
        self.calls += 1
        where = f"{call!r} -> {out}"
        if out.error is not None:
            self.refusals[out.error] = self.refusals.get(out.error, 0) + 1
            if out.error in FORBIDDEN:
                raise Violation(f"forbidden error: {where}")
            if any(m in out.text for m in TRACEBACK_MARKERS):
                raise Violation(f"a traceback in the error text: {where}")
            if out.error not in call.allowed:
                raise Violation(f"{out.error} is not an error this call may answer: {where}")
            if call.expect is not None and out.error not in (call.expect, ACCESS_DENIED,
                                                             "org.freedesktop.DBus.Error.UnknownObject"):
                raise Violation(f"expected {call.expect}: {where}")
        elif call.as_user and call.mutating:
            raise Violation(f"an unprivileged mutation succeeded: {where}")
        after = self.check(taskset=taskset)
        if out.error is not None and after != before:
            after = self._settled(before)  # a received fd may close just after the reply
            if after != before:
                raise Violation(f"a refused call changed the state: {where}\n  {before.diff(after)}")
        return out

    def _settled(self, before: Snapshot) -> Snapshot:
        deadline = time.monotonic() + 2
        snap = self.snapshot()
        while snap != before and time.monotonic() < deadline:
            time.sleep(0.05)
            snap = self.snapshot()
        self._snap = snap
        return snap

    def close(self) -> None:
        if self.user is not None:
            self.user.close()
        with contextlib.suppress(OSError):
            for p in self._tmp.iterdir():
                p.unlink()
            self._tmp.rmdir()


def _held_fds(pid: int) -> int:
    """The daemon's open fds less the /proc and /sys files its sampling and
    balancing timers read (open, read, close, off the loop): those come and go
    by themselves, call or no call, as the sampled properties do."""
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue  # closed while listed: one of those reads
        if not target.startswith(("/proc/", "/sys/")):
            held += 1
    return held
