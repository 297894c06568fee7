"""Persistence as a subscriber of the core's events.

The core does not know it is persisted: ``daemon.py`` wires a Persister to
the Manager's events.  It writes a VM's definition only when a persisted
field really changed (a pin that leaves the declared placement as it was
writes nothing, and no fsync), and it is wired only after restore, so a
restore that fails half-way never rewrites the good definition it read.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable

from kvmnumad import crashpoints, errors
from kvmnumad.adopt.vm import is_adopted
from kvmnumad.events import Event, VmAdded, VmChanged, VmRemoved
from kvmnumad.manager import Manager
from kvmnumad.state import StateStore
from kvmnumad.vm.definition import VmDefinition
from kvmnumad.vm.saved import Resume

log = logging.getLogger(__name__)


class Persister:
    def __init__(self, manager: Manager, store: StateStore, known: dict[str, VmDefinition]) -> None:
        """``known``: the definitions on disk now (what restore read)."""
        self._manager = manager
        self._store = store
        self._written = dict(known)
        self._lock = threading.Lock()  # events of different VMs come from different threads

    def __call__(self, event: Event) -> None:
        if isinstance(event, (VmAdded, VmChanged)):
            self._save(event.vm)
        elif isinstance(event, VmRemoved):
            with self._lock:
                self._written.pop(event.vm, None)
                self._store.remove(event.vm)
            crashpoints.reached("persist.removed")

    def _save(self, name: str) -> None:
        try:
            vm = self._manager.get_vm(name)
            if is_adopted(vm):
                return  # not a VM we can make: kvmnumad/adopt/records.py keeps adoptions
            definition = vm.definition()
        except errors.NoSuchVM:
            return  # destroyed meanwhile: its VmRemoved follows
        with self._lock:
            try:
                if self._manager.get_vm(name) is not vm:
                    return  # destroyed and made anew meanwhile: the new VM's own events save it
            except errors.NoSuchVM:
                return  # destroyed meanwhile: writing now would bring it back after a restart
            written = self._written.get(name)
            if written == definition:
                return
            try:
                if definition.payload_sha256 is not None and (
                        written is None or written.payload_sha256 != definition.payload_sha256):
                    self._save_payload(name, definition.payload_sha256)
                self._store.save(name, definition.to_dict())
            except OSError:
                log.exception("could not save the definition of VM %s", name)
                return
            self._written[name] = definition
        crashpoints.reached("persist.saved")


    def _save_payload(self, name: str, sha256: str) -> None:
        """The VM's own code beside its definition, first (see StateStore.save_payload)."""
        payload = self._manager.get_vm(name).payload
        if payload is None or hashlib.sha256(payload).hexdigest() != sha256:
            raise OSError(f"VM {name}: its payload does not match the definition's hash")
        self._store.save_payload(name, payload)


def restore(manager: Manager, store: StateStore,
            resume_of: Callable[[VmDefinition], Resume | None] | None = None,
            skip: frozenset[str] = frozenset()) -> dict[str, VmDefinition]:
    """Recreate every saved VM; returns every definition read (restored or
    not), which is what is on disk.  A definition that cannot be parsed is
    moved aside by the store; one that cannot be restored now (a host node
    short of memory, a CPU gone) is logged and its file left as it was.
    ``resume_of``: what an earlier process of the daemon left of a VM (its
    memfds, kvmnumad/handover.py); ``skip``: VMs already back by other means."""
    known: dict[str, VmDefinition] = {}
    for raw in store.load_all():
        try:
            d = VmDefinition.from_dict(raw)
        except ValueError as e:
            try:
                store.move_aside(str(raw.get("name")), e)
            except (OSError, ValueError) as aside:
                log.error("state file of %r is invalid (%s) and could not be moved aside: %s",
                          raw.get("name"), e, aside)
            continue
        known[d.name] = d
        if d.name in skip:
            continue
        resume = resume_of(d) if resume_of is not None else None
        try:
            payload = store.load_payload(d.name) if d.payload_sha256 is not None else None
            manager.restore_vm(d, payload, resume)
            crashpoints.reached("restore.restored")
        except Exception as e:
            level = logging.WARNING if isinstance(e, errors.KvmnumaError) else logging.ERROR
            log.log(level, "could not restore VM %s (its definition is kept): %s", d.name, e,
                    exc_info=not isinstance(e, errors.KvmnumaError))
    return known
