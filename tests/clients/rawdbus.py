"""A D-Bus client made of a socket and nothing else: it can misbehave as a library never would.

Stdlib only, so that it runs as an unprivileged user under /usr/bin/python3
(the checkout's .venv is root's).  It authenticates (EXTERNAL), says Hello,
and sends method calls marshalled here; it reads replies only when told to.
That is what a hostile or broken client does: flood without reading,
disconnect mid-call, hold hundreds of connections.

As a script (``python3 rawdbus.py ADDRESS MODE ...``), see ``main``.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import sys
import time

_FIELDS = {"path": (1, "o"), "interface": (2, "s"), "member": (3, "s"), "destination": (6, "s"),
           "signature": (8, "g")}


def _pad(buf: bytearray, align: int) -> None:
    buf.extend(b"\0" * (-len(buf) % align))


def _string(buf: bytearray, value: str) -> None:
    data = value.encode()
    _pad(buf, 4)
    buf.extend(struct.pack("<I", len(data)) + data + b"\0")


def marshal_call(serial: int, destination: str, path: str, interface: str, member: str,  # noqa: PLR0917
                 signature: str = "", body: bytes = b"") -> bytes:
    """One METHOD_CALL, little endian; ``body`` already marshalled for ``signature``."""
    fields = bytearray()
    values = {"path": path, "interface": interface, "member": member, "destination": destination}
    if signature:
        values["signature"] = signature
    for name, value in values.items():
        code, kind = _FIELDS[name]
        _pad(fields, 8)
        fields.extend(bytes([code, 1]) + kind.encode() + b"\0")
        if kind == "g":
            data = value.encode()
            fields.extend(bytes([len(data)]) + data + b"\0")
        else:
            _string(fields, value)
    head = struct.pack("<cBBBIII", b"l", 1, 0, 1, len(body), serial, len(fields))
    msg = bytearray(head) + fields
    _pad(msg, 8)
    return bytes(msg) + body


def array_u(values: int, value: int = 0) -> bytes:
    """The body of one ``au`` of ``values`` elements, each ``value``."""
    return struct.pack("<I", 4 * values) + struct.pack("<I", value) * values


class RawClient:
    def __init__(self, address: str) -> None:
        path = dict(kv.split("=", 1) for kv in address.split(":", 1)[1].split(","))["path"]
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
        line = self._line()
        if not line.startswith(b"OK"):
            raise ConnectionError(f"auth refused: {line!r}")
        self.sock.sendall(b"BEGIN\r\n")
        self.serial = 0
        self._buf = bytearray()
        self.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello")

    def _line(self) -> bytes:
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("closed during auth")
            data += chunk
        return data

    def call(self, destination: str, path: str, interface: str, member: str,  # noqa: PLR0917
             signature: str = "", body: bytes = b"") -> int:
        """Send one call; its serial.  Nothing is read."""
        self.serial += 1
        self.sock.sendall(marshal_call(self.serial, destination, path, interface, member, signature, body))
        return self.serial

    def drain(self, timeout: float = 0.0) -> int:
        """Read and drop what arrives until nothing has for ``timeout`` seconds (bytes)."""
        got = 0
        while select.select([self.sock], [], [], timeout)[0]:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                break
            got += len(chunk)
        return got

    def close(self) -> None:
        self.sock.close()

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("closed")
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        return bytes(data)

    def reply_serial(self) -> int | None:
        """Read one whole message; the serial it replies to (None: a signal or a call)."""
        head = self._read(16)
        order = "<" if head[:1] == b"l" else ">"
        body_len, _serial, fields_len = struct.unpack(order + "III", head[4:16])
        fields = self._read(fields_len + (-fields_len % 8))[:fields_len]
        self._read(body_len)
        at, found = 0, None
        while at < len(fields):  # (code, variant) pairs, each 8-aligned from the header's start
            at += -(at + 16) % 8
            code, sig_len = fields[at], fields[at + 1]
            sig = fields[at + 2:at + 2 + sig_len].decode()
            at += 3 + sig_len
            if sig in ("s", "o", "u"):
                at += -(at + 16) % 4
                (value,) = struct.unpack(order + "I", fields[at:at + 4])
                if code == 5:  # REPLY_SERIAL
                    found = value
                at += 4 + (value + 1 if sig != "u" else 0)
            elif sig == "g":
                at += 1 + fields[at] + 1
            else:
                raise ValueError(f"header field signature {sig!r}")
        return found

    def wait_reply(self, serial: int) -> None:
        while self.reply_serial() != serial:
            pass


def main(argv: list[str]) -> int:
    """``ADDRESS flood-stats PATH SECONDS CONNECTIONS``: GetStats on PATH
    from CONNECTIONS connections, replies read and dropped, for SECONDS.
    ``ADDRESS big-affinity PATH MIB``: one SetVcpuAffinity(0, au of MIB MiB), wait for its reply.
    ``ADDRESS probe``: ListVMs round trips until stdin closes, then each in ms.
    Prints what it sent."""
    address, mode = argv[0], argv[1]
    if mode == "flood-stats":
        path, seconds, conns = argv[2], float(argv[3]), int(argv[4])
        clients = [RawClient(address) for _ in range(conns)]
        sent = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for c in clients:
                c.call("org.kvmnuma1", path, "org.kvmnuma1.VM", "GetStats")
                sent += 1
                c.drain()
            time.sleep(0.001)
        print(sent, flush=True)
        return 0
    if mode == "big-affinity":
        path, mib = argv[2], float(argv[3])
        c = RawClient(address)
        c.drain(0.5)  # Hello's reply, NameAcquired
        body = struct.pack("<I", 0) + array_u(int(mib * (1 << 20)) // 4)
        c.call("org.kvmnuma1", path, "org.kvmnuma1.VM", "SetVcpuAffinity", "uau", body)
        got = c.drain(timeout=0.5) if select.select([c.sock], [], [], 30)[0] else 0
        print(len(body), got, flush=True)
        return 0
    if mode == "probe":
        # A second client in a process of its own: ListVMs one at a time, 2 ms apart, until stdin
        # closes; then each round trip in ms, one a line.  (In the flooder's process a probe thread
        # would time the GIL too.)
        c = RawClient(address)
        c.wait_reply(1)  # Hello's
        print("ready", flush=True)
        samples: list[float] = []
        while not select.select([sys.stdin], [], [], 0.002)[0]:
            t = time.perf_counter()
            c.wait_reply(c.call("org.kvmnuma1", "/org/kvmnuma1", "org.kvmnuma1.Manager", "ListVMs"))
            samples.append(1000 * (time.perf_counter() - t))
        print("\n".join(f"{x:.3f}" for x in samples), flush=True)
        return 0
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
