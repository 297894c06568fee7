"""bus/framing.py's BoundedSocket between a real socket pair and dbus-fast's real unmarshaller.

The stream is cut anywhere (hypothesis picks the write sizes, down to one
byte), messages carry fds, and some are over a small bound: dbus-fast must
read exactly the messages under the bound, in order, with their fds; the
others are reported, answered only if they are calls, and their fds closed
(counted in /proc/self/fd).  The daemon-level figures (memory, both
dbus-fast versions) are test_bus_bounds'.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

import pytest
from dbus_fast import Message, MessageFlag, MessageType
from dbus_fast._private.unmarshaller import Unmarshaller
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmnumad.bus.framing import BoundedSocket, Refused, parse_fields

BOUND = 256  # bytes of body, small so that a test needs no large writes


def message(i: int, kind: str, size: int) -> Message:
    body = [list(range(size // 4))]
    if kind == "signal":
        return Message.new_signal("/o", "t.I", "S", "au", body)
    if kind == "reply":
        return Message(message_type=MessageType.METHOD_RETURN, reply_serial=i, destination=":1.9",
                       sender=":1.3", signature="au", body=body, serial=i)
    return Message(destination=":1.9", path=f"/p/{i}", interface="t.I", member=f"M{i}", sender=":1.3",
                   signature="au", body=body, serial=i,
                   flags=MessageFlag.NO_REPLY_EXPECTED if kind == "noreply" else MessageFlag.NONE)


def over(kind: str, size: int) -> bool:
    return kind != "reply" and 4 + 4 * (size // 4) > BOUND


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


messages = st.lists(st.tuples(st.sampled_from(["call", "noreply", "signal", "reply"]),
                              st.sampled_from([0, 4, 200, BOUND - 4, BOUND, 1000, 5000]), st.booleans()),
                    min_size=1, max_size=12)


CUTS = st.lists(st.sampled_from([1, 3, 8, 16, 17, 100, 700, 4096]), min_size=1, max_size=8)


@settings(max_examples=int(os.environ.get("FRAMING_EXAMPLES", "150")), deadline=None, derandomize=True,
          database=None)
@given(plan=messages, cuts=CUTS)
def test_the_unmarshaller_sees_exactly_the_messages_under_the_bound(
    plan: list[tuple[str, int, bool]], cuts: list[int]
) -> None:
    base = open_fds()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    refused: list[Refused] = []
    got: list[Message] = []
    fds_with: list[int] = []  # counted on arrival: 5.x shares an empty unix_fds list with the next message
    sent = [message(i + 1, kind, size) for i, (kind, size, _fd) in enumerate(plan)]
    want = [m for m, (kind, size, _fd) in zip(sent, plan, strict=True) if not over(kind, size)]
    r, w = os.pipe()
    try:
        ours.setblocking(False)
        bounded = BoundedSocket(ours, refused.append, max_body=BOUND)
        reader = Unmarshaller(None, bounded, True)  # type: ignore[arg-type]
        k = 0
        for msg, (_kind, _size, with_fd) in zip(sent, plan, strict=True):
            data = msg._marshall(True)
            pos = 0
            while pos < len(data):  # one piece written, then read as far as it goes, as the loop would
                n = cuts[k % len(cuts)]
                k += 1
                anc: list[Any] = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, r.to_bytes(4, "little"))] \
                    if with_fd and pos == 0 else []
                theirs.sendmsg([data[pos:pos + n]], anc)
                pos += n
                while (m := reader.unmarshall()) is not None:
                    got.append(m)
                    fds_with.append(len(m.unix_fds))
                    for fd in m.unix_fds:
                        os.close(fd)
    finally:
        ours.close()
        theirs.close()
        os.close(r)
        os.close(w)
    assert [(m.serial, m.member, m.body) for m in got] == [(m.serial, m.member, m.body) for m in want]
    assert fds_with == [1 if fd else 0 for (k, s, fd) in plan if not over(k, s)]
    skipped = [(m, kind) for m, (kind, size, _fd) in zip(sent, plan, strict=True) if over(kind, size)]
    assert [r.serial for r in refused] == [m.serial for m, _kind in skipped]
    # a call expecting a reply (and, on a bus, with a sender: dbus-fast sends none, the bus adds it)
    calls = [kind == "call" for _m, kind in skipped]
    assert [r.message_type == 1 and not r.flags & 1 for r in refused] == calls
    for refusal, (m, _kind) in zip(refused, skipped, strict=True):
        if m.member is not None:
            assert refusal.fields["member"] == m.member and refusal.fields["path"] == m.path
    assert open_fds() == base  # every fd a skipped message carried is closed


def test_header_fields_in_either_byte_order() -> None:
    """As the bus daemon delivers a call (with the sender it adds), in either byte order."""
    want = {"path": "/p", "interface": "t.I", "member": "M", "destination": ":1.9", "sender": ":1.3"}
    named = ((1, "o", "/p"), (2, "s", "t.I"), (3, "s", "M"), (6, "s", ":1.9"), (7, "s", ":1.3"), (5, "u", 3))
    for order, fmt in ((b"l", "<"), (b"B", ">")):
        fields = bytearray()
        for code, sig, value in named:
            fields += b"\0" * (-len(fields) % 8)  # the fields start at 16: aligned as in the message
            fields += bytes([code, 1]) + sig.encode() + b"\0"
            fields += b"\0" * (-len(fields) % 4)
            if isinstance(value, int):
                fields += struct.pack(fmt + "I", value)
            else:
                fields += struct.pack(fmt + "I", len(value)) + value.encode() + b"\0"
        header = order + bytes([1, 0, 1]) + struct.pack(fmt + "III", 0, 7, len(fields)) + fields
        assert parse_fields(bytes(header)) == want


def test_a_closed_socket_ends_the_reading_even_with_messages_buffered() -> None:
    """dbus-fast's _finalize closes the socket from within a handler; its reader
    then must stop (EBADF), not go on serving what BoundedSocket had read ahead
    (seen: 347 replies sent into a closed fd, each logged)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        ours.setblocking(False)
        skipped: list[Refused] = []
        bounded = BoundedSocket(ours, skipped.append, max_body=BOUND)
        theirs.sendall(bytes(message(1, "call", 4)._marshall(True)) * 2)
        data, _anc, _flags, _addr = bounded.recvmsg(16)
        assert len(data) == 16
        ours.close()
        with pytest.raises(OSError):
            bounded.recvmsg(16)
    finally:
        theirs.close()
