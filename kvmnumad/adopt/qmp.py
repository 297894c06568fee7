"""A QEMU guest's own NUMA layout, asked of QEMU through QMP.

QMP is QEMU's management protocol: JSON objects, one per line, on a Unix
socket.  The client is the few lines the protocol needs, synchronous and
with a deadline (it runs in a worker thread): the qemu.qmp package is not
in Debian, which the .deb installs from.

What QMP gives (checked against Debian's QEMU 7.2.22):
- ``query-cpus-fast``: each vCPU's cpu-index, thread-id and props.node-id;
- ``query-memdev``: each memory backend's id, size, policy and host-nodes;
- which backend is which guest node: none of QEMU 7.2's QMP commands says
  so directly, so it is read from ``info mtree -f`` (HMP through QMP's
  ``human-monitor-command``): guest nodes lie in guest-physical order, node 0
  first, so the backends sorted by their lowest guest address are nodes 0, 1, ...;
- where each backend lies in QEMU's address space: its RAM block offset
  (``info ramblock``) orders the backends as QEMU made them, which is the
  order of their memfds' fd numbers; a backend with a mem-path (qom-get)
  is found in /proc/PID/maps by that path instead.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass
from typing import Any

from kvmnumad import errors

TIMEOUT = 5.0
MAX_LINE = 4 << 20  # a reply larger than this is not QEMU's


class QmpError(errors.InvalidArgument):
    """The QMP socket does not answer as QEMU does (or QEMU refused a command)."""


class QmpClient:
    def __init__(self, path: str, timeout: float = TIMEOUT) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
            self._file = self._sock.makefile("rwb")
            greeting = self._read()
            if "QMP" not in greeting:
                raise QmpError(f"{path}: not a QMP socket (greeting {str(greeting)[:80]!r})")
            self.version: dict[str, Any] = greeting["QMP"].get("version", {})
            self.execute("qmp_capabilities")
        except (OSError, ValueError) as e:
            self._sock.close()
            raise QmpError(f"QMP socket {path}: {e}") from e
        except BaseException:
            self._sock.close()
            raise

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def _read(self) -> dict[str, Any]:
        line = self._file.readline(MAX_LINE)
        if not line:
            raise QmpError("QMP socket closed")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise QmpError(f"QMP sent {type(msg).__name__}, not an object")
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            self._file.write(json.dumps(msg).encode() + b"\n")
            self._file.flush()
            while True:
                reply = self._read()
                if "event" in reply:
                    continue  # asynchronous events interleave with replies
                if "error" in reply:
                    raise QmpError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
                return reply.get("return")
        except (OSError, ValueError) as e:
            raise QmpError(f"QMP {command}: {e}") from e

    def hmp(self, command_line: str) -> str:
        return str(self.execute("human-monitor-command", **{"command-line": command_line}))


@dataclass(frozen=True)
class QmpVcpu:
    index: int
    tid: int
    node: int


@dataclass(frozen=True)
class QmpMemdev:
    id: str
    size: int
    policy: str
    host_nodes: tuple[int, ...]
    guest_node: int | None  # None: not guest RAM of a node (e.g. a DIMM's backend)
    share: bool
    ram_offset: int | None  # QEMU's RAM block offset: the order backends were made in
    mem_path: str | None


@dataclass(frozen=True)
class QmpLayout:
    version: str
    vcpus: tuple[QmpVcpu, ...]
    memdevs: tuple[QmpMemdev, ...]


_MTREE = re.compile(r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio [-\d]+, ram\): (\S+)")
_RAMBLOCK = re.compile(r"^\s*(\S+)\s+\d+ [KMG]iB\s+0x([0-9a-f]+)\s")


def read_layout(path: str) -> QmpLayout:
    with QmpClient(path) as qmp:
        v = qmp.version.get("qemu", {})
        version = f"{v.get('major', '?')}.{v.get('minor', '?')}.{v.get('micro', '?')}"
        vcpus = tuple(sorted(
            (QmpVcpu(int(c["cpu-index"]), int(c["thread-id"]), int(c.get("props", {}).get("node-id", 0)))
             for c in qmp.execute("query-cpus-fast")), key=lambda c: c.index))
        memdevs = qmp.execute("query-memdev") or []
        ids = {str(m["id"]) for m in memdevs}
        lowest: dict[str, int] = {}
        # The flat view of the "memory" address space (guest-physical); views are numbered in no fixed order
        views = [v for v in qmp.hmp("info mtree -f").split("FlatView #") if 'AS "memory"' in v]
        for line in (views[0] if views else "").splitlines():
            if (m := _MTREE.match(line)) and m.group(3) in ids:
                lowest[m.group(3)] = min(lowest.get(m.group(3), 1 << 64), int(m.group(1), 16))
        nodes = {mid: n for n, mid in enumerate(sorted(lowest, key=lambda i: lowest[i]))}
        offsets = {m.group(1): int(m.group(2), 16)
                   for line in qmp.hmp("info ramblock").splitlines() if (m := _RAMBLOCK.match(line))}
        out = []
        for m in memdevs:
            mid = str(m["id"])
            try:
                mem_path = qmp.execute("qom-get", path=f"/objects/{mid}", property="mem-path")
            except QmpError:
                mem_path = None  # memfd and ram backends have none
            out.append(QmpMemdev(mid, int(m["size"]), str(m.get("policy", "default")),
                                 tuple(int(h) for h in m.get("host-nodes", [])), nodes.get(mid),
                                 bool(m.get("share", False)),
                                 offsets.get(mid), str(mem_path) if mem_path else None))
        out.sort(key=lambda m: (m.ram_offset is None, m.ram_offset or 0))
        return QmpLayout(version, vcpus, tuple(out))
