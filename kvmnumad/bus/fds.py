"""File descriptors received with a message: owned, handed over, always closed.

dbus-fast (1.84 to 5.x) puts the fds a message carries in ``msg.unix_fds``
and the body's ``h`` values stay indices into that list; it never closes
them.  With ``negotiate_unix_fd=True`` (needed for CreateVM's ``payload``
option) any peer could then fill the daemon's fd table by sending fds with
any message.  So ``take_fds`` runs ahead of every other handler on each
message: every ``h`` of the body becomes a ``PassedFd`` that owns its fd
(closed by whoever consumes it, or when the message is dropped), and every
fd the body does not name is closed at once.  dbus-fast's unmarshaller keeps
the last message it read until the next one arrives, so the fds of a call
refused before its method ran live that long, and no longer: one message's
worth (the bus daemon caps fds per message) per connection.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from dbus_fast import Message, Variant
from dbus_fast.signature import SignatureType, get_signature_tree


class PassedFd:
    """One fd a caller passed (D-Bus type ``h``), owned by the daemon.

    ``close()`` is idempotent; the finalizer closes an fd nobody consumed
    (a denied or malformed call), since the Dispatcher's task is the last
    holder of the message and drops it when the call is answered."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("the passed file descriptor is closed")
        return self._fd

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PassedFd({self._fd})"


def take_fds(msg: Message) -> bool:
    """A message handler (never answers: returns False).  Replaces each
    ``h`` in the body by a PassedFd and closes the fds it does not name."""
    fds = list(msg.unix_fds or ())
    if not fds:
        return False
    taken: set[int] = set()

    def own(index: Any) -> Any:
        if isinstance(index, int) and 0 <= index < len(fds) and index not in taken:
            taken.add(index)
            return PassedFd(fds[index])
        return None  # an index past the list, or one named twice: no fd

    try:
        if msg.signature:
            _walk(msg.body, get_signature_tree(msg.signature).types, own)
    finally:
        msg.unix_fds = []
        for i, fd in enumerate(fds):
            if i not in taken:
                with contextlib.suppress(OSError):
                    os.close(fd)
    return False


def _walk(values: Any, types: list[SignatureType], own: Any) -> None:
    """Replace, in place, the ``h`` values of ``values`` (typed by ``types``)."""
    for i, t in enumerate(types):
        if "h" not in t.signature and "v" not in t.signature:
            continue
        _replace(values, i, t, own)


def _replace(container: Any, key: Any, t: SignatureType, own: Any) -> None:
    value = container[key]
    if t.token == "h":
        container[key] = own(value)
    elif t.token == "v":
        if isinstance(value, Variant):
            if value.signature == "h":
                value.value = own(value.value)
            else:
                holder = [value.value]
                _walk(holder, get_signature_tree(value.signature).types, own)
                value.value = holder[0]
    elif t.token == "(":
        items = list(value)
        _walk(items, t.children, own)
        container[key] = type(value)(items) if isinstance(value, tuple) else items
    elif t.token == "a":
        child = t.children[0]
        if child.token == "{":
            key_t, value_t = child.children
            if "h" in key_t.signature:
                new = {own(k): v for k, v in value.items()}
                value.clear()
                value.update(new)
            for k in list(value):
                _replace(value, k, value_t, own)
        else:
            for j in range(len(value)):
                _replace(value, j, child, own)
