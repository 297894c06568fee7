"""Structured placement events in a real systemd-journald, read back with journalctl -o json."""

from __future__ import annotations

import logging
import secrets
import socket
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kvmnumad import journal
from kvmnumad.cpulist import format as format_cpulist
from kvmnumad.journal import MESSAGE_IDS, EventKind, log_event, setup_logging

if TYPE_CHECKING:
    from tests.sysfixtures import Journal

pytest_plugins = ["tests.sysfixtures"]


def test_message_ids_are_distinct_uuids() -> None:
    assert set(MESSAGE_IDS) == set(EventKind)
    assert len(set(MESSAGE_IDS.values())) == len(EventKind)
    for value in MESSAGE_IDS.values():
        assert uuid.UUID(value).hex == value
    assert {k.value for k in EventKind} == {
        "pin", "bind", "repin", "migrate", "vm-created", "vm-destroyed", "vm-started", "vm-stopped",
        "topology-changed", "state-corrupt", "decision", "vm-resumed", "vm-restarted", "rebalance",
    }


def test_format_cpulist() -> None:
    assert format_cpulist([3, 0, 1, 2, 6, 8, 9]) == "0-3,6,8-9"
    assert format_cpulist([]) == ""


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError):
        log_event("pinned", "typo", vm="x")


def test_placement_events_reach_the_journal_with_fields(journald: Journal, restore_logging: None) -> None:
    assert setup_logging("info") == "journal"
    vm = "jt-" + secrets.token_hex(4)
    log_event("pin", f"{vm} vcpu 1 pinned to 0-1", vm=vm, vcpu=1, cpus={0, 1}, reason="api")
    log_event(EventKind.BIND, f"{vm} vcpu 1 bound to node 0", vm=vm, vcpu=1, node=0, cpus=[0, 1],
              reason="api")
    log_event("repin", f"{vm} vcpu 1 re-pinned after cpu1 went offline", vm=vm, vcpu=1, cpus=[0],
              reason="hotplug")
    log_event("migrate", f"{vm} guest node 0 memory moved 1 -> 0", vm=vm, from_node=1, to_node=0,
              reason="rebalance")
    log_event("state-corrupt", f"{vm}.json unreadable", vm=vm, reason="bad json", level=logging.ERROR)

    entries = journald.entries(f"KVMNUMA_VM={vm}", wait_for=5)
    by_kind = {e["KVMNUMA_EVENT"]: e for e in entries}
    assert list(by_kind) == ["pin", "bind", "repin", "migrate", "state-corrupt"]
    for kind, entry in by_kind.items():
        assert entry["MESSAGE_ID"] == MESSAGE_IDS[EventKind(kind)]
        assert entry["SYSLOG_IDENTIFIER"] == "kvmnumad"
        assert entry["KVMNUMA_VM"] == vm
    pin = by_kind["pin"]
    assert (pin["KVMNUMA_VCPU"], pin["KVMNUMA_CPUS"], pin["KVMNUMA_REASON"]) == ("1", "0-1", "api")
    assert pin["MESSAGE"] == f"{vm} vcpu 1 pinned to 0-1"
    assert pin["PRIORITY"] == "6"
    assert "KVMNUMA_NODE" not in pin  # absent facts are absent, not empty
    assert by_kind["bind"]["KVMNUMA_NODE"] == "0"
    assert (by_kind["repin"]["KVMNUMA_CPUS"], by_kind["repin"]["KVMNUMA_REASON"]) == ("0", "hotplug")
    migrate = by_kind["migrate"]
    assert (migrate["KVMNUMA_FROM_NODE"], migrate["KVMNUMA_TO_NODE"]) == ("1", "0")
    assert by_kind["state-corrupt"]["PRIORITY"] == "3"

    # The admin's query by event kind works too.
    hits = journald.entries(f"MESSAGE_ID={MESSAGE_IDS[EventKind.MIGRATE]}", f"KVMNUMA_VM={vm}")
    assert [e["KVMNUMA_EVENT"] for e in hits] == ["migrate"]


def test_stderr_carries_the_fields(capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    assert setup_logging("debug", target="stderr") == "stderr"
    log_event("pin", "web vcpu 0 pinned", vm="web", vcpu=0, cpus=[2, 3], reason="api")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert " INFO kvmnuma" in line and "web vcpu 0 pinned" in line
    for field in ("KVMNUMA_VM=web", "KVMNUMA_VCPU=0", "KVMNUMA_CPUS=2-3", "KVMNUMA_REASON=api",
                  f"MESSAGE_ID={MESSAGE_IDS[EventKind.PIN]}"):
        assert field in line.split(), (field, line)


def test_auto_falls_back_to_stderr_without_journal(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str],
                                                  restore_logging: None) -> None:
    monkeypatch.setattr(journal, "JOURNAL_SOCKET", "/nonexistent/socket")
    assert setup_logging("info") == "stderr"
    assert setup_logging("info", target="journal") == "stderr"
    assert "no journal" in capsys.readouterr().err
    with pytest.raises(ValueError):
        setup_logging("loud")


def test_auto_ignores_a_socket_nobody_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            restore_logging: None) -> None:
    """A journald that was stopped leaves its socket file behind: a real stale
    socket (bound, then closed) must send 'auto' to stderr, not to a dead end."""
    stale = tmp_path / "socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(stale))
    assert stale.exists()
    monkeypatch.setattr(journal, "JOURNAL_SOCKET", str(stale))
    assert journal.setup_logging("info", "auto") == "stderr"
