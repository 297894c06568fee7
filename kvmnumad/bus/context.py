"""What a bus object and the Dispatcher may ask of the service that exports them.

The objects depend on this small protocol, not on BusService: nothing here
imports the service or the objects, so the import graph has no circle and a
test may serve an object from a context of its own.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol

from kvmnumad.bus.auth import Authorizer
from kvmnumad.manager import Manager


class BusContext(Protocol):
    @property
    def manager(self) -> Manager: ...

    @property
    def authorizer(self) -> Authorizer: ...

    async def exported_path(self, name: str) -> str:
        """Make the exported object of VM ``name`` match the core now and
        return its path; NoSuchVM if the core has no such VM."""
        ...

    def settled(self, path: str) -> AbstractAsyncContextManager[None]:
        """Around a mutating call about the object at ``path``: on exit, every
        core event queued so far has been published (so the reply follows its
        PropertiesChanged); raises Internal if publishing one about ``path``
        failed meanwhile, which the caller must not miss."""
        ...

    def request_reexec(self) -> None:
        """Ask the daemon to re-execute itself keeping its VMs, after this
        call's reply (Manager.Reexec); Busy when it cannot (not wired)."""
        ...
