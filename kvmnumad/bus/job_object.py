# D-Bus signatures are string annotations, as dbus-fast reads them; the type
# checkers see names, not types, in them:
# mypy: disable-error-code="name-defined,valid-type"
# ruff: noqa: F821
"""``/org/kvmnuma1/job/<id>``: interface org.kvmnuma1.Job, one object per running migration job.

Modelled on systemd's job objects: it exists while the job runs and goes
away when it ends (InterfacesRemoved, and the Manager's JobRemoved signal
with the outcome).  Its properties are the service's mirror of the core's
JobStatus (vm/migration.py), published at most every 100 ms while it runs.
Cancel is the job's starter's (the owner rule of bus/auth.py, with the
starter as owner) or, through polkit, an administrator's.
"""

import asyncio
from typing import Any

from dbus_fast import PropertyAccess
from dbus_fast.service import dbus_property, method

from kvmnumad.bus.access import requires
from kvmnumad.bus.auth import ACTION_MIGRATE
from kvmnumad.bus.context import BusContext
from kvmnumad.bus.dispatch import BusObject, Subject
from kvmnumad.bus.errors import unknown_object
from kvmnumad.bus.paths import JOB_INTERFACE, job_path, vm_path
from kvmnumad.errors import InvalidArgument
from kvmnumad.model import JobStatus


def job_props(s: JobStatus) -> dict[str, Any]:
    """Every property of the job object (Slot 0: every slot of the guest node; slots start at 1)."""
    return {
        "Id": s.id,
        "VM": vm_path(s.vm),
        "VMName": s.vm,
        "GuestNode": s.guest_node,
        "Slot": s.slot or 0,
        "HostNode": s.host_node,
        "Starter": s.starter,
        "State": str(s.state),
        "PagesMoved": s.pages_moved,
        "PagesTotal": s.pages_total,
        "FailedPages": [[e, n] for e, n in s.failed],
        "Origin": s.origin,
    }


def job_row(s: JobStatus) -> list[Any]:
    """ListJobs' (id, job path, VM path, guest node, host node, state)."""
    return [s.id, job_path(s.id), vm_path(s.vm), s.guest_node, s.host_node, str(s.state)]


class JobObject(BusObject):
    def __init__(self, context: BusContext, status: JobStatus) -> None:
        super().__init__(JOB_INTERFACE, job_props(status))
        self.job_id = status.id
        self.vm_name = status.vm
        self.starter = status.starter
        self.path = job_path(status.id)
        self._context = context

    @classmethod
    def template(cls) -> "JobObject":
        """An instance for its members only (never exported, never called)."""
        obj = cls.__new__(cls)
        BusObject.__init__(obj, JOB_INTERFACE, {})
        return obj

    def subject(self) -> Subject:
        # The starter is the "owner" of the owner rule: theirs to cancel without polkit.
        return Subject(self.vm_name, self.starter, self.path)

    # ------------------------------------------------------------- methods
    @method()
    @requires(ACTION_MIGRATE, verb="cancel-job")
    async def Cancel(self) -> None:
        try:
            await asyncio.to_thread(self._context.manager.cancel_job, self.job_id)
        except InvalidArgument:  # ended meanwhile: its object is on its way out
            raise unknown_object(self.path) from None

    # ---------------------------------------------------------- properties
    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "u":
        return self._props["Id"]

    @dbus_property(access=PropertyAccess.READ)
    def VM(self) -> "o":
        return self._props["VM"]

    @dbus_property(access=PropertyAccess.READ)
    def VMName(self) -> "s":
        return self._props["VMName"]

    @dbus_property(access=PropertyAccess.READ)
    def GuestNode(self) -> "u":
        return self._props["GuestNode"]

    @dbus_property(access=PropertyAccess.READ)
    def Slot(self) -> "u":
        return self._props["Slot"]

    @dbus_property(access=PropertyAccess.READ)
    def HostNode(self) -> "u":
        return self._props["HostNode"]

    @dbus_property(access=PropertyAccess.READ)
    def Starter(self) -> "u":
        return self._props["Starter"]

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        return self._props["State"]

    @dbus_property(access=PropertyAccess.READ)
    def PagesMoved(self) -> "t":
        return self._props["PagesMoved"]

    @dbus_property(access=PropertyAccess.READ)
    def PagesTotal(self) -> "t":
        return self._props["PagesTotal"]

    @dbus_property(access=PropertyAccess.READ)
    def FailedPages(self) -> "a(iu)":
        return self._props["FailedPages"]

    @dbus_property(access=PropertyAccess.READ)
    def Origin(self) -> "s":
        return self._props["Origin"]
