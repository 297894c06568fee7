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
# A path with no object of ours -- never made, or its VM destroyed meanwhile
# -- answers this for every method, whichever interface it names: one name
# for "no such object", as sd-bus answers it.
UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"
UNKNOWN_INTERFACE = "org.freedesktop.DBus.Error.UnknownInterface"

DBUS_NAMES: dict[type[errors.KvmnumaError], str] = {
    cls: ACCESS_DENIED if cls is errors.AccessDenied else ERROR_PREFIX + cls.__name__
    for cls in errors.ERROR_TYPES
}

# Names that may pass through unchanged when a DBusError is raised inside the
# bus layer itself (ours, plus the standard ones a handler may mean on purpose).
_PASS_THROUGH = frozenset({*DBUS_NAMES.values(), UNKNOWN_OBJECT, UNKNOWN_INTERFACE})

# Every error name a method of ours may answer; the contract lists each.
PUBLISHED_NAMES = _PASS_THROUGH


MAX_MESSAGE = 1024  # characters of an error's text


def _bounded(text: str) -> str:
    """An error names the offending value, and a caller chooses that value:
    an 8 MB CPU list quoted back whole would make every refusal an 8 MB reply.
    Non-ASCII is escaped (\\xe4): Debian's dbus-fast 1.84, which the .deb runs
    on, marshals a non-ASCII string with a wrong length, and the bus then
    drops the daemon, so one GetVM('\u00e4') by anyone took the service down."""
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    if len(text) <= MAX_MESSAGE:
        return text
    return f"{text[: MAX_MESSAGE - 40]}... ({len(text)} characters, cut)"


def unknown_object(path: str) -> DBusError:
    return DBusError(UNKNOWN_OBJECT, f"no object at {path}")


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
        return DBusError(dbus_name(type(exc)), _bounded(str(exc) or type(exc).__name__))
    if isinstance(exc, DBusError) and exc.type in _PASS_THROUGH:
        return exc
    log.error("internal error in %s", where or "a D-Bus call", exc_info=exc)
    text = f"internal error ({type(exc).__name__}); see the daemon log"
    return DBusError(DBUS_NAMES[errors.Internal], text)
