"""The real daemon in a process of its own on a private dbus-daemon, for the bus figures.

``Daemon`` starts ``dbus-daemon --session`` (killed by its pid afterwards)
and ``python -m kvmnumad`` on it, optionally as systemd would run the unit:
soft/hard fd limits of ``LimitNOFILE=`` (systemd's default 1024:524288) and
a pids cgroup standing for ``TasksMax=``; optionally under cProfile.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import psutil
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

SERVICE = "org.kvmnuma1"
DRIVER = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")
MANAGER = (SERVICE, "/org/kvmnuma1", "org.kvmnuma1.Manager")
OBJECT_MANAGER = (SERVICE, "/org/kvmnuma1", "org.freedesktop.DBus.ObjectManager")
PIDS_V1 = Path("/sys/fs/cgroup/pids")
SYSTEMD_NOFILE = (1024, 524288)  # systemd's default LimitNOFILE= for a service


UNIT = Path(__file__).resolve().parents[1] / "systemd" / "kvmnumad.service"


def _unit_setting(key: str) -> str | None:
    value = None
    for line in UNIT.read_text().splitlines():
        if line.startswith(key + "="):
            value = line.split("=", 1)[1].strip()
    return value


def unit_limits() -> tuple[tuple[int, int], int | None]:
    """(LimitNOFILE soft/hard, TasksMax) as systemd would give the unit: its own settings, else
    systemd's defaults; the hard fd limit capped at ours (raising it needs CAP_SYS_RESOURCE)."""
    soft, hard = SYSTEMD_NOFILE
    nofile = _unit_setting("LimitNOFILE")
    if nofile:
        parts = nofile.split(":")
        soft, hard = int(parts[0]), int(parts[-1])
    ours = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if ours != resource.RLIM_INFINITY:
        hard = min(hard, ours)
    tasks = _unit_setting("TasksMax")
    if tasks is None:
        return (min(soft, hard), hard), tasks_max_default()
    return (min(soft, hard), hard), None if tasks == "infinity" else int(tasks)


def call(target: tuple[str, str, str], member: str, sig: str = "",
         body: list[object] | None = None) -> Callable[[], Message]:
    """A message factory; ``target`` is (destination, path, interface)."""
    dest, path, iface = target
    return lambda: Message(destination=dest, path=path, interface=iface, member=member, signature=sig,
                           body=list(body or []))


async def ok(bus: MessageBus, msg: Message) -> Message:
    reply = await bus.call(msg)
    if reply is None or reply.message_type != MessageType.METHOD_RETURN:
        what = f"{reply.error_name} {reply.body}" if reply is not None else "no reply"
        raise RuntimeError(f"{msg.member} failed: {what}")
    return reply


def tasks_max_default() -> int:
    """systemd's DefaultTasksMax: 15 % of min(kernel.pid_max, kernel.threads-max)."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    threads_max = int(Path("/proc/sys/kernel/threads-max").read_text())
    return min(pid_max, threads_max) * 15 // 100


def status_kib(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


@dataclass
class Daemon:
    """Context manager: ``address`` and ``proc`` while inside."""

    nofile: tuple[int, int] | None = None  # (soft, hard) as LimitNOFILE= would set them
    tasks_max: int | None = None  # a pids cgroup of this size, as TasksMax= would make
    profile: Path | None = None  # write a cProfile of the daemon here
    log_level: str = "warning"
    # Seconds to wait for the address file. Under TCG (the NUMA guest) the daemon's imports and first
    # topology read alone have taken most of a minute while the host's two CPUs were shared.
    start_timeout: float = 300.0
    address: str = ""
    proc: subprocess.Popen[bytes] | None = None
    _bus_pid: int = 0
    _tmp: tempfile.TemporaryDirectory[str] | None = None
    _cgroup: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids_cgroup(self) -> Path | None:
        return self._cgroup

    def process(self) -> psutil.Process:
        return psutil.Process(self.pid)

    def __enter__(self) -> Daemon:
        out = subprocess.run(["dbus-daemon", "--session", "--fork", "--print-address=1", "--print-pid=2"],
                             check=True, capture_output=True, text=True)
        self.address = out.stdout.strip().splitlines()[0]
        self._bus_pid = int(out.stderr.strip().splitlines()[-1])
        try:
            self._tmp = tempfile.TemporaryDirectory(prefix="bench-daemon-")
            self._start(Path(self._tmp.name))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self, workdir: Path) -> None:
        ready = workdir / "address"
        cmd = [sys.executable]
        if self.profile is not None:
            cmd += ["-m", "cProfile", "-o", str(self.profile)]
        cmd += ["-m", "kvmnumad", "--bus", self.address, "--log-target", "stderr",
                "--log-level", self.log_level, "--address-file", str(ready)]
        if self.tasks_max is not None and (PIDS_V1 / "cgroup.procs").exists():
            self._cgroup = PIDS_V1 / f"bench-kvmnumad-{os.getpid()}"
            self._cgroup.mkdir(exist_ok=True)
            (self._cgroup / "pids.max").write_text(f"{self.tasks_max}\n")
        nofile, cgroup = self.nofile, self._cgroup

        def preexec() -> None:  # in the child, before exec: the unit's limits
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
            if cgroup is not None:
                (cgroup / "cgroup.procs").write_text("0\n")

        log = (workdir / "daemon.log").open("wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     preexec_fn=preexec)  # noqa: PLW1509 (no threads yet)
        log.close()
        self._log = workdir / "daemon.log"
        t0 = time.monotonic()
        while not ready.exists():
            waited = time.monotonic() - t0
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvmnumad exited with status {self.proc.returncode} after {waited:.1f} s "
                                   f"without owning the bus name; its log: {self.log_tail()}")
            if waited > self.start_timeout:
                raise RuntimeError(f"kvmnumad (pid {self.proc.pid}, still running) did not own the bus name "
                                   f"within {self.start_timeout:.0f} s; its log: {self.log_tail()}")
            time.sleep(0.02)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self._log.read_text(errors="replace")[-chars:]
        except (OSError, AttributeError):
            return ""

    def stop(self, timeout: float = 120) -> float:
        """SIGTERM and wait: the seconds the daemon took to stop (its VMs included)."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return time.monotonic() - t0

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.stop()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._bus_pid, signal.SIGTERM)
            if self._cgroup is not None:
                for _ in range(100):  # the daemon's threads leave the cgroup as they are reaped
                    try:
                        self._cgroup.rmdir()
                        break
                    except OSError:
                        time.sleep(0.05)
            if self._tmp is not None:
                self._tmp.cleanup()


def spy(pid: int, out: Path | None, seconds: float) -> subprocess.Popen[bytes] | None:
    """py-spy (all threads, raw collapsed stacks) on ``pid`` for ``seconds`` into ``out``, if asked and
    installed; the caller waits for it.  `python -m bench.profile FILE` sums the stacks."""
    if out is None:
        return None
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        print(f"bench: no {exe}: `pip install py-spy` for profiles", file=sys.stderr)
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([str(exe), "record", "-p", str(pid), "-d", str(max(1, round(seconds))),
                             "-r", "250", "--threads", "-f", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
