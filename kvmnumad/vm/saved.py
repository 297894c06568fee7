"""What a handover keeps of a VM beyond its definition: vCPU state and memfds.

A KVM VM fd works only in the process that made it, so a restarted daemon
makes every VM anew; what carries over is the guest's memory (its memfds,
by slot) and, after a graceful pause, each vCPU's state.  The core takes one
of these in ``Manager.restore_vm``; where the fds come from (exec, systemd's
fd store) is the daemon's business (kvmnumad/handover.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from kvmnumad.kvm.vcpu import VcpuState


class Recovery(enum.StrEnum):
    """How a VM came to be in this process (the VM's ``Recovery`` property)."""

    NONE = ""  # created here, or restored from its definition with fresh memory
    RESUMED = "resumed"  # same memory and vCPU state: the guest saw a pause
    RESTARTED = "restarted"  # same memory, vCPUs from their entry state (the old process died)


@dataclass(frozen=True)
class SavedVcpu:
    """One paused vCPU: its KVM state and what the runner had counted."""

    state: VcpuState
    progress: int = 0
    done: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state.to_dict(), "progress": self.progress, "done": self.done}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SavedVcpu:
        return cls(VcpuState.from_dict(d["state"]), int(d.get("progress", 0)), bool(d.get("done", False)))


@dataclass
class Resume:
    """What ``Manager.restore_vm`` reuses: ``memfds`` (slot -> fd, taken out
    as slots adopt them; what is left after the restore is the caller's to
    close) and, after a graceful handover, one SavedVcpu per vCPU (None for
    a vCPU that never ran)."""

    memfds: dict[int, int] = field(default_factory=dict)
    vcpus: list[SavedVcpu | None] | None = None

    @property
    def recovery(self) -> Recovery:
        if self.vcpus is not None:
            return Recovery.RESUMED
        return Recovery.RESTARTED if self.memfds else Recovery.NONE
