"""``kvmnumactl migrate``, ``jobs`` and ``job-cancel``: memory migration jobs
(org.kvmnuma1.Job), used the way systemctl users use systemd's jobs.

A job is followed on its signals, never by polling: PropertiesChanged of the
job object for its progress, the Manager's JobRemoved for its outcome.  The
match rules go in before the job is started, so that a job that ends before
its call's reply has reached us is not missed: the signals are recorded by job
path from then on, whichever job they are about.

``migrate`` waits for the outcome however long the job takes (``--timeout``
bounds each call, not the job), as ``systemctl start`` waits for its job; Ctrl-C
cancels the job, waits for it to stop and says what it left.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import signal
import sys
from typing import Any

from dbus_fast import Message, MessageType

from kvmnumad.cli.client import (
    DBUS_NAME,
    DBUS_PATH,
    JOB_IFACE,
    JOB_PATH_PREFIX,
    MANAGER_IFACE,
    MANAGER_PATH,
    PROPERTIES_IFACE,
    SERVICE,
    BusError,
    Client,
    Interrupted,
)
from kvmnumad.cli.output import plain, print_json, print_table
from kvmnumad.cli.values import UsageError, parse_u32

UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"


def job_path(text: str) -> str:
    """A job as ``jobs`` lists it (its number) or as the bus names it (its path)."""
    number = text.removeprefix(JOB_PATH_PREFIX)
    if not number.isdigit():
        raise UsageError(f"invalid job {text!r} (expected a job number, as 'jobs' lists them, or its path)")
    return JOB_PATH_PREFIX + str(parse_u32(number))


def job_id(path: str) -> int:
    # the job's Id is the last element of its path (org.kvmnuma1.Job.xml)
    return int(path.rsplit("/", 1)[1])


class JobWatch:
    """The service's job signals, recorded by job path from the moment the
    match rules are in; also notices the service or the bus going away, which
    would otherwise leave a waiter waiting for a JobRemoved that never comes."""

    def __init__(self, c: Client) -> None:
        self.c = c
        self.props: dict[str, dict[str, Any]] = {}
        self.results: dict[str, str] = {}
        self.lost = ""  # why no further signal will come
        self._wake = asyncio.Event()

    async def start(self) -> None:
        self.c.bus.add_message_handler(self._handle)
        rules = [
            f"type='signal',sender='{SERVICE}',path='{MANAGER_PATH}',interface='{MANAGER_IFACE}',"
            "member='JobRemoved'",
            f"type='signal',sender='{SERVICE}',path_namespace='{JOB_PATH_PREFIX.rstrip('/')}',"
            f"interface='{PROPERTIES_IFACE}',member='PropertiesChanged',arg0='{JOB_IFACE}'",
            f"type='signal',sender='{DBUS_NAME}',member='NameOwnerChanged',arg0='{SERVICE}'",
        ]
        for rule in rules:
            await self.c.call(DBUS_PATH, DBUS_NAME, "AddMatch", signature="s", body=[rule],
                              destination=DBUS_NAME)
        lost = asyncio.ensure_future(self.c.bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
        lost.add_done_callback(self._disconnected)

    def _disconnected(self, f: asyncio.Future[Any]) -> None:
        if not f.cancelled():
            f.exception()  # the reason is the bus's; retrieved so that asyncio does not log it
        self._lose("the bus connection closed")

    def _lose(self, why: str) -> None:
        self.lost = self.lost or why
        self._wake.set()

    def _handle(self, msg: Message) -> None:
        # the handler sees every message on the connection, method replies included
        if msg.message_type != MessageType.SIGNAL:
            return
        if msg.member == "NameOwnerChanged" and msg.interface == DBUS_NAME:
            if msg.body[0] == SERVICE and msg.body[1]:
                self._lose(f"{SERVICE} left the bus")
            return
        if msg.member == "JobRemoved" and msg.interface == MANAGER_IFACE:
            self.results[str(msg.body[1])] = str(msg.body[3])
        elif msg.member == "PropertiesChanged" and msg.interface == PROPERTIES_IFACE and msg.path:
            if msg.body[0] == JOB_IFACE:
                self.props.setdefault(msg.path, {}).update(plain(msg.body[1]))
        else:
            return
        self._wake.set()

    async def read(self, path: str) -> None:
        """The job's properties now; signals sent since the rules went in update
        them, and a job that has ended meanwhile keeps what its last signal said."""
        try:
            (props,) = await self.c.call(path, PROPERTIES_IFACE, "GetAll", signature="s", body=[JOB_IFACE])
        except BusError as e:
            if e.name != UNKNOWN_OBJECT:
                raise
            return
        # Replies and signals of one sender keep their order, so the reply is newer than the
        # signals read before it; but an ended job's last signals (read with its JobRemoved,
        # maybe in the same read as the reply) are its final word.
        mine = plain(props)
        if path in self.results:
            mine.update(self.props.get(path, {}))
        self.props[path] = mine

    async def next_change(self, interrupt: asyncio.Event | None = None, timeout: float | None = None) -> bool:
        """Until a job signal arrives, the service is lost or ``interrupt`` is set;
        False after ``timeout`` seconds of none of these."""
        if interrupt is not None and interrupt.is_set():
            return True
        self._wake.clear()
        waiters = [asyncio.ensure_future(self._wake.wait())]
        if interrupt is not None:
            waiters.append(asyncio.ensure_future(interrupt.wait()))
        try:
            done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        return bool(done)

    async def outcome(self, path: str, interrupt: asyncio.Event | None = None,
                      timeout: float | None = None) -> str | None:
        """The job's result (done, cancelled, failed); None if ``interrupt`` came
        first.  Raises BusError when the service goes or ``timeout`` passes."""
        while path not in self.results:
            if self.lost:
                raise BusError("Disconnected", f"{self.lost} before job {job_id(path)} ended")
            if interrupt is not None and interrupt.is_set():
                return None
            if not await self.next_change(interrupt, timeout):
                raise BusError("Timeout", f"job {job_id(path)} did not end within {timeout:g} s")
        return self.results[path]


def _failed_text(failed: list[Any]) -> str:
    parts = [f"{n} {errno.errorcode.get(e, f'errno {e}')}" for e, n in failed]
    return f"; pages not moved: {', '.join(parts)}" if parts else ""


def _progress_text(path: str, p: dict[str, Any]) -> str:
    moved, total = p.get("PagesMoved", 0), p.get("PagesTotal", 0)
    share = f" ({100 * moved // total}%)" if total else ""
    what = ""
    if "VMName" in p:
        what = f" ({p['VMName']} guest node {p['GuestNode']} to host node {p['HostNode']})"
    return f"job {job_id(path)}{what}: {moved}/{total} pages moved{share}"


class _Progress:
    """One line on stderr rewritten in place, only on a terminal: scripts and
    logs get the outcome, not a stream of carriage returns."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.shown = ""

    def show(self, text: str) -> None:
        if self.enabled and text != self.shown:
            print(f"\r{text}\033[K", end="", file=sys.stderr, flush=True)
            self.shown = text

    def end(self) -> None:
        if self.enabled and self.shown:
            print(file=sys.stderr, flush=True)
            self.shown = ""


async def cmd_migrate(c: Client, args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    interrupt = asyncio.Event()
    watch = JobWatch(c)
    if args.wait:
        await watch.start()
        # before the call: a Ctrl-C while it is under way still cancels the job it starts
        loop.add_signal_handler(signal.SIGINT, interrupt.set)
    try:
        if args.slot is None:
            (job,) = await c.vm(args.name, "MigrateNumaNode", "uu", args.node, args.host_node)
        else:
            (job,) = await c.vm(args.name, "MigrateNumaSlot", "uuu", args.node, args.slot, args.host_node)
        path = str(job)
        sent: dict[str, Any] = {"vm": args.name, "node": args.node, "host_node": args.host_node}
        if args.slot is not None:
            sent["slot"] = args.slot
        sent.update(job=path, id=job_id(path))
        if not args.wait:
            if args.json:
                print_json(sent)
            else:
                print(path)  # as create prints its VM: for job-cancel, or a script's wait
            return
        await _follow(c, watch, path, interrupt, sent, as_json=args.json)
    finally:
        if args.wait:
            loop.remove_signal_handler(signal.SIGINT)


async def _follow(c: Client, watch: JobWatch, path: str, interrupt: asyncio.Event,
                  sent: dict[str, Any], *, as_json: bool) -> None:
    progress = _Progress(not as_json and sys.stderr.isatty())
    await watch.read(path)
    try:
        while path not in watch.results and not watch.lost and not interrupt.is_set():
            progress.show(_progress_text(path, watch.props.get(path, {})))
            await watch.next_change(interrupt)
        progress.show(_progress_text(path, watch.props.get(path, {})))
        result = await watch.outcome(path, interrupt)
        if result is None:  # Ctrl-C: cancel, then wait for what the job left
            progress.end()
            if not as_json:  # with --json, stderr holds the one error object
                print(f"Cancelling job {job_id(path)}...", file=sys.stderr, flush=True)
            try:
                await c.call(path, JOB_IFACE, "Cancel")
            except BusError as e:
                if e.name != UNKNOWN_OBJECT:  # an ended job has no object: its JobRemoved tells how
                    raise
            result = await watch.outcome(path, timeout=c.timeout)
    finally:
        progress.end()
    props = watch.props.get(path, {})
    moved, total = props.get("PagesMoved", 0), props.get("PagesTotal", 0)
    failed = props.get("FailedPages", [])
    left = f"{moved} of {total} pages moved{_failed_text(failed)}"
    where = f"guest node {sent['node']} of {sent['vm']}"
    if result == "done":
        if interrupt.is_set() and not as_json:
            print(f"job {sent['id']} was done before it could be cancelled", file=sys.stderr, flush=True)
        if as_json:
            print_json({**sent, "result": result, "pages_moved": moved, "pages_total": total,
                        "failed_pages": failed})
        return
    if result == "cancelled":
        kept = f"{left} (moved pages stay moved); {where} stays mapped where it was"
        if interrupt.is_set():
            raise Interrupted(f"cancelled job {sent['id']}: {kept}")
        raise BusError("JobCancelled", f"job {sent['id']} was cancelled: {kept}")
    raise BusError("JobFailed", f"job {sent['id']} ({where} to host node {sent['host_node']}) ended "
                                f"{result}: every page is back where it was{_failed_text(failed)}")


async def cmd_jobs(c: Client, args: argparse.Namespace) -> None:
    (rows,) = await c.manager("ListJobs")
    jobs: list[dict[str, Any]] = []
    for job_number, path, vm_path, node, host_node, state in rows:
        try:
            (props,) = await c.call(path, PROPERTIES_IFACE, "GetAll", signature="s", body=[JOB_IFACE])
        except BusError as e:
            if e.name == UNKNOWN_OBJECT:  # ended since ListJobs: no longer running, not listed
                continue
            raise
        p = plain(props)
        jobs.append({"id": job_number, "job": path, "vm": p.get("VMName", ""), "vm_path": vm_path,
                     "node": node, "slot": p.get("Slot", 0), "host_node": host_node,
                     "state": p.get("State", state),
                     "pages_moved": p.get("PagesMoved", 0), "pages_total": p.get("PagesTotal", 0),
                     "failed_pages": p.get("FailedPages", [])})
    if args.json:
        print_json({"jobs": jobs})
        return
    if not jobs:
        print("No jobs running.")  # as systemctl list-jobs says it
        return
    table = [[str(j["id"]), j["vm"], str(j["node"]), str(j["slot"] or "-"), str(j["host_node"]), j["state"],
              f"{j['pages_moved']}/{j['pages_total']}"] for j in jobs]
    legend = f"{len(jobs)} job{'' if len(jobs) == 1 else 's'} listed."
    print_table(["JOB", "VM", "NODE", "SLOT", "HOST-NODE", "STATE", "PAGES"], table, legend)


async def cmd_job_cancel(c: Client, args: argparse.Namespace) -> None:
    """Job.Cancel, then the wait for its JobRemoved (a chunk, milliseconds), so
    that the job is gone when the command returns and its outcome is known."""
    path = args.job
    watch = JobWatch(c)
    await watch.start()
    try:
        await c.call(path, JOB_IFACE, "Cancel")
    except BusError as e:
        if e.name != UNKNOWN_OBJECT:
            raise
        ended = watch.results.get(path)
        why = f"it ended {ended} just now" if ended else "it ended, or never was"
        raise BusError(e.name, f"no job {job_id(path)} ({why})") from None
    result = await watch.outcome(path, timeout=c.timeout)
    if args.json:
        print_json({"id": job_id(path), "job": path, "result": result})
    elif result != "cancelled":
        print(f"job {job_id(path)} ended {result} before the cancel took effect", file=sys.stderr, flush=True)
