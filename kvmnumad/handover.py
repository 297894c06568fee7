"""Guests that outlive the daemon: memfds handed to the next process of it.

A KVM VM fd works only in the process that made it (an ioctl from another
gives EIO), so the VM and vCPU fds die with the daemon.  Guest memory does
not have to: it lives in memfds, and an fd can be passed on.  Two ways, one
receiving path:

- under systemd, every memfd goes to the service's fd store when its slot is
  made (``FDSTORE=1``, ``FDNAME=<vm>.<slot>``; :class:`FdStore`, wired in
  daemon.py), so even a crash (kill -9, the watchdog) keeps the memory; a
  graceful stop adds one more fd, a sealed memfd named ``kvmnumad-handover``
  holding each paused VM's definition and vCPU state;
- without systemd, ``Reexec()`` re-executes the daemon in place (same PID)
  with the same fds inherited across exec (:func:`reexec`).

Either way the new process finds them as ``LISTEN_FDS``/``LISTEN_FDNAMES``
(sd_listen_fds_with_names(3): fds from 3, names colon-separated), which
:meth:`Inherited.from_environ` reads.  Parsed here rather than through
systemd-python's ``listen_fds_with_names`` because that one is missing from
Debian's python3-systemd 235, and the protocol is three variables.

What comes back: with the handover record, each VM continues (same memory,
same vCPU state: ``Recovery.RESUMED``); with memfds only (a crash), each VM
defined in the state directory is made anew on its kept memory and its vCPUs
start from entry (``Recovery.RESTARTED``, said in the journal); a memfd whose
VM definition is gone is closed and removed from the store (FDSTOREREMOVE=1).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import sys
import threading
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

from kvmnumad import errors, holder, sdnotify
from kvmnumad.adopt.vm import is_adopted
from kvmnumad.events import Aspect, Event, VmAdded, VmChanged, VmRemoved
from kvmnumad.journal import EventKind, log_event
from kvmnumad.manager import Manager
from kvmnumad.vm import region
from kvmnumad.vm.definition import VmDefinition
from kvmnumad.vm.saved import Recovery, Resume, SavedVcpu

log = logging.getLogger(__name__)

RECORD_NAME = "kvmnumad-handover"
HOLDER_NAME = "kvmnumad-holder"  # the pipe end that lets the old address space go (kvmnumad/holder.py)
HOLDER_ENV = "KVMNUMAD_HOLDER_PID"
FORMAT = 1
SD_LISTEN_FDS_START = 3
MAX_RECORD = 64 << 20  # a record is ~10 KiB per vCPU: refuse anything absurd before reading it


def fd_name(vm: str, slot: int) -> str:
    """``<vm>.<slot>``: VM names are [A-Za-z0-9_.-], so never a ':' (the LISTEN_FDNAMES separator)."""
    return f"{vm}.{slot}"


def parse_fd_name(name: str) -> tuple[str, int] | None:
    vm, dot, slot = name.rpartition(".")
    if not dot or not vm or not slot.isdigit():
        return None
    return vm, int(slot)


# ------------------------------------------------------------------ receiving


class Inherited:
    """The fds an earlier process of the daemon left, by name; owns them
    until taken.  Whatever is never taken is released by :meth:`release_rest`."""

    def __init__(self, fds: dict[str, int], holder_pid: str | None = None) -> None:
        self._fds = fds
        self._holder_pid = holder_pid
        self._lock = threading.Lock()

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Inherited:
        """Read and unset LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES (sd_listen_fds(3)
        with unset_environment, so no child inherits them).  Each fd becomes
        close-on-exec again.  Variables meant for another PID are ignored."""
        env = os.environ if environ is None else environ
        pid, count, names = (env.pop(k, None) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))
        holder_pid = env.pop(HOLDER_ENV, None)
        if pid is None or count is None or pid != str(os.getpid()):
            return cls({})
        try:
            n = int(count)
        except ValueError:
            log.warning("LISTEN_FDS=%r is not a number: no fds taken", count)
            return cls({})
        labels = names.split(":") if names else []
        fds: dict[str, int] = {}
        for i in range(max(n, 0)):
            fd = SD_LISTEN_FDS_START + i
            try:
                os.set_inheritable(fd, False)
            except OSError:
                continue  # not open: nothing to own
            label = labels[i] if i < len(labels) else "unknown"
            if label in fds:  # the store holds duplicates as separate entries: keep one
                os.close(fd)
                continue
            fds[label] = fd
        if fds:
            log.info("inherited %d fd(s): %s", len(fds), ", ".join(sorted(fds)))
        return cls(fds, holder_pid)

    def take_holder(self) -> holder.Holder | None:
        """The child holding the previous image's address space, if exec left
        one (Reexec): to be let go once the VMs run again."""
        with self._lock:
            fd = self._fds.pop(HOLDER_NAME, None)
        return holder.from_environ_value(self._holder_pid, fd)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._fds)

    def take_record(self) -> HandoverRecord | None:
        """The handover record, read and closed (and dropped from systemd's
        store: a later crash must not resume from this old pause)."""
        with self._lock:
            fd = self._fds.pop(RECORD_NAME, None)
        if fd is None:
            return None
        sdnotify.notify("FDSTOREREMOVE=1", f"FDNAME={RECORD_NAME}")
        try:
            size = os.fstat(fd).st_size
            if size > MAX_RECORD:
                raise ValueError(f"{size} bytes, more than {MAX_RECORD}")
            data = os.pread(fd, size, 0)
            return HandoverRecord.from_json(data)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("handover record unreadable, VMs restart from their definitions: %s", e)
            return None
        finally:
            os.close(fd)

    def take_vm(self, vm: str) -> dict[int, int]:
        """slot -> memfd of ``vm``, now the caller's."""
        taken: dict[int, int] = {}
        with self._lock:
            for name in list(self._fds):
                parsed = parse_fd_name(name)
                if parsed is not None and parsed[0] == vm:
                    taken[parsed[1]] = self._fds.pop(name)
        return taken

    def release_rest(self) -> list[str]:
        """Close every fd nobody took, and drop it from the fd store: memory
        whose VM definition is gone is freed, not leaked."""
        with self._lock:
            rest, self._fds = self._fds, {}
        for name, fd in sorted(rest.items()):
            os.close(fd)
            sdnotify.notify("FDSTOREREMOVE=1", f"FDNAME={name}")
            log.warning("released handed-over fd %s: no VM definition claims it", name)
        return sorted(rest)


def release(vm: str, memfds: dict[int, int], *, keep_in_store: bool = False) -> None:
    """Slots a restore did not adopt: closed, and dropped from the store when
    no definition wants them (``keep_in_store``: the VM failed to come back
    now, a CPU or node short; systemd keeps its copy for the next start)."""
    for slot, fd in sorted(memfds.items()):
        os.close(fd)
        if not keep_in_store:
            sdnotify.notify("FDSTOREREMOVE=1", f"FDNAME={fd_name(vm, slot)}")
    if memfds:
        log.warning("VM %s: %s %d handed-over memfd(s) it did not take back", vm,
                    "closed (kept in the fd store)" if keep_in_store else "released", len(memfds))
    memfds.clear()


# ------------------------------------------------------------------ the record


@dataclass
class SavedVm:
    definition: VmDefinition
    payload: bytes | None
    vcpus: list[SavedVcpu | None]
    paused_ns: int  # CLOCK_MONOTONIC when its vCPUs stopped: the same clock after exec

    def to_dict(self) -> dict[str, Any]:
        return {"definition": self.definition.to_dict(),
                "payload": None if self.payload is None else base64.b64encode(self.payload).decode(),
                "vcpus": [None if v is None else v.to_dict() for v in self.vcpus],
                "paused_ns": self.paused_ns}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SavedVm:
        payload = d.get("payload")
        return cls(VmDefinition.from_dict(d["definition"]),
                   None if payload is None else base64.b64decode(payload, validate=True),
                   [None if v is None else SavedVcpu.from_dict(v) for v in d["vcpus"]], int(d["paused_ns"]))


@dataclass
class HandoverRecord:
    """What a graceful handover writes beside the memfds."""

    vms: list[SavedVm] = field(default_factory=list)
    # Without systemd the daemon may run its own dbus-daemon (--bus private):
    # the next process serves on the same one instead of starting another.
    private_bus: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        return json.dumps({"format": FORMAT, "vms": [v.to_dict() for v in self.vms],
                           "private_bus": self.private_bus}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> HandoverRecord:
        d = json.loads(data)
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"not a handover record of format {FORMAT}")
        bus = d.get("private_bus")
        return cls([SavedVm.from_dict(v) for v in d["vms"]], bus if isinstance(bus, dict) else None)


def write_record(record: HandoverRecord) -> int:
    """The record in a sealed memfd (CLOEXEC; the caller passes it on)."""
    data = record.to_json()
    fd = os.memfd_create(RECORD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd


# ------------------------------------------------------------------ the old process


@dataclass
class Handover:
    """Paused VMs and dups of their memfds, ready to pass on (owns the dups)."""

    record: HandoverRecord
    fds: list[tuple[str, int]]

    def close(self) -> None:
        for _, fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


def prepare(manager: Manager) -> Handover:
    """Pause every VM and save it: definition, payload, vCPU state, and a
    dup of each memfd (the Manager's shutdown closes the originals).  A VM
    that cannot be saved (destroyed meanwhile, a vCPU that will not stop) is
    left out, and goes down with the process as before."""
    record = HandoverRecord()
    fds: list[tuple[str, int]] = []
    for vm in manager.list_vms():
        if is_adopted(vm):
            continue  # its VMM keeps running; kvmnumad/adopt/records.py re-attaches it
        try:
            definition = vm.definition()
            paused_ns = time.monotonic_ns()
            saved = vm.pause_for_handover()
            memfds = vm.memory.memfds()
        except (errors.KvmnumaError, OSError, TimeoutError) as e:
            log.error("VM %s cannot be handed over, it stops with this process: %s", vm.name, e)
            continue
        for slot, fd in memfds:
            fds.append((fd_name(vm.name, slot), fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)))
        record.vms.append(SavedVm(definition, vm.payload, saved, paused_ns))
        log.info("VM %s paused for handover: %d vCPU state(s), %d memfd(s)",
                 vm.name, sum(s is not None for s in saved), len(memfds))
    return Handover(record, fds)


def to_fd_store(handover: Handover) -> bool:
    """Graceful stop under systemd: the memfds (already there, systemd keeps
    one copy of an fd) and the record into the fd store.  A plain stop
    flushes the store; a restart hands it to the next process."""
    record_fd = write_record(handover.record)
    try:
        ok = all(sdnotify.notify_with_fds(("FDSTORE=1", f"FDNAME={name}"), [fd]) for name, fd in handover.fds)
        return sdnotify.notify_with_fds(("FDSTORE=1", f"FDNAME={RECORD_NAME}"), [record_fd]) and ok
    finally:
        os.close(record_fd)


def keep_address_space() -> None:
    """Before the shutdown that precedes :func:`reexec`: guest memory stays
    mapped, for the holder to unmap after the VMs run again (kvmnumad/holder.py)."""
    region.defer_unmaps()


def reexec(handover: Handover, argv: list[str] | None = None) -> None:
    """exec the daemon again in this process (same PID), the memfds and the
    record inherited as LISTEN_FDS from 3.  Never returns; every other fd
    (the bus connection, /dev/kvm, the udev socket) is close-on-exec and goes.
    A holder child keeps the old address space (kvmnumad/holder.py), so the
    exec unmaps nothing; the new image lets it go (``HOLDER_NAME``'s fd).

    Each fd is first dup'ed above the target range, so that putting one at
    3+i never overwrites another still to be placed."""
    named = [*handover.fds, (RECORD_NAME, write_record(handover.record))]
    try:
        held: holder.Holder | None = holder.spawn()
    except OSError as e:
        log.warning("no holder for the old address space (%s): the exec unmaps guest memory in the pause", e)
        held = None
    if held is not None:
        named.append((HOLDER_NAME, held.fd))
        os.environ[HOLDER_ENV] = str(held.pid)
    low = SD_LISTEN_FDS_START + len(named)
    temps = [(name, fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low)) for name, fd in named]
    for i, (_, tmp) in enumerate(temps):
        os.dup2(tmp, SD_LISTEN_FDS_START + i, inheritable=True)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = str(len(temps))
    os.environ["LISTEN_FDNAMES"] = ":".join(name for name, _ in temps)
    args = argv if argv is not None else list(sys.orig_argv)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, args)
    finally:  # reached only if the exec failed
        if held is not None:
            held.reap()


# ------------------------------------------------------------------ the new process


def restore_record(manager: Manager, record: HandoverRecord, inherited: Inherited) -> list[str]:
    """Make each handed-over VM anew on its memfds with its vCPU state, and
    resume it; returns the names restored.  A VM that cannot come back is
    logged, and its memfds released (its definition, if persisted, stays)."""
    restored: list[str] = []
    for saved in record.vms:
        name = saved.definition.name
        resume = Resume(inherited.take_vm(name), saved.vcpus)
        try:
            manager.restore_vm(saved.definition, saved.payload, resume)
        except Exception as e:
            level = logging.WARNING if isinstance(e, errors.KvmnumaError) else logging.ERROR
            log.log(level, "VM %s could not be resumed: %s", name, e,
                    exc_info=not isinstance(e, errors.KvmnumaError))
            release(name, resume.memfds, keep_in_store=True)
            continue
        release(name, resume.memfds)
        pause_ms = (time.monotonic_ns() - saved.paused_ns) / 1e6
        log_event(EventKind.VM_RESUMED, f"VM {name} resumed after a daemon restart: same memory and vCPU "
                  f"state, paused {pause_ms:.1f} ms", vm=name, reason="handover")
        restored.append(name)
    return restored


class CrashResume:
    """persist.restore's ``resume_of`` on the crash path: a saved VM gets
    its kept memfds (no vCPU state: that died with the process)."""

    def __init__(self, inherited: Inherited) -> None:
        self._inherited = inherited
        self._given: dict[str, Resume] = {}

    def __call__(self, d: VmDefinition) -> Resume | None:
        memfds = self._inherited.take_vm(d.name)
        if not memfds:
            return None
        self._given[d.name] = resume = Resume(memfds)
        return resume

    def finish(self, manager: Manager) -> None:
        """Journal each VM that restarted on its memory; release what no
        slot adopted (the VM failed to come back, or has fewer slots now)."""
        for name, resume in sorted(self._given.items()):
            try:
                vm = manager.get_vm(name)
            except errors.NoSuchVM:  # not restored now: its definition stays, so does its memory
                release(name, resume.memfds, keep_in_store=True)
                continue
            release(name, resume.memfds)
            if vm.recovery == Recovery.RESTARTED:
                log_event(EventKind.VM_RESTARTED, f"VM {name} restarted its vCPUs from their entry state on "
                          "its kept memory: the previous daemon ended without saving them", vm=name,
                          reason="crash", level=logging.WARNING)


# ------------------------------------------------------------------ the fd store


class FdStore:
    """Every VM's memfds in systemd's fd store, from the moment each slot
    exists, so that a crash keeps guest memory; removed when the VM is
    destroyed.  A subscriber of the core's events, wired in daemon.py only
    under systemd (NOTIFY_SOCKET), like persistence."""

    def __init__(self, manager: Manager) -> None:
        self._manager = manager
        self._stored: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        if isinstance(event, VmAdded) or (isinstance(event, VmChanged) and Aspect.MEMORY in event.aspects):
            self._store(event.vm)
        elif isinstance(event, VmRemoved):
            with self._lock:
                names = self._stored.pop(event.vm, set())
            for name in sorted(names):
                sdnotify.notify("FDSTOREREMOVE=1", f"FDNAME={name}")

    def _store(self, vm_name: str) -> None:
        try:
            memfds = self._manager.get_vm(vm_name).memory.memfds()
        except errors.NoSuchVM:
            return
        with self._lock:
            stored = self._stored.setdefault(vm_name, set())
            for slot, fd in memfds:
                name = fd_name(vm_name, slot)
                if name not in stored and sdnotify.notify_with_fds(("FDSTORE=1", f"FDNAME={name}"), [fd]):
                    stored.add(name)
