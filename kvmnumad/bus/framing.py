"""Incoming messages framed ahead of dbus-fast: an over-long body is skipped, never unmarshalled.

dbus-fast (1.84 and 5.x alike) unmarshals a whole message body, in Cython,
before any handler of ours runs: one SetVcpuAffinity with an 8 MB ``au``,
refused afterwards for want of authorization, made the daemon build two
million ints first (issue 12 finding 8: +182 MiB from one call by
``nobody``), and the system bus passes messages of up to 32 MiB.

So the service's connection reads through ``BoundedSocket``.  It frames the
byte stream itself from the fixed 16-byte header (body length, header-fields
length): a message whose body is at most ``MAX_BODY`` passes to dbus-fast's
unmarshaller byte for byte, fds included; a longer one is skipped as it
arrives, through one scratch buffer, so it costs neither objects nor a
buffer of its size.  Of a skipped method call only its header fields are
parsed (sender, path, member) and it is answered
``org.kvmnuma1.Error.LimitReached``; anything else over the bound is dropped
and logged.  The fds that came with a skipped message are closed.  Replies
(method returns, errors) are not bounded: the bus delivers a reply only to
a call we made, so they come from whom we asked (polkitd, the bus), and a
client built on connect() may well ask for a large GetManagedObjects.

The bound: the largest body a legitimate call has is SetVcpuAffinity's
(``uau``) naming every CPU the kernel can have (NR_CPUS at most 8,192 on
x86-64): 4 + 4 + 4 x 8,192 = 32,776 bytes.  CreateVM's ``(suta{sv})`` is
under 5 KiB: a 64-character name and at most eight options, the largest
``host_nodes``, one entry per NUMA node (at most 1,024: 4 KiB).  ``MAX_BODY``
is twice the largest, 64 KiB.  Header fields (path, interface, member,
destination, sender, signature) of our calls are under 1 KiB; over
``MAX_FIELDS`` a message is dropped unanswered, its sender being unknown
unless its header is read.

The hook (read in both versions' source): both ``aio.MessageBus.connect()``
call ``self._authenticate()`` and right after it, with no await between,
build their message reader on ``self._sock``, whose unmarshaller only ever
calls ``recvmsg(n, ancbufsize)`` on it (fds negotiated) and treats a
``BlockingIOError`` as "wait for more" and ``b""`` as the end.  ServiceBus
overrides ``_authenticate`` to put a BoundedSocket in ``_sock`` once the
handshake is done; the writer (made before the handshake in both) keeps
the real socket.  BoundedSocket hands out only bytes the reader asked for
and returns short only when it has none left and the socket has none
either, so a reader that stops on a short read never leaves bytes stranded
here (the socket, level-triggered, calls it again when more arrive).
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MAX_CPUS = 8192  # the kernel's largest NR_CPUS on x86-64 (CONFIG_MAXSMP)
LARGEST_CALL = 4 + 4 + 4 * MAX_CPUS  # SetVcpuAffinity(u vcpu, au cpus) naming every CPU
MAX_BODY = 64 * 1024  # bytes: twice the largest legitimate body
MAX_FIELDS = 16 * 1024  # bytes of header fields
_FIXED = 16  # endianness, type, flags, version, body length, serial, fields length
_CHUNK = 64 * 1024  # read from the socket at once
_MAX_FDS = 253  # SCM_MAX_FD: the most one recvmsg can carry
_ANC = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)
_METHOD_CALL = 1
_BOUNDED = frozenset({_METHOD_CALL, 4})  # method calls and signals; not replies (see the module doc)
_NO_REPLY_EXPECTED = 0x1
_FIELD_NAMES = {1: "path", 2: "interface", 3: "member", 6: "destination", 7: "sender"}


@dataclass(frozen=True)
class Refused:
    """An incoming message whose body was skipped, as far as its header tells."""

    message_type: int
    flags: int
    serial: int
    body_length: int
    fields: dict[str, str]  # path, interface, member, destination, sender (those it has)

    @property
    def wants_reply(self) -> bool:
        return (self.message_type == _METHOD_CALL and not self.flags & _NO_REPLY_EXPECTED
                and "sender" in self.fields)


def parse_fields(header: bytes) -> dict[str, str]:
    """The string header fields of a message whose header (fixed part and
    fields array) is ``header``.  The bus daemon has validated it; still,
    anything unexpected ends the walk with what was found so far."""
    fmt = "<" if header[0:1] == b"l" else ">"
    (length,) = struct.unpack_from(fmt + "I", header, 12)
    end = min(_FIXED + length, len(header))
    pos, found = _FIXED, {}
    try:
        while pos < end:
            pos += -pos & 7
            code, siglen = header[pos], header[pos + 1]
            sig = header[pos + 2:pos + 2 + siglen]
            pos += 3 + siglen
            if sig in (b"s", b"o"):
                pos += -pos & 3
                (n,) = struct.unpack_from(fmt + "I", header, pos)
                value = header[pos + 4:pos + 4 + n].decode("utf-8", "replace")
                pos += 5 + n
            elif sig == b"g":
                n = header[pos]
                value = header[pos + 1:pos + 1 + n].decode("ascii", "replace")
                pos += 2 + n
            elif sig == b"u":
                pos += (-pos & 3) + 4
                continue
            else:
                break
            if code in _FIELD_NAMES:
                found[_FIELD_NAMES[code]] = value
    except (IndexError, struct.error):
        pass
    return found


class BoundedSocket:
    """The read side of the bus socket as dbus-fast's unmarshaller sees it
    (see the module doc); everything but ``recvmsg``/``recv`` is the real
    socket's.  ``on_refused`` is called (on the loop, from the reader) for
    each message skipped."""

    def __init__(self, sock: socket.socket, on_refused: Callable[[Refused], None],
                 max_body: int = MAX_BODY, max_fields: int = MAX_FIELDS) -> None:
        self._sock = sock
        self._on_refused = on_refused
        self.max_body = max_body
        self._max_fields = max_fields
        self._scratch = bytearray(_CHUNK)
        self._ready = bytearray()  # bytes of passing messages, not yet handed out
        self._ready_fds: list[tuple[int, list[int]]] = []  # (offset in the stream handed out, fds)
        self._out = 0  # bytes handed out so far
        self._header = bytearray()  # the start of a message being framed
        self._header_fds: list[int] = []
        self._passing = 0  # bytes of the current passing message still to come
        self._skipping = 0  # bytes of a refused message still to come
        self._fields_wanted = 0  # header length needed before a refused message can be answered
        self._refused_fixed: tuple[int, int, int, int] | None = None
        self._transparent = False  # a stream we cannot frame: dbus-fast sees it as is, and fails
        self._eof = False
        self.refused = 0  # messages skipped (tests, logs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    # ---------------------------------------------------------- the reader's side
    def recvmsg(self, bufsize: int, ancbufsize: int = 0, flags: int = 0) -> tuple[bytes, list[Any], int, Any]:
        if self._sock.fileno() < 0:  # closed by the bus (_finalize): what is buffered here is not served
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        while len(self._ready) < bufsize and not self._eof and self._fill():
            pass
        n = min(bufsize, len(self._ready))
        if n == 0:
            if self._eof:
                return b"", [], 0, None
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        data = bytes(self._ready[:n])
        del self._ready[:n]
        self._out += n
        fds: list[int] = []
        while self._ready_fds and self._ready_fds[0][0] < self._out:
            fds += self._ready_fds.pop(0)[1]
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        return data, anc, 0, None

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data, anc, _flags, _addr = self.recvmsg(bufsize)
        _close(_fds_of(anc))  # no fds without negotiation; none kept if a peer sent some anyway
        return data

    # ------------------------------------------------------------- the socket side
    def _fill(self) -> bool:
        """Read one chunk and frame it; False when the socket has nothing now."""
        try:
            nbytes, anc, _flags, _addr = self._sock.recvmsg_into([self._scratch], _ANC)
        except (BlockingIOError, InterruptedError):
            return False
        fds = _fds_of(anc)
        if nbytes == 0:
            _close(fds)
            self._eof = True
            return False
        self._feed(memoryview(self._scratch)[:nbytes], fds)
        return True

    def _feed(self, chunk: memoryview, fds: list[int]) -> None:
        """Frame ``chunk``; its ``fds`` belong to the message its first byte is of
        (the kernel does not read past the start of data that carries fds)."""
        pos, size = 0, len(chunk)
        while pos < size or fds:
            if self._transparent or self._passing:
                take = size - pos if self._transparent else min(self._passing, size - pos)
                if fds:
                    self._ready_fds.append((self._out + len(self._ready), fds))
                    fds = []
                self._ready += chunk[pos:pos + take]
                self._passing -= 0 if self._transparent else take
                pos += take
            elif self._skipping and not self._fields_wanted:  # the body, once the fields are read
                _close(fds)
                fds = []
                take = min(self._skipping, size - pos)
                self._skipping -= take
                pos += take
            else:
                self._header_fds += fds
                fds = []
                if pos == size:
                    break
                want = (self._fields_wanted or _FIXED) - len(self._header)
                take = min(want, size - pos)
                self._header += chunk[pos:pos + take]
                pos += take
                if take == want:
                    self._framed()

    def _framed(self) -> None:
        """The fixed header (or, of a refused message, all its fields) is in ``_header``."""
        header = self._header
        if self._fields_wanted:
            self._refuse(parse_fields(bytes(header)))
            return
        if bytes(header[0:1]) not in (b"l", b"B"):
            log.error("the bus sent a message we cannot frame (endianness byte %r): passed on as is",
                      bytes(header[0:1]))
            self._pass(len(header), transparent=True)
            return
        fmt = "<" if header[0:1] == b"l" else ">"
        body, serial, fields = struct.unpack_from(fmt + "III", header, 4)
        total = _FIXED + fields + (-fields & 7) + body
        if header[1] not in _BOUNDED or (body <= self.max_body and fields <= self._max_fields):
            self._pass(total)
            return
        self._refused_fixed = (header[1], header[2], serial, body)
        if fields > self._max_fields:  # whose it is would take reading all that: dropped unanswered
            self._refuse({})
            self._skipping = total - _FIXED
            return
        self._fields_wanted = _FIXED + fields
        self._skipping = total - self._fields_wanted

    def _pass(self, total: int, *, transparent: bool = False) -> None:
        if self._header_fds:
            self._ready_fds.append((self._out + len(self._ready), self._header_fds))
            self._header_fds = []
        self._ready += self._header
        self._passing = total - len(self._header)
        self._header.clear()
        self._transparent = transparent

    def _refuse(self, fields: dict[str, str]) -> None:
        assert self._refused_fixed is not None
        mtype, mflags, serial, body = self._refused_fixed
        _close(self._header_fds)
        self._header_fds = []
        self._header.clear()
        self._fields_wanted = 0
        self._refused_fixed = None
        self.refused += 1
        try:
            self._on_refused(Refused(mtype, mflags, serial, body, fields))
        except Exception as e:  # the reader must go on whatever the answer did
            log.error("answering a refused over-long message failed", exc_info=e)


def _fds_of(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += array.array("i", data[:len(data) - len(data) % array.array("i").itemsize])
    return fds


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class RefusalLog:
    """Logs refused messages at most once a second, with how many were not logged."""

    def __init__(self) -> None:
        self._last = 0.0
        self._quiet = 0

    def __call__(self, refused: Refused, why: str) -> None:
        now = time.monotonic()
        if now - self._last < 1.0:
            self._quiet += 1
            return
        more = f" ({self._quiet} more since the last logged)" if self._quiet else ""
        self._last, self._quiet = now, 0
        f = refused.fields
        log.warning("refused a message of %d body bytes from %s (%s %s.%s): %s%s", refused.body_length,
                    f.get("sender", "?"), f.get("path", "?"), f.get("interface", ""), f.get("member", "?"),
                    why, more)
