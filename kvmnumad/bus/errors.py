"""Core errors as D-Bus errors: one table, one translation function.

A caller branches on the error *name*, so every failure gets a stable one
(``org.kvmnuma1.Error.<ClassName>``).  Anything unexpected becomes
``org.kvmnuma1.Error.Internal`` with the traceback kept in our log only: the
bus is a privilege boundary and a traceback tells a peer about paths and
versions.  ``org.freedesktop.DBus.Error.Failed`` never reaches a caller.
"""

from __future__ import annotations

import logging

from dbus_fast import DBusError

from kvmnumad import errors

log = logging.getLogger(__name__)

ERROR_PREFIX = "org.kvmnuma1.Error."
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"

DBUS_NAMES: dict[type[errors.KvmnumaError], str] = {
    cls: ACCESS_DENIED if cls is errors.AccessDenied else ERROR_PREFIX + cls.__name__
    for cls in errors.ERROR_TYPES
}

# Names that may pass through unchanged when a DBusError is raised inside the
# bus layer itself (ours, plus the standard ones a handler may mean on purpose).
_PASS_THROUGH = frozenset(DBUS_NAMES.values())


def dbus_name(exc_type: type[errors.KvmnumaError]) -> str:
    """The published name of a core error class (its nearest listed base)."""
    for cls in exc_type.__mro__:
        if cls in DBUS_NAMES:
            return DBUS_NAMES[cls]  # type: ignore[index]
    return DBUS_NAMES[errors.Internal]


def to_dbus_error(exc: BaseException, where: str = "") -> DBusError:
    """Translate any exception raised while serving a call into the DBusError
    the caller receives.  Unexpected ones are logged here, with traceback."""
    if isinstance(exc, errors.KvmnumaError) and not isinstance(exc, errors.Internal):
        return DBusError(dbus_name(type(exc)), str(exc) or type(exc).__name__)
    if isinstance(exc, DBusError) and exc.type in _PASS_THROUGH:
        return exc
    log.error("internal error in %s", where or "a D-Bus call", exc_info=exc)
    text = f"internal error ({type(exc).__name__}); see the daemon log"
    return DBusError(DBUS_NAMES[errors.Internal], text)
