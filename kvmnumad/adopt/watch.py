"""An adopted VM ends when its process does: a pidfd per VM on the event loop.

A pidfd becomes readable when its process exits (pidfd_open(2)), so the loop
waits on it like on any fd: no polling, no thread, and an exit is seen at
once (the test measures InterfacesRemoved within 1 s).  The watcher keeps a
dup of the VM's pidfd, made on the thread that announced the VM, so that a
release closing the VM's own fd meanwhile never leaves a closed (or reused)
fd number registered with the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from kvmnumad import errors
from kvmnumad.adopt.vm import AdoptedVm
from kvmnumad.events import Event, VmAdded, VmRemoved
from kvmnumad.manager import Manager

log = logging.getLogger(__name__)


class ExitWatcher:
    """A Manager subscriber; ``close()`` from the loop undoes it."""

    def __init__(self, manager: Manager, loop: asyncio.AbstractEventLoop) -> None:
        self._manager = manager
        self._loop = loop
        self._fds: dict[str, tuple[int, AdoptedVm]] = {}  # name -> (our pidfd, the VM), on the loop only
        self._closed = False
        manager.subscribe(self)
        for vm in manager.list_vms():  # adopted before we subscribed (restore)
            self(VmAdded(vm.name))

    def __call__(self, event: Event) -> None:
        """On whichever thread made the change."""
        if isinstance(event, VmAdded):
            try:
                vm = self._manager.get_vm(event.vm)
            except errors.NoSuchVM:
                return
            if not isinstance(vm, AdoptedVm):
                return
            try:
                fd = os.dup(vm.pidfd)
            except OSError:
                return  # released already: its VmRemoved follows
            self._loop.call_soon_threadsafe(self._watch, event.vm, fd, vm)
        elif isinstance(event, VmRemoved):
            self._loop.call_soon_threadsafe(self._unwatch, event.vm, None)

    def _watch(self, name: str, fd: int, vm: AdoptedVm) -> None:
        if self._closed:
            os.close(fd)
            return
        self._unwatch(name, None)
        self._fds[name] = (fd, vm)
        self._loop.add_reader(fd, self._exited, name, vm)

    def _unwatch(self, name: str, vm: AdoptedVm | None) -> None:
        held = self._fds.get(name)
        if held is None or (vm is not None and held[1] is not vm):
            return
        del self._fds[name]
        self._loop.remove_reader(held[0])
        os.close(held[0])

    def _exited(self, name: str, vm: AdoptedVm) -> None:
        self._unwatch(name, vm)
        self._loop.create_task(self._release(name, vm))

    async def _release(self, name: str, vm: AdoptedVm) -> None:
        def release() -> None:
            with contextlib.suppress(errors.NoSuchVM):
                current: object = self._manager.get_vm(name)
                if current is vm:  # not one adopted anew under the name
                    self._manager.release_vm(name, reason="exited")

        try:
            await asyncio.to_thread(release)
        except Exception:
            log.exception("releasing adopted VM %s after its process exited", name)

    def close(self) -> None:
        self._closed = True
        self._manager.unsubscribe(self)
        for name in list(self._fds):
            self._unwatch(name, None)
