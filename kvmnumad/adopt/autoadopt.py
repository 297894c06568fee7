"""Optional auto-adopt: processes of configured executables or cgroups are
adopted as the kernel reports their exec, through the netlink proc
connector (``linux/cn_proc.h``), read from the event loop.  /proc is never
scanned in a loop: the kernel says when a process execs, and only that pid
is looked at.

A VMM makes its KVM VM and vCPU threads some time after its exec, so a
matching process is tried a few times on a back-off (``RETRY_DELAYS``,
timers on the loop, each attempt one worker call) until it can be adopted,
and given up on after that.  ``adopt.conf`` in the configuration directory:

    # one rule a line: an executable (full path or file name) or a cgroup path prefix
    exe qemu-system-x86_64
    exe /usr/bin/cloud-hypervisor
    cgroup /machine.slice
    policy local-first          # for what is adopted (default manual)

The proc connector needs CAP_NET_ADMIN; without it auto-adopt is off and
says so, and everything else runs as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvmnumad import errors
from kvmnumad.adopt import procfs
from kvmnumad.adopt.discovery import AdoptOptions
from kvmnumad.manager import Manager
from kvmnumad.model import Policy

log = logging.getLogger(__name__)

FILE_NAME = "adopt.conf"
NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
PROC_EVENT_EXEC = 0x00000002
NLMSG_DONE = 3
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_EVENT = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_EXEC = struct.Struct("=ii")  # process_pid, process_tgid
RETRY_DELAYS = (0.1, 0.3, 1.0, 2.0, 4.0, 8.0)  # seconds after the exec: about 15 s in all
MAX_PENDING = 256  # pids being retried at once: an exec storm cannot grow this without bound


@dataclass(frozen=True)
class AutoAdoptConfig:
    executables: frozenset[str] = frozenset()
    cgroups: tuple[str, ...] = ()
    policy: Policy = Policy.MANUAL
    source: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.executables or self.cgroups)


def parse(text: str, source: str) -> AutoAdoptConfig:
    exes: set[str] = set()
    cgroups: list[str] = []
    policy = Policy.MANUAL
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, _, value = line.partition(" ")
        value = value.strip()
        if key == "exe" and value:
            exes.add(value)
        elif key == "cgroup" and value.startswith("/"):
            cgroups.append(value.rstrip("/") or "/")
        elif key == "policy" and value in {str(p) for p in Policy}:
            policy = Policy(value)
        else:
            raise ValueError(f"{source}:{number}: not 'exe NAME', 'cgroup /PATH' or 'policy NAME': {raw!r}")
    return AutoAdoptConfig(frozenset(exes), tuple(cgroups), policy, source)


def load(config_dir: Path) -> AutoAdoptConfig:
    path = Path(config_dir) / FILE_NAME
    try:
        return parse(path.read_text(), str(path))
    except FileNotFoundError:
        return AutoAdoptConfig(source=f"{path} absent")


def matches(config: AutoAdoptConfig, pid: int) -> bool:
    """Blocking (reads /proc): call off the loop."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = ""
    if exe and (exe in config.executables or os.path.basename(exe) in config.executables):
        return True
    if config.cgroups:
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return False
        paths = [line.split(":", 2)[2] for line in lines if line.count(":") >= 2]
        return any(p == c or p.startswith(c.rstrip("/") + "/") for p in paths for c in config.cgroups)
    return False


def _listen_message(op: int) -> bytes:
    payload = struct.pack("=I", op)
    cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(cn), NLMSG_DONE, 0, 0, os.getpid()) + cn


def exec_pids(datagram: bytes) -> list[int]:
    """The tgids of the exec events in one datagram from the proc connector."""
    out = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(datagram):
        length, _type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(datagram, offset)
        if length < _NLMSGHDR.size:
            break
        body = offset + _NLMSGHDR.size
        if body + _CN_MSG.size + _EVENT.size + _EXEC.size <= offset + length:
            idx, val, *_rest = _CN_MSG.unpack_from(datagram, body)
            what, _cpu, _ts = _EVENT.unpack_from(datagram, body + _CN_MSG.size)
            if (idx, val, what) == (CN_IDX_PROC, CN_VAL_PROC, PROC_EVENT_EXEC):
                _, tgid = _EXEC.unpack_from(datagram, body + _CN_MSG.size + _EVENT.size)
                out.append(tgid)
        offset += (length + 3) & ~3
    return out


@dataclass
class AutoAdopter:
    manager: Manager
    config: AutoAdoptConfig
    on_adopted: Callable[[str], None] = lambda name: None
    _sock: socket.socket | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _pending: dict[int, asyncio.TimerHandle | asyncio.Task[None]] = field(default_factory=dict)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Subscribe to exec events (raises OSError without CAP_NET_ADMIN)."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_CONNECTOR)
        try:
            sock.bind((os.getpid(), CN_IDX_PROC))
            sock.send(_listen_message(PROC_CN_MCAST_LISTEN))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock, self._loop = sock, loop
        loop.add_reader(sock.fileno(), self._drain)
        log.info("auto-adopt on (%s): executables %s, cgroups %s, policy %s", self.config.source,
                 sorted(self.config.executables), list(self.config.cgroups), self.config.policy)

    def stop(self) -> None:
        if self._sock is None or self._loop is None:
            return
        self._loop.remove_reader(self._sock.fileno())
        with contextlib.suppress(OSError):
            self._sock.send(_listen_message(PROC_CN_MCAST_IGNORE))
        self._sock.close()
        self._sock = None
        for pending in self._pending.values():
            pending.cancel()
        self._pending.clear()

    def _drain(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # ENOBUFS: events were lost; the next ones still come
                log.warning("proc connector: %s", e)
                return
            for pid in exec_pids(data):
                if pid != os.getpid() and pid not in self._pending and len(self._pending) < MAX_PENDING:
                    self._schedule(pid, 0)

    def _schedule(self, pid: int, attempt: int) -> None:
        assert self._loop is not None
        if attempt >= len(RETRY_DELAYS):
            self._pending.pop(pid, None)
            return
        self._pending[pid] = self._loop.call_later(RETRY_DELAYS[attempt], self._attempt, pid, attempt)

    def _attempt(self, pid: int, attempt: int) -> None:
        assert self._loop is not None
        self._pending[pid] = self._loop.create_task(self._try(pid, attempt))

    async def _try(self, pid: int, attempt: int) -> None:
        again = await asyncio.to_thread(self._adopt, pid, attempt)
        if again and self._sock is not None:
            self._schedule(pid, attempt + 1)
        else:
            self._pending.pop(pid, None)

    def _adopt(self, pid: int, attempt: int) -> bool:
        """True: try again later (not a VMM yet)."""
        if attempt == 0 and not matches(self.config, pid):
            return False
        try:
            began = procfs.start_time(pid)
            vmm, vcpus = procfs.vcpu_threads(procfs.threads(pid))
            if not vcpus or not procfs.has_kvm_vm(pid):
                return True  # its VM and vCPU threads are not there yet
            vm = self.manager.adopt_process(pid, AdoptOptions(policy=self.config.policy))
        except ProcessLookupError:
            return False
        except errors.AlreadyExists:
            return False
        except errors.KvmnumaError as e:
            log.info("auto-adopt of process %d not done (yet): %s", pid, e)
            return True
        log.info("auto-adopted process %d (started at tick %d) as VM %s (%s)", pid, began, vm.name, vmm)
        self.on_adopted(vm.name)
        return False
