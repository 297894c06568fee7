"""Logging for kvmnumad: the journal with structured fields, or readable stderr.

Placement events carry their facts as journal fields, so an admin asks
``journalctl -u kvmnumad KVMNUMA_VM=web`` instead of grepping prose:

=================  ===========================================================
Field              Meaning
=================  ===========================================================
KVMNUMA_VM         VM name
KVMNUMA_VCPU       vCPU index
KVMNUMA_CPUS       host CPUs as a kernel cpulist (``0-3,6``)
KVMNUMA_NODE       host NUMA node the object now sits on / is bound to
KVMNUMA_FROM_NODE  node memory or a vCPU moved away from
KVMNUMA_TO_NODE    node it moved to
KVMNUMA_REASON     why (``api``, ``policy``, ``hotplug``, ``rebalance``, ...)
KVMNUMA_RULE       the placement rule a decision followed (``local-first``, ``caller``, ...)
KVMNUMA_JOB        the memory migration job (its Id: object ``/org/kvmnuma1/job/<Id>``)
=================  ===========================================================

Each event kind has a fixed MESSAGE_ID (sd-id128, generated once, never
changed: tools and catalogs key on them), e.g.
``journalctl MESSAGE_ID=2517a41608564c1b96dbd0ebae87f628``:

================  ================================  =================================
Kind              MESSAGE_ID                        When
================  ================================  =================================
pin               a3cdb94f7a1749019c1e75937f824b8f  vCPU affinity set (SetVcpuAffinity)
bind              2517a41608564c1b96dbd0ebae87f628  vCPU bound to a NUMA node
repin             98a5b04b200e47faac4bff9ab6350209  vCPU re-pinned after CPU hotplug
migrate           72eb4c393c9a41f5a246177ae2c3a65c  guest memory moved between nodes
vm-created        4e77d63da7c94cc9aba5050f4617d4cd  VM defined
vm-destroyed      000cf9c3dba6443db561072a40e741f7  VM destroyed
vm-started        47d912bc9faf4383888ec1f7a810afe8  vCPUs running
vm-stopped        e9cfd7dd410f45c1adfd40af2c3bf078  vCPUs stopped
topology-changed  c52c477987f24cd5bceb6a08d0ad144c  host CPUs went on/offline
state-corrupt     2c4bccf95d774fbf80f7427fa5979669  a saved VM definition was unreadable
decision          8bf6b4d99a53451088e33cb752e8230a  a placement decided, with its rule and numbers
vm-resumed        af1e4d4f20744d998027136df341d1cf  VM continued after a restart: same memory, same vCPU state
vm-restarted      41b5e153033f4100bdb27b09a7760262  vCPUs from entry on kept memory (after a crash)
rebalance         58b86366047946cf8ee28c0c5e594e99  the balancer moved a guest node's vCPUs or memory
================  ================================  =================================

Without a journal (a terminal, a container) the same fields are appended to
the stderr line as ``KEY=value`` so nothing is lost.
"""

from __future__ import annotations

import enum
import logging
import socket
import sys
from collections.abc import Iterable
from typing import Literal

from kvmnumad.numa.topology import format_cpulist

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "kvmnumad"

event_log = logging.getLogger("kvmnumad.events")


class EventKind(enum.StrEnum):
    PIN = "pin"
    BIND = "bind"
    REPIN = "repin"
    MIGRATE = "migrate"
    VM_CREATED = "vm-created"
    VM_DESTROYED = "vm-destroyed"
    VM_STARTED = "vm-started"
    VM_STOPPED = "vm-stopped"
    TOPOLOGY_CHANGED = "topology-changed"
    STATE_CORRUPT = "state-corrupt"
    DECISION = "decision"
    VM_RESUMED = "vm-resumed"
    VM_RESTARTED = "vm-restarted"
    REBALANCE = "rebalance"


MESSAGE_IDS: dict[EventKind, str] = {
    EventKind.PIN: "a3cdb94f7a1749019c1e75937f824b8f",
    EventKind.BIND: "2517a41608564c1b96dbd0ebae87f628",
    EventKind.REPIN: "98a5b04b200e47faac4bff9ab6350209",
    EventKind.MIGRATE: "72eb4c393c9a41f5a246177ae2c3a65c",
    EventKind.VM_CREATED: "4e77d63da7c94cc9aba5050f4617d4cd",
    EventKind.VM_DESTROYED: "000cf9c3dba6443db561072a40e741f7",
    EventKind.VM_STARTED: "47d912bc9faf4383888ec1f7a810afe8",
    EventKind.VM_STOPPED: "e9cfd7dd410f45c1adfd40af2c3bf078",
    EventKind.TOPOLOGY_CHANGED: "c52c477987f24cd5bceb6a08d0ad144c",
    EventKind.VM_RESUMED: "af1e4d4f20744d998027136df341d1cf",
    EventKind.VM_RESTARTED: "41b5e153033f4100bdb27b09a7760262",
    EventKind.STATE_CORRUPT: "2c4bccf95d774fbf80f7427fa5979669",
    EventKind.DECISION: "8bf6b4d99a53451088e33cb752e8230a",
    EventKind.REBALANCE: "58b86366047946cf8ee28c0c5e594e99",
}

FIELD_PREFIX = "KVMNUMA_"
Target = Literal["auto", "journal", "stderr"]




class _FieldsFormatter(logging.Formatter):
    """Appends the journal fields of a record so stderr carries the same facts."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = [
            f"{key}={value}"
            for key, value in sorted(record.__dict__.items())
            if key.startswith(FIELD_PREFIX) or key == "MESSAGE_ID"
        ]
        return f"{text} {' '.join(fields)}" if fields else text


def _journal_listening() -> bool:
    """The socket file outlives a journald that was stopped; only a connect
    tells whether anyone reads it (else every log line would fail)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(JOURNAL_SOCKET)
        except OSError:
            return False
    return True


def _journal_handler() -> logging.Handler | None:
    if not _journal_listening():
        return None
    try:
        from systemd.journal import JournalHandler  # noqa: PLC0415 (optional dependency)
    except ImportError:
        return None
    handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER)
    return handler


_installed: list[logging.Handler] = []


def setup_logging(level: str = "info", target: Target = "auto") -> str:
    """Route the root logger to the journal or stderr; returns the target used.

    "auto" picks the journal when its socket exists and systemd-python
    imports, so the same binary logs structured under systemd and readable in
    a terminal.  Asking for "journal" where there is none falls back to stderr
    with a warning rather than losing every later message.  Calling it again
    replaces what an earlier call installed.
    """
    root = logging.getLogger()
    for old in _installed:
        root.removeHandler(old)
    _installed.clear()
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    root.setLevel(numeric)

    handler = None if target == "stderr" else _journal_handler()
    chosen = "journal"
    if handler is None:
        chosen = "stderr"
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_FieldsFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    _installed.append(handler)
    if target == "journal" and chosen != "journal":
        logging.getLogger(__name__).warning("no journal at %s (or no systemd-python): logging to stderr",
                                            JOURNAL_SOCKET)
    return chosen


def event_fields(
    kind: EventKind | str,
    *,
    vm: str | None = None,
    vcpu: int | None = None,
    cpus: Iterable[int] | None = None,
    node: int | None = None,
    from_node: int | None = None,
    to_node: int | None = None,
    reason: str | None = None,
    rule: str | None = None,
    job: int | None = None,
) -> dict[str, str]:
    """The journal fields of one event; unknown kinds raise ValueError (a typo must not log silently)."""
    kind = EventKind(kind)
    values: dict[str, object | None] = {
        "VM": vm,
        "VCPU": vcpu,
        "CPUS": None if cpus is None else format_cpulist(cpus),
        "NODE": node,
        "FROM_NODE": from_node,
        "TO_NODE": to_node,
        "REASON": reason,
        "RULE": rule,
        "JOB": job,
    }
    fields = {"MESSAGE_ID": MESSAGE_IDS[kind], "KVMNUMA_EVENT": kind.value}
    fields.update({FIELD_PREFIX + k: str(v) for k, v in values.items() if v is not None})
    return fields


def log_event(
    kind: EventKind | str,
    message: str,
    *,
    vm: str | None = None,
    vcpu: int | None = None,
    cpus: Iterable[int] | None = None,
    node: int | None = None,
    from_node: int | None = None,
    to_node: int | None = None,
    reason: str | None = None,
    level: int = logging.INFO,
    rule: str | None = None,
    job: int | None = None,
) -> None:
    """Log one placement/lifecycle event with its MESSAGE_ID and KVMNUMA_* fields.

    Example: ``log_event("pin", "web vcpu 0 pinned to 0-1", vm="web", vcpu=0, cpus={0, 1}, reason="api")``.
    """
    fields = event_fields(
        kind, vm=vm, vcpu=vcpu, cpus=cpus, node=node, from_node=from_node, to_node=to_node, reason=reason,
        rule=rule, job=job,
    )
    # No args: a "%" in a VM name must not be taken for a format.
    event_log.log(level, message, extra=fields)
