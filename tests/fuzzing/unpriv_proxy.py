"""A dbus-fast client serving calls read from stdin, one JSON object a line,
run as an unprivileged user under /usr/bin/python3 (Debian's python3-dbus-fast).

Request: {"path", "iface", "member", "signature", "body"}; a variant in the
body is {"$v": [signature, value]}.  Answer, one JSON line: {"error": name or
null, "text": first string of an error's body, "body": the reply's body}.
Stdlib and dbus-fast only: the checkout's .venv is root's.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

DEST = "org.kvmnuma1"


def decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$v"}:
            sig, inner = value["$v"]
            return Variant(sig, decode(inner))
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def encode(value: Any) -> Any:
    if isinstance(value, Variant):
        return encode(value.value)
    if isinstance(value, tuple | list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    return value


async def main(address: str) -> None:
    bus = await MessageBus(bus_address=address).connect()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 28)  # a line holds a 70,000-element array
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": bus.unique_name}), flush=True)
    while line := await reader.readline():
        req = json.loads(line)
        msg = Message(destination=DEST, path=req["path"], interface=req["iface"], member=req["member"],
                      signature=req["signature"], body=decode(req["body"]))
        try:
            reply = await asyncio.wait_for(bus.call(msg), 10)
        except Exception as e:  # a timeout, or the bus hung up on us: the caller reports it
            gone = not bus.connected
            print(json.dumps({"error": "Disconnected" if gone else "NoReply", "text": repr(e), "body": []}),
                  flush=True)
            if gone:
                return
            continue
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            print(json.dumps({"error": reply.error_name, "text": text, "body": []}), flush=True)
        else:
            print(json.dumps({"error": None, "text": "", "body": encode(reply.body)}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
